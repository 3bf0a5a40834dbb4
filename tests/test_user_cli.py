"""The user commands of `consort` against a real server (uvicorn on a free port).

The server runs on the test's event loop; the commands run in a worker thread, through
typer's CliRunner on the installed entry point's app and, for login and `plan run`, as
true subprocesses of the installed `consort` script. Tests play the worker themselves.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from app.runtime import Runtime
from consort import AsyncClient, Client, NotFound
from consort.cli import app
from tests.conftest import ADMIN_TOKEN
from tests.test_audit_api import server
from tests.test_client import Federation, dockerfile_archive, federation
from tests.test_compute_api import train_task

__all__ = ["server"]


def consort_script() -> str:
    return str(Path(sys.executable).parent / "consort")


class Cli:
    """Runs `consort ...` with its own config directory."""

    def __init__(self, url: str, home: Path) -> None:
        self.url = url
        self.env = {"XDG_CONFIG_HOME": str(home / "config"), "COLUMNS": "200",
                    "NO_COLOR": "1", "CONSORT_PROFILE": "", "CONSORT_URL": "",
                    "CONSORT_TOKEN": ""}
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int = 0, **env: str) -> str:
        result = self.runner.invoke(app, list(args), env={**self.env, **env})
        assert result.exit_code == code, (args, result.output, result.exception)
        return result.output

    def json(self, *args: str, **env: str) -> Any:
        return json.loads(self(*args, "--json", code=0, **env))

    def subprocess(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSORT_")}
        env.update({k: v for k, v in self.env.items() if v})
        return subprocess.run([consort_script(), *args], env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)


def play_worker(url: str, token: str, plan_key: str, stop: threading.Event) -> None:
    """Run every TODO task of the plan (the worker is org-a), until the plan is DONE."""
    with Client(url, token) as worker:
        while not stop.is_set():
            for task in worker.iter_tasks(compute_plan_key=plan_key, status="TODO"):
                worker.start_task(task.key)
                worker.append_logs(task.key, f"training {task.rank}\n")
                worker.register_model_output(task.key, "model", file=task.key.encode())
                worker.done_task(task.key)
            try:
                if worker.get_compute_plan(plan_key).status == "DONE":
                    return
            except NotFound:
                pass  # not registered yet
            time.sleep(0.1)


def scenario(url: str, fed: Federation, tmp: Path) -> None:
    cli = Cli(url, tmp)
    # login, as a true subprocess; the profile file is private
    done = cli.subprocess("login", "--url", url, "--token", fed.tokens["org-a"])
    assert done.returncode == 0, done.stderr
    assert "org-a" in done.stdout
    profile_file = tmp / "config" / "consort" / "profiles.json"
    assert stat.S_IMODE(profile_file.stat().st_mode) == 0o600
    assert json.loads(profile_file.read_text())["current"] == "org-a"

    # organizations and tokens (the administrator through environment overrides)
    out = cli("org", "add", "org-d", "--name", "D", CONSORT_TOKEN=ADMIN_TOKEN)
    assert "Registered org-d" in out
    assert [o["id"] for o in cli.json("org", "list")] == [
        "org-a", "org-b", "org-c", "org-d"]
    issued = cli.json("token", "add", "--name", "ci")
    token_id = issued["info"]["id"]
    assert token_id in [t["id"] for t in cli.json("token", "list")]
    assert "Revoked" in cli("token", "revoke", token_id)
    cli("login", "--url", url, "--token", fed.tokens["org-b"], "--profile", "bee")
    assert "Revoked" not in cli("org", "list", CONSORT_PROFILE="org-a")  # by name
    assert cli.json("token", "list")[0]["org"] == "org-b"  # the current profile: bee
    assert "org-a" in cli("login", "--url", url, "--token", fed.tokens["org-a"])
    assert "no profile" in cli("--profile", "nope", "org", "list", code=1)

    # a function from a folder with a Dockerfile and a function.yaml
    folder = tmp / "my_algo"
    folder.mkdir()
    (folder / "Dockerfile").write_text("FROM busybox\n")
    (folder / "train.py").write_text("print('hi')\n")
    (folder / "function.yaml").write_text(yaml.safe_dump({
        "name": "algo", "inputs": {"models": {"kind": "MODEL", "multiple": True}},
        "outputs": {"model": {"kind": "MODEL"}}}))
    fn = cli.json("function", "add", str(folder), "--command", "python train.py --x 'a b'",
                  "--env", "MODE=fast")
    assert fn["image_source"] == "DOCKERFILE_ARCHIVE"
    assert fn["command"] == ["python", "train.py", "--x", "a b"]
    assert fn["environment"] == {"MODE": "fast"}
    ref = cli.json("function", "add", "--name", "ref", "--image", "busybox:1", "--command", "cp",
                   "--input", "data:DATASET", "--output", "out:DATASET")
    assert ref["inputs"] == {"data": {"kind": "DATASET", "multiple": False,
                                      "optional": False}}
    assert len(cli.json("function", "list")) == 5
    assert "algo" in cli("function", "show", fn["key"])

    # data manager, sample, dataset
    opener = tmp / "opener.py"
    opener.write_text("# opener\n")
    dm = cli.json("data-manager", "add", "--name", "mine", "--opener", str(opener),
                  "--authorized", "org-b")
    sample_dir = tmp / "sample"
    sample_dir.mkdir()
    (sample_dir / "x.csv").write_text("1,2\n")
    sample = cli.json("sample", "add", str(sample_dir), "--data-manager", dm["key"])
    assert sample["location"] == str(sample_dir.resolve())
    assert len(cli.json("sample", "list")) == 3
    data = tmp / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha\n")
    (data / "sub" / "b.txt").write_text("beta\n")
    ds = cli.json("dataset", "add", str(data), "--public")
    assert ds["name"] == "data" and ds["total_size"] == 11
    assert "data" in cli("dataset", "list")
    cli("dataset", "download", ds["key"], str(tmp / "data.zip"))
    assert (tmp / "data.zip").stat().st_size > 0

    # a plan from YAML, run as a true subprocess while a thread plays the worker
    plan_file = tmp / "plan.yaml"
    plan_key = "5d6c3a8e-8a47-4f0e-9a57-0f9a4f2d1c11"
    plan_file.write_text(yaml.safe_dump({
        "name": "yaml plan", "key": plan_key, "batch_size": 1,
        "functions": {"train": {"name": "train"}},
        "assets": {"dm": fed.dm["org-a"]},
        "tasks": [
            {"name": "first", "function": "train",
             "inputs": {"opener": "dm", "datasamples": [fed.samples["org-a"]]}},
            {"name": "second", "function": "train",
             "inputs": {"opener": "dm", "datasamples": [fed.samples["org-a"]],
                        "model": {"task": "first", "output": "model"}}},
            {"name": "merge", "function": fed.aggregate, "worker": "org-a",
             "inputs": {"models": [{"task": "first", "output": "model"},
                                   {"task": "second", "output": "model"}]}},
        ]}))
    stop = threading.Event()
    worker = threading.Thread(target=play_worker,
                              args=(url, fed.tokens["org-a"], plan_key, stop))
    worker.start()
    try:
        run = cli.subprocess("plan", "run", str(plan_file), "--timeout", "60")
    finally:
        stop.set()
        worker.join()
    assert run.returncode == 0, run.stderr
    assert f"{plan_key} DONE" in run.stdout and "with 3 tasks" in run.stderr

    plans = cli.json("plan", "list")
    assert [p["key"] for p in plans] == [plan_key]
    shown = cli.json("plan", "show", plan_key)
    assert shown["status_counts"]["DONE"] == 3
    tree = cli("plan", "graph", plan_key)
    assert "rank 0" in tree and "rank 2" in tree
    dot = cli("plan", "graph", plan_key, "--dot")
    assert dot.startswith("digraph plan") and dot.count("->") == 3
    graph = cli.json("plan", "graph", plan_key)
    assert len(graph["nodes"]) == 3
    tasks = cli.json("task", "list", "--plan", plan_key)
    assert [t["rank"] for t in tasks] == [0, 1, 2]
    first = tasks[0]["key"]
    assert cli.json("task", "show", first)["metadata"] == {"name": "first"}
    assert "DONE" in cli("task", "show", first)
    assert cli("task", "logs", first) == "training 0\n"
    assert cli("task", "logs", first, "-f") == "training 0\n"
    assert len(cli.json("task", "list", "--status", "DONE", "--limit", "2")) == 2
    assert [t["rank"] for t in cli.json("task", "list", "--where", "name=second")] == [1]
    assert len(cli.json("task", "list", "--where", "name", "--plan", plan_key)) == 3
    assert cli.json("plan", "list", "--where", "study") == []
    assert cli.json("data-manager", "list", "--where", "ward=7") == []
    assert cli.json("data-manager", "list")  # the same list, unfiltered, is not empty

    # a second run of the same file is refused: task keys derive from the plan key
    again = cli("plan", "run", str(plan_file), "--no-wait", code=1)
    assert "already_exists" in again

    # the ledger, through the API
    lines = cli("ledger", "tail", "-n", "3", "--json").splitlines()
    assert len(lines) == 3 and all(json.loads(line)["org"] == "org-a" for line in lines)
    assert "TaskStatusChanged" in cli("ledger", "tail", "--type", "TaskStatusChanged")
    assert "ok" in cli("ledger", "verify")
    verified = cli.json("ledger", "verify", "--org", "org-b", CONSORT_TOKEN=ADMIN_TOKEN)
    assert verified[0]["ok"] is True

    # errors: a red line and exit status 1
    assert "not_found" in cli("task", "show", "no-such-task", code=1)
    assert "invalid_token" in cli("org", "list", code=1, CONSORT_TOKEN="bogus")


async def test_user_commands_against_a_real_server(
    runtime: Runtime, server: str, tmp_path: Path
) -> None:
    fed = await federation(lambda token: AsyncClient(server, token))
    await asyncio.wait_for(asyncio.to_thread(scenario, server, fed, tmp_path), 300)


def downloads(url: str, fed: Federation, tmp: Path) -> None:
    """What the organizations registered, downloaded back with the CLI as org-a."""
    with Client(url, fed.tokens["org-a"]) as a:
        task_key = str(uuid.uuid4())
        a.add_compute_plan("one", [train_task(fed, "org-a", task_key)])  # type: ignore[arg-type]
        a.start_task(task_key)
        model = a.register_model_output(task_key, "model", file=b"weights of a")
        a.done_task(task_key)
        archive = dockerfile_archive()
        function = a.add_function("built", image_source="DOCKERFILE_ARCHIVE",
                                  image_file=archive, command=["true"])
        dataset = a.add_dataset("texts", {"a.txt": b"alpha\n", "dir/b.txt": b"beta\n"})
    cli = Cli(url, tmp)
    cli.env.update(CONSORT_URL=url, CONSORT_TOKEN=fed.tokens["org-a"])
    into = tmp / "downloads"
    into.mkdir()

    # each kind, to a file or into a directory under the name the API gives it
    assert "Saved" in cli("model", "download", model.key, "-o", str(tmp / "m.bin"))
    assert (tmp / "m.bin").read_bytes() == b"weights of a"
    cli("model", "download", model.key, "-o", str(into))
    assert (into / f"{model.key}.model").read_bytes() == b"weights of a"
    assert [m["key"] for m in cli.json("model", "list")] == [model.key]
    cli("data-manager", "download", fed.dm["org-a"], "--output", str(into))
    assert (into / "opener.py").read_text() == "# org-a\n"
    cli("function", "download", function.key, "-o", str(tmp / "fn.tar.gz"))
    assert (tmp / "fn.tar.gz").read_bytes() == archive
    cli("dataset", "download", dataset.key, "-o", str(into))
    with zipfile.ZipFile(into / f"{dataset.key}.zip") as zipped:
        assert zipped.read("dir/b.txt") == b"beta\n"
    cli("dataset", "download", dataset.key, "--file", "dir/b.txt", "-o", str(into))
    assert (into / "b.txt").read_bytes() == b"beta\n"

    # an existing file is kept unless --force
    (tmp / "m.bin").write_bytes(b"mine")
    refused = cli("model", "download", model.key, "-o", str(tmp / "m.bin"), code=1)
    assert "exists" in refused and "--force" in refused
    assert (tmp / "m.bin").read_bytes() == b"mine"
    assert "exists" in cli("data-manager", "download", fed.dm["org-a"], "-o", str(into),
                           code=1)
    cli("model", "download", model.key, "-o", str(tmp / "m.bin"), "--force")
    assert (tmp / "m.bin").read_bytes() == b"weights of a"

    # the API's refusals: the problem's code and message, exit 1, no file left behind
    missing = cli("model", "download", "no-such-model", "-o", str(tmp / "none"), code=1)
    assert "not_found" in missing and "no model no-such-model" in missing
    denied = cli("data-manager", "download", fed.dm["org-a"], "-o", str(tmp / "c.py"),
                 code=1, CONSORT_TOKEN=fed.tokens["org-c"])
    assert "forbidden" in denied and "org-c may not" in denied
    denied = cli("dataset", "download", dataset.key, "-o", str(tmp / "c.zip"), code=1,
                 CONSORT_TOKEN=fed.tokens["org-c"])
    assert "forbidden" in denied
    assert sorted(p.name for p in tmp.iterdir() if p.is_file()) == ["fn.tar.gz", "m.bin"]


def failure(url: str, fed: Federation, tmp: Path) -> None:
    with Client(url, fed.tokens["org-a"]) as a:
        key = str(uuid.uuid4())
        a.add_compute_plan("failing", [train_task(fed, "org-a", key)])  # type: ignore[arg-type]
        a.start_task(key)
        log = a.upload_file(b"epoch 1\nTraceback: boom\n")
        a.fail_task(key, message="exit code 1", logs_checksum=log.checksum)
        assert a.get_failure_report(key).logs_checksum == log.checksum
    cli = Cli(url, tmp)
    cli.env.update(CONSORT_URL=url, CONSORT_TOKEN=fed.tokens["org-a"])
    report = cli.json("task", "failure", key)
    assert report["error_type"] == "EXECUTION" and report["message"] == "exit code 1"
    assert cli("task", "failure", key, "--logs") == "epoch 1\nTraceback: boom\n"
    denied = cli("task", "failure", key, code=1, CONSORT_TOKEN=fed.tokens["org-c"])
    assert "forbidden" in denied


async def test_task_failure_shows_the_report_and_its_log(
    runtime: Runtime, server: str, tmp_path: Path
) -> None:
    fed = await federation(lambda token: AsyncClient(server, token))
    await asyncio.wait_for(asyncio.to_thread(failure, server, fed, tmp_path), 120)


async def test_download_commands_write_files_and_refuse_to_overwrite(
    runtime: Runtime, server: str, tmp_path: Path
) -> None:
    fed = await federation(lambda token: AsyncClient(server, token))
    await asyncio.wait_for(asyncio.to_thread(downloads, server, fed, tmp_path), 120)


def test_server_commands_are_still_there() -> None:
    names = {c.name or c.callback.__name__ for c in app.registered_commands
             if c.callback is not None}
    assert {"serve", "replay", "verify", "login"} <= names


@pytest.mark.parametrize("args", [["--help"], ["plan", "--help"]])
def test_help_lists_the_commands(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "Usage" in result.output
