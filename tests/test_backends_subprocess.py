"""The subprocess backend: the container contract as far as a local process can honour it
(no engine needed)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.backends.subprocess_backend import SubprocessBackend, resolve_argv
from runner.contract import (
    BackendOptions,
    BuildError,
    ImageSourceKind,
    ImageSpec,
    RunSpec,
    choose_backend,
)
from tests.backend_tasks import MODEL_KEY, run, sh
from tests.backend_tasks import task as shared_task

HOST = "host:"  # what prepare_image gives for an image reference
IS_ROOT = os.geteuid() == 0
# As root, chmod does not stop the process: the backend then runs it as nobody.
RUN_AS = (65534, 65534) if IS_ROOT else None


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path is root's alone), for the
    cache and work dirs of a process that runs as nobody."""
    path = Path(tempfile.mkdtemp(prefix="consort-subprocess-test-")).resolve()
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def backend(open_dir: Path) -> AsyncIterator[SubprocessBackend]:
    backend = SubprocessBackend(open_dir / "cache", user=RUN_AS)
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def python_backend(open_dir: Path) -> SubprocessBackend:
    """The runner's own user: its interpreter may sit where nobody cannot reach it (here
    /root/.pyenv), so Python functions run without the user drop."""
    return SubprocessBackend(open_dir / "cache")


@pytest.fixture
def workdir(open_dir: Path) -> Path:
    root = open_dir / "task"
    (root / "input" / "models").mkdir(parents=True)
    (root / "input" / "models" / MODEL_KEY).write_text("41\n")
    (root / "output").mkdir()
    for path in (root, root / "input", root / "input" / "models"):
        path.chmod(0o755)
    return root


def task(workdir: Path, command: list[str], image: str = HOST, **fields: object) -> RunSpec:
    return shared_task(workdir, command, image, **fields)


# -- the contract -----------------------------------------------------------------------


async def test_io_json_lists_host_paths_and_is_the_last_argument(
    backend: SubprocessBackend, workdir: Path
) -> None:
    result, logs = await run(backend, task(workdir, sh('echo "$1"; echo "$CONSORT_IO"; pwd')))
    assert result.exit_code == 0, logs.text
    root = str(workdir)  # already without symlinks (made by mkdtemp under /tmp)
    io_file = f"{root}/io.json"
    assert logs.text.split() == [io_file, io_file, root]
    document = read_json(io_file)
    assert document["inputs"][0] == {
        "identifier": "model", "kind": "MODEL", "key": MODEL_KEY,
        "path": f"{root}/input/models/{MODEL_KEY}",
    }
    assert document["outputs"][0]["path"] == f"{root}/output/model"


def read_json(path: str) -> Any:
    with open(path) as file:
        return json.load(file)


async def test_input_dir_is_read_only(backend: SubprocessBackend, workdir: Path) -> None:
    script = (
        f"cat input/models/{MODEL_KEY}; "
        f"echo 1 >> input/models/{MODEL_KEY} && exit 3; "
        "touch input/new && exit 4; "
        "echo refused"
    )
    result, logs = await run(backend, task(workdir, sh(script)))
    assert result.exit_code == 0, logs.text
    assert "41" in logs.text and "refused" in logs.text
    assert (workdir / "input" / "models" / MODEL_KEY).read_text() == "41\n"
    assert not (workdir / "input" / "new").exists()
    assert (workdir / "input" / "models" / MODEL_KEY).stat().st_mode & 0o222 == 0


async def test_output_is_collected_from_the_output_dir(
    backend: SubprocessBackend, workdir: Path
) -> None:
    script = (
        f"read n < input/models/{MODEL_KEY}; echo $((n + 1)) > output/model; "
        "echo 0.75 > output/performance"
    )
    result, logs = await run(backend, task(workdir, sh(script)))
    assert result.exit_code == 0, logs.text
    assert (workdir / "output" / "model").read_text() == "42\n"
    assert float((workdir / "output" / "performance").read_text()) == 0.75


@pytest.mark.skipif(not IS_ROOT, reason="dropping to another user needs root")
async def test_runs_as_the_configured_user(backend: SubprocessBackend, workdir: Path) -> None:
    result, logs = await run(backend, task(workdir, sh("id -u; id -g")))
    assert logs.text.split() == ["65534", "65534"]


async def test_environment_entrypoint_and_command_are_honoured(
    backend: SubprocessBackend, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSORT_RUNNER_SECRET", "must-not-leak")
    spec = task(
        workdir, ['echo "$GREETING $0 $# ${CONSORT_RUNNER_SECRET:-unset}"', "world"],
        entrypoint=["sh", "-c"], environment={"GREETING": "hello"},
    )
    result, logs = await run(backend, spec)
    assert result.exit_code == 0, logs.text
    assert logs.text.strip() == "hello world 1 unset"


async def test_python_is_the_runner_interpreter(
    python_backend: SubprocessBackend, workdir: Path
) -> None:
    command = ["python", "-c", "import sys, docker; print(sys.executable)"]
    result, logs = await run(python_backend, task(workdir, command))
    assert result.exit_code == 0, logs.text
    assert logs.text.strip() == sys.executable


def test_relative_arguments_resolve_in_the_function_dir(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("")
    argv = resolve_argv(["python3", "train.py", "--epochs", "2", "output/model"], tmp_path)
    assert argv == [sys.executable, str(tmp_path / "train.py"), "--epochs", "2", "output/model"]
    assert resolve_argv(["cat", "../etc/passwd"], tmp_path / "train.py")[1] == "../etc/passwd"


async def test_network_is_disabled_by_default(
    backend: SubprocessBackend, workdir: Path
) -> None:
    if not backend.isolates_network:
        pytest.skip("unshare --net is not available here (needs root)")
    script = "tail -n +3 /proc/net/dev | cut -d: -f1"
    result, logs = await run(backend, task(workdir, sh(script)))
    assert result.exit_code == 0, logs.text
    assert logs.text.split() == ["lo"]
    result, logs = await run(backend, task(workdir, sh(script), network=True))
    assert len(logs.text.split()) > 1 or logs.text.split() != ["lo"]


async def test_memory_limit_is_applied(backend: SubprocessBackend, workdir: Path) -> None:
    if not shutil.which("prlimit"):
        pytest.skip("prlimit is missing")
    spec = task(workdir, sh("ulimit -v"), memory_bytes=256 * 1024**2)
    result, logs = await run(backend, spec)
    assert logs.text.strip() == str(256 * 1024)  # kilobytes


async def test_logs_are_streamed_while_the_task_runs(
    backend: SubprocessBackend, workdir: Path
) -> None:
    result, logs = await run(backend, task(workdir, sh("echo first; sleep 1; echo second")))
    ended = result.started_at_monotonic + result.duration_s
    assert logs.text.split() == ["first", "second"]
    assert logs.chunks[0].strip() == b"first"
    assert logs.arrivals[0] < ended - 0.5


async def test_timeout_kills_the_task_and_its_children(
    backend: SubprocessBackend, workdir: Path
) -> None:
    started = time.monotonic()
    result, _ = await run(backend, task(workdir, sh("sleep 30 & sleep 30; wait"), timeout_s=1))
    assert result.timed_out and not result.canceled
    assert time.monotonic() - started < 4
    assert result.exit_code == 137


async def test_cancel_stops_the_task_within_5_seconds(
    backend: SubprocessBackend, workdir: Path
) -> None:
    cancel = asyncio.Event()
    running = asyncio.create_task(run(backend, task(workdir, sh("echo started; sleep 30")), cancel))
    await asyncio.sleep(0.5)
    asked = time.monotonic()
    cancel.set()
    result, logs = await running
    assert time.monotonic() - asked < 5
    assert result.canceled and "started" in logs.text


async def test_leftover_background_processes_do_not_hold_the_task(
    backend: SubprocessBackend, workdir: Path
) -> None:
    started = time.monotonic()
    result, _ = await run(backend, task(workdir, sh("sleep 30 & echo done")))
    assert result.exit_code == 0
    assert time.monotonic() - started < 3


async def test_exit_code_is_reported(backend: SubprocessBackend, workdir: Path) -> None:
    result, logs = await run(backend, task(workdir, sh("echo failing; exit 1")))
    assert result.exit_code == 1 and "failing" in logs.text


async def test_missing_command_fails_fast(backend: SubprocessBackend, workdir: Path) -> None:
    result, logs = await run(backend, task(workdir, ["no-such-command"]))
    assert result.exit_code == 127
    assert result.error == "command not found: no-such-command"
    assert "no-such-command" in logs.text


# -- function images --------------------------------------------------------------------


def zip_archive(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return path


async def test_dockerfile_archive_is_unpacked_once_and_its_files_resolve(
    python_backend: SubprocessBackend, workdir: Path, open_dir: Path
) -> None:
    backend = python_backend
    archive = zip_archive(open_dir / "function.zip", {
        "Dockerfile": "FROM python:3.11\nCOPY . /app\n",
        "helper.py": "ANSWER = 1\n",
        "train.py": (
            "import json, os, sys\n"
            "import helper\n"
            "io = json.load(open(sys.argv[-1]))\n"
            "model = io['inputs'][0]['path']\n"
            "out = io['outputs'][0]['path']\n"
            "open(out, 'w').write(str(int(open(model).read()) + helper.ANSWER))\n"
            "print(os.environ['CONSORT_FUNCTION_DIR'] == os.path.dirname(__file__))\n"
        ),
    })
    spec = ImageSpec(str(uuid.uuid4()), ImageSourceKind.DOCKERFILE_ARCHIVE, None, archive, None)
    image = await backend.prepare_image(spec)
    assert image.startswith("dir:")
    function_dir = Path(image.removeprefix("dir:"))
    (function_dir / "marker").write_text("unpacked once")
    # Again, and from a restarted runner sharing the cache: the same directory, kept.
    assert await backend.prepare_image(spec) == image
    restarted = SubprocessBackend(backend.cache_dir)
    assert await restarted.prepare_image(spec) == image
    assert (function_dir / "marker").exists()

    result, logs = await run(backend, task(workdir, ["python", "train.py"], image=image))
    assert result.exit_code == 0, logs.text
    assert logs.text.strip() == "True"
    assert (workdir / "output" / "model").read_text() == "42"


async def test_unsafe_archive_is_a_build_error(
    backend: SubprocessBackend, tmp_path: Path
) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../escape.py")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    spec = ImageSpec("f", ImageSourceKind.DOCKERFILE_ARCHIVE, "0" * 64, archive, None)
    with pytest.raises(BuildError, match="archive refused"):
        await backend.prepare_image(spec)
    assert not (tmp_path / "escape.py").exists()


async def test_image_tarball_needs_a_docker_engine(
    backend: SubprocessBackend, tmp_path: Path
) -> None:
    spec = ImageSpec("f", ImageSourceKind.IMAGE_TARBALL, "0" * 64, tmp_path / "image.tar", None)
    with pytest.raises(BuildError, match="needs a Docker engine"):
        await backend.prepare_image(spec)


async def test_image_reference_runs_the_command_on_the_host(
    backend: SubprocessBackend, workdir: Path
) -> None:
    spec = ImageSpec("f", ImageSourceKind.IMAGE_REFERENCE, None, None, "busybox:latest")
    image = await backend.prepare_image(spec)
    result, logs = await run(backend, task(workdir, ["echo", "on the host"], image=image))
    assert result.exit_code == 0 and logs.text.startswith("on the host ")


def test_choose_backend_falls_back_to_subprocess_without_an_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    choice = choose_backend(BackendOptions(cache_dir=tmp_path))
    assert choice.backend.name == "subprocess"
    assert choice.reason.startswith("subprocess: no Docker engine (")
    with pytest.raises(RuntimeError, match="docker backend was asked for"):
        choose_backend(BackendOptions(prefer="docker"))
