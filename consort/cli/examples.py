"""`consort example fl|oasis`: two examples that run for real against a running Consort.

- `fl`, federated learning (Substra style): three organizations, org-1..3, each hold a
  part of scikit-learn's breast-cancer dataset, as train samples and a test split (CSV
  files written under the data directory, registered by location and checksum, read by
  the opener `examples/fl/opener.py`). The functions of `examples/fl/function/` (one
  Dockerfile archive) train a logistic regression at each organization, org-1 averages
  the three models (FedAvg) and each organization tests the average on its test split,
  round after round; the accuracies are the plan's performances.
- `oasis`, an RD-OASIS algorithm: an image reference with an entrypoint, a command and
  environment variables, run on a dataset of the text files of `examples/oasis/data/`;
  it writes upper-cased copies and word counts as its output dataset, and a log.

Both create their organizations when absent and keep the tokens under
`$CONSORT_HOME/examples/tokens.json` (per API URL), and register their assets under keys
derived from their content, so a second run reuses them and adds only a new compute plan.
`run_fl` and `run_oasis` are what the commands (and the tests) run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from app.config import Settings
from app.storage.checksums import sample_checksum
from consort import models as m
from consort.cli._common import err, handled, out
from consort.cli.assets import SKIPPED, archive_folder
from consort.cli.compute import follow_plan
from consort.client import Client
from consort.errors import Conflict, ConnectionFailed, NotFound, Unauthorized

A = TypeVar("A")
Say = Callable[[str], None]

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
KEY_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/consort/examples")
DEFAULT_URL = "http://127.0.0.1:8000"

FL_ORGS = ("org-1", "org-2", "org-3")
AGGREGATOR = "org-1"
SEED = 2024
TRAIN_FRACTION = 0.75
TRAIN_SAMPLES_PER_ORG = 2
DATA_INPUTS = {"opener": {"kind": "DATA_MANAGER"},
               "datasamples": {"kind": "DATA_SAMPLE", "multiple": True}}
MODEL_OUTPUT = {"model": {"kind": "MODEL"}}
# name → (inputs, outputs); the command is `python -m fedavg <name>`.
FL_FUNCTIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "train": (DATA_INPUTS | {"model": {"kind": "MODEL", "optional": True}}, MODEL_OUTPUT),
    "aggregate": ({"models": {"kind": "MODEL", "multiple": True}}, MODEL_OUTPUT),
    "test": (DATA_INPUTS | {"model": {"kind": "MODEL"}},
             {"accuracy": {"kind": "PERFORMANCE"}}),
}
PUBLIC = {"process": {"public": True, "authorized_ids": []}}

OASIS_ORG = "org-1"
# POSIX sh only, so that it runs in busybox and on the host (subprocess backend) alike.
OASIS_SCRIPT = """\
cd input || exit 1
find . -type f | sort | while IFS= read -r f; do
  name=${f#./}
  mkdir -p "../output/$(dirname "$name")"
  tr 'a-z' 'A-Z' < "$f" > "../output/$name$SUFFIX"
  words=$(( $(wc -w < "$f") ))
  echo "$name $words" >> ../output/word-counts.txt
  echo "$name: $words words"
done
echo "converted $(find ../output -type f -name "*$SUFFIX" | wc -l | tr -d ' ') files"
"""
OASIS_ENVIRONMENT = {"SUFFIX": ".upper", "LC_ALL": "C"}


class ExampleFailed(Exception):
    """The example's compute plan did not end DONE; the message holds the failed logs."""


# -- shared: organizations, keys, waiting ----------------------------------------------------


def examples_dir() -> Path:
    if not EXAMPLES_DIR.is_dir():
        raise ValueError(f"{EXAMPLES_DIR} is missing: the examples run from a source checkout "
                         "of Consort (pip install -e '.[examples]')")
    return EXAMPLES_DIR


def example_key(*parts: str) -> str:
    """A key derived from what the asset is, so a second run finds the first one's."""
    return str(uuid.uuid5(KEY_NAMESPACE, "/".join(parts)))


def default_admin_token(home: Path) -> str:
    """CONSORT_ADMIN_TOKEN, else the token `consort serve` saved under CONSORT_HOME."""
    token = os.environ.get("CONSORT_ADMIN_TOKEN") or ""
    path = home / "admin-token"
    if not token and path.is_file():
        token = path.read_text().strip()
    if not token:
        raise ValueError(f"no administrator token: give --admin-token, set CONSORT_ADMIN_TOKEN, "
                         f"or start `consort serve` once (it saves {path})")
    return token


def _token_works(url: str, token: str, org: str) -> bool:
    try:
        with Client(url, token) as api:
            return api.me().org == org
    except Unauthorized:
        return False


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def organizations(url: str, admin_token: str, orgs: Sequence[str], home: Path) -> dict[str, str]:
    """A working token per organization: the stored one, else a new one (registering the
    organization when it is absent). Tokens are kept in `home/examples/tokens.json`."""
    store = home / "examples" / "tokens.json"
    saved: dict[str, dict[str, str]] = json.loads(store.read_text()) if store.is_file() else {}
    tokens = saved.setdefault(url.rstrip("/"), {})
    with Client(url, admin_token) as admin:
        for org in orgs:
            if org in tokens and _token_works(url, tokens[org], org):
                continue
            try:
                tokens[org] = admin.register_organization(org, f"Example {org}").token.token
            except Conflict:
                tokens[org] = admin.issue_token("consort example", org=org).token
            _write_private(store, json.dumps(saved, indent=2) + "\n")
    return {org: tokens[org] for org in orgs}


def _exists(get: Callable[[str], A], key: str) -> bool:
    try:
        get(key)
    except NotFound:
        return False
    return True


def _parent(identifier: str, task: str, output: str = "model") -> dict[str, str]:
    return {"identifier": identifier, "parent_task_key": task, "parent_output": output}


def _wait(api: Client, plan: m.ComputePlan, live: bool, timeout: float) -> m.ComputePlan:
    if live:
        return follow_plan(api, plan, timeout)
    return api.wait_compute_plan(plan.key, timeout=timeout)


def failure_report(url: str, tokens: Mapping[str, str], plan: m.ComputePlan) -> str:
    """What went wrong: the failed tasks and the tail of their logs (read as their worker)."""
    lines = [f"compute plan {plan.key} ended {plan.status}"]
    with Client(url, next(iter(tokens.values()))) as api:
        failed = list(api.iter_tasks(compute_plan_key=plan.key, status="FAILED"))
    for task in failed:
        lines.append(f"task {task.key} ({task.category} at {task.worker}) failed: "
                     f"{task.error_type}; end of its log:")
        if task.worker in tokens:
            with Client(url, tokens[task.worker]) as worker:
                lines.append(worker.read_logs(task.key, tail=20))
    return "\n".join(lines)


# -- federated learning ----------------------------------------------------------------------


@dataclass(frozen=True)
class FlResult:
    plan: m.ComputePlan
    # round (from 1) → organization → accuracy on its test split
    accuracy: dict[int, dict[str, float]]

    def mean(self, round_: int) -> float:
        values = self.accuracy[round_].values()
        return sum(values) / len(values)


def write_fl_data(data_dir: Path, orgs: Sequence[str] = FL_ORGS,
                  seed: int = SEED) -> dict[str, dict[str, Path]]:
    """Split the breast-cancer dataset between the organizations, deterministically: for
    each, {"train-1": csv, "train-2": csv, "test": csv} under `data_dir/<org>/`."""
    try:
        import numpy as np
        from sklearn.datasets import load_breast_cancer
    except ImportError as exc:
        raise ValueError("the federated example needs numpy and scikit-learn: "
                         "pip install -e '.[examples]'") from exc
    bunch = load_breast_cancer()
    names = [str(name).replace(" ", "_") for name in bunch.feature_names]
    header = ",".join([*names, "target"])
    order = np.random.default_rng(seed).permutation(len(bunch.target))
    files: dict[str, dict[str, Path]] = {}
    for org, part in zip(orgs, np.array_split(order, len(orgs)), strict=True):
        cut = int(len(part) * TRAIN_FRACTION)
        pieces = {f"train-{i + 1}": rows for i, rows in
                  enumerate(np.array_split(part[:cut], TRAIN_SAMPLES_PER_ORG))}
        pieces["test"] = part[cut:]
        files[org] = {}
        for name, rows in pieces.items():
            path = data_dir / org / f"{name}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savetxt(path, np.column_stack([bunch.data[rows], bunch.target[rows]]),
                       delimiter=",", header=header, comments="", fmt="%.10g")
            files[org][name] = path
    return files


@dataclass(frozen=True)
class OrgData:
    manager: str
    train: list[str]
    test: str

    def inputs(self, samples: Sequence[str]) -> list[dict[str, str]]:
        return [{"identifier": "opener", "asset_key": self.manager}] + [
            {"identifier": "datasamples", "asset_key": key} for key in samples]


def register_fl_data(api: Client, org: str, files: Mapping[str, Path], opener: Path) -> OrgData:
    """The organization's data manager and samples. Only the organization and org-1, which
    builds the compute plan, may process them; the data files never leave the owner."""
    manager = example_key("fl", org, "data-manager", sample_checksum(opener))
    if not _exists(api.get_data_manager, manager):
        permissions = {"process": {"public": False, "authorized_ids": [org, AGGREGATOR]}}
        api.add_data_manager(f"breast cancer at {org}", opener=opener, key=manager,
                             permissions=permissions,
                             description="scikit-learn's breast-cancer dataset, a part of it")
    samples: dict[str, str] = {}
    for name, path in files.items():
        location = str(path.resolve())
        checksum = sample_checksum(path)
        samples[name] = example_key("fl", org, name, checksum, location)
        if not _exists(api.get_data_sample, samples[name]):
            api.add_data_sample([manager], checksum, location, metadata={"split": name},
                                key=samples[name])
    return OrgData(manager, [k for name, k in samples.items() if name != "test"],
                   samples["test"])


def register_fl_functions(api: Client, folder: Path) -> dict[str, str]:
    """train, aggregate and test: one Dockerfile archive of `folder`, three commands."""
    digest = hashlib.sha256(b"".join(
        p.relative_to(folder).as_posix().encode() + b"\0" + p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not SKIPPED & set(p.relative_to(folder).parts))).hexdigest()
    keys = {name: example_key("fl", "function", name, digest) for name in FL_FUNCTIONS}
    missing = [name for name, key in keys.items() if not _exists(api.get_function, key)]
    if missing:
        with tempfile.TemporaryDirectory(prefix="consort-example-") as scratch:
            archive = archive_folder(folder, Path(scratch) / "fedavg.tar.gz")
            image = api.upload_file(archive).checksum
        for name in missing:
            inputs, outputs = FL_FUNCTIONS[name]
            api.add_function(f"fedavg {name}", image_source="DOCKERFILE_ARCHIVE", image=image,
                             inputs=inputs, outputs=outputs,
                             command=["python", "-m", "fedavg", name], permissions=PUBLIC,
                             key=keys[name], description=f"FedAvg example: {name}")
    return keys


def fl_tasks(functions: Mapping[str, str], data: Mapping[str, OrgData], rounds: int,
             ) -> tuple[list[dict[str, Any]], dict[str, tuple[int, str]]]:
    """Per round: a train at each organization (from the previous aggregate after the
    first round), the aggregate at org-1, a test at each organization. Returns the tasks
    and, for each test task, its (round, organization)."""
    shared = {"process": {"public": False, "authorized_ids": list(data)}}
    tasks: list[dict[str, Any]] = []
    tests: dict[str, tuple[int, str]] = {}
    previous: str | None = None
    for round_ in range(1, rounds + 1):
        trains = []
        for held in data.values():
            key = str(uuid.uuid4())
            warm = [_parent("model", previous)] if previous else []
            tasks.append({"key": key, "function_key": functions["train"], "category": "TRAIN",
                          "inputs": held.inputs(held.train) + warm,
                          "outputs": {"model": {"permissions": shared}},
                          "metadata": {"round": str(round_)}})
            trains.append(key)
        previous = str(uuid.uuid4())
        tasks.append({"key": previous, "function_key": functions["aggregate"],
                      "category": "AGGREGATE", "worker": AGGREGATOR,
                      "inputs": [_parent("models", key) for key in trains],
                      "outputs": {"model": {"permissions": shared}},
                      "metadata": {"round": str(round_)}})
        for org, held in data.items():
            key = str(uuid.uuid4())
            tasks.append({"key": key, "function_key": functions["test"], "category": "TEST",
                          "inputs": held.inputs([held.test]) + [_parent("model", previous)],
                          "metadata": {"round": str(round_)}})
            tests[key] = (round_, org)
    return tasks, tests


def run_fl(url: str, admin_token: str, home: Path, *, rounds: int = 5,
           data_dir: Path | None = None, live: bool = False, timeout: float = 900,
           say: Say = lambda _: None) -> FlResult:
    """The federated example from start to end; ExampleFailed unless its plan is DONE."""
    folder = examples_dir() / "fl"
    tokens = organizations(url, admin_token, FL_ORGS, home)
    say(f"organizations {', '.join(FL_ORGS)} ready")
    files = write_fl_data(data_dir or home / "examples" / "fl" / "data")
    data = {}
    for org in FL_ORGS:
        with Client(url, tokens[org]) as api:
            data[org] = register_fl_data(api, org, files[org], folder / "opener.py")
    say("data registered: " + ", ".join(
        f"{org} {len(held.train)} train + 1 test samples" for org, held in data.items()))
    with Client(url, tokens[AGGREGATOR]) as api:
        functions = register_fl_functions(api, folder / "function")
        say("functions registered: " + ", ".join(functions))
        tasks, tests = fl_tasks(functions, data, rounds)
        registered = api.add_compute_plan(f"FedAvg, {rounds} rounds", tasks, tag="example-fl")
        say(f"compute plan {registered.plan.key}: {len(tasks)} tasks")
        final = _wait(api, registered.plan, live, timeout)
        if final.status != "DONE":
            raise ExampleFailed(failure_report(url, tokens, final))
        accuracy: dict[int, dict[str, float]] = {r: {} for r in range(1, rounds + 1)}
        for perf in api.get_compute_plan_performances(final.key):
            round_, org = tests[perf.compute_task_key]
            accuracy[round_][org] = perf.value
    return FlResult(final, accuracy)


# -- RD-OASIS --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OasisResult:
    plan: m.ComputePlan
    task_key: str
    files: dict[str, bytes]  # the output dataset, path → content
    output_dir: Path  # where those files were downloaded
    log: str


def run_oasis(url: str, admin_token: str, home: Path, *, image: str = "busybox:latest",
              output_dir: Path | None = None, live: bool = False, timeout: float = 600,
              say: Say = lambda _: None) -> OasisResult:
    """The OASIS example from start to end; ExampleFailed unless its task is DONE."""
    data_dir = examples_dir() / "oasis" / "data"
    tokens = organizations(url, admin_token, [OASIS_ORG], home)
    with Client(url, tokens[OASIS_ORG]) as api:
        dataset = example_key("oasis", "dataset", sample_checksum(data_dir))
        if not _exists(api.get_dataset, dataset):
            files = {p.relative_to(data_dir).as_posix(): p
                     for p in sorted(data_dir.rglob("*")) if p.is_file()}
            api.add_dataset("example texts", files, key=dataset)
        say(f"dataset {dataset} registered")
        definition = json.dumps([image, OASIS_SCRIPT, OASIS_ENVIRONMENT], sort_keys=True)
        function = example_key("oasis", "function", definition)
        if not _exists(api.get_function, function):
            api.add_function("upper-case and count words", image=image,
                             entrypoint=["sh", "-c"], command=[OASIS_SCRIPT],
                             environment=OASIS_ENVIRONMENT, permissions=PUBLIC,
                             inputs={"texts": {"kind": "DATASET"}},
                             outputs={"result": {"kind": "DATASET"}}, key=function)
        say(f"algorithm {function} registered (image {image})")
        task = str(uuid.uuid4())
        registered = api.add_compute_plan("OASIS example", [{
            "key": task, "function_key": function, "worker": OASIS_ORG,
            "inputs": [{"identifier": "texts", "asset_key": dataset}]}], tag="example-oasis")
        final = _wait(api, registered.plan, live, timeout)
        log = api.read_logs(task)
        if final.status != "DONE":
            raise ExampleFailed(failure_report(url, tokens, final))
        target = output_dir or home / "examples" / "oasis" / "output" / task
        contents: dict[str, bytes] = {}
        for produced in api.iter_datasets(compute_task_key=task):
            for item in produced.files:
                path = str(item["path"])
                saved = api.download_dataset_file(produced.key, path, target / path)
                contents[path] = saved.read_bytes()
    return OasisResult(final, task, contents, target, log)


# -- the commands ----------------------------------------------------------------------------

example = typer.Typer(help="Examples that run for real against a running `consort serve`.",
                      no_args_is_help=True)
UrlOption = Annotated[str, typer.Option("--url", envvar="CONSORT_URL", help="The API.")]
AdminOption = Annotated[str | None, typer.Option(
    "--admin-token", help="Administrator token (default: CONSORT_ADMIN_TOKEN, else "
    "$CONSORT_HOME/admin-token); used to create the example's organizations.")]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the plan.")]


def _say(message: str) -> None:
    err.print(f"[green]✓[/] {message}", highlight=False)


def _run(action: Callable[[Path, str], A], url: str, admin_token: str | None) -> A:
    home = Settings.from_env().home
    token = admin_token or default_admin_token(home)
    try:
        return action(home, token)
    except ExampleFailed as exc:
        err.print(f"[red]the example failed:[/] {exc}", markup=True, highlight=False)
    except ConnectionFailed as exc:
        err.print(f"[red]error:[/] {exc.detail}\nIs `consort serve` running at {url}?",
                  markup=True, highlight=False)
    raise typer.Exit(1)


def fl_table(result: FlResult) -> Table:
    orgs = sorted({org for per_org in result.accuracy.values() for org in per_org})
    table = Table("round", *orgs, "mean", title="Accuracy on each organization's test split")
    for round_, per_org in sorted(result.accuracy.items()):
        table.add_row(str(round_), *(f"{per_org[org]:.4f}" for org in orgs),
                      f"{result.mean(round_):.4f}")
    return table


@example.command("fl")
@handled
def fl_command(
    url: UrlOption = DEFAULT_URL, admin_token: AdminOption = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=50)] = 5,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Where the organizations' CSV samples are written (default: "
        "$CONSORT_HOME/examples/fl/data)")] = None,
    timeout: TimeoutOption = 900,
) -> None:
    """Federated learning: 3 organizations, FedAvg of a logistic regression on
    scikit-learn's breast-cancer data; prints the test accuracy per round."""
    started = time.monotonic()
    result = _run(lambda home, token: run_fl(
        url, token, home, rounds=rounds, data_dir=data_dir, live=True, timeout=timeout,
        say=_say), url, admin_token)
    out.print(fl_table(result))
    out.print(f"compute plan {result.plan.key} DONE in {time.monotonic() - started:.1f} s",
              markup=False)


@example.command("oasis")
@handled
def oasis_command(
    url: UrlOption = DEFAULT_URL, admin_token: AdminOption = None,
    image: Annotated[str, typer.Option(
        "--image", help="The algorithm's image (any with a POSIX sh; on a runner without "
        "Docker the command runs on the host)")] = "busybox:latest",
    output_dir: Annotated[Path | None, typer.Option(
        "--output-dir", help="Where the output dataset is downloaded (default: "
        "$CONSORT_HOME/examples/oasis/output/<task key>)")] = None,
    timeout: TimeoutOption = 600,
) -> None:
    """RD-OASIS: an algorithm (image, entrypoint, command, environment) on a dataset of
    text files; prints the output dataset and the log."""
    result = _run(lambda home, token: run_oasis(
        url, token, home, image=image, output_dir=output_dir, live=True, timeout=timeout,
        say=_say), url, admin_token)
    out.print(f"[bold]Output dataset[/] (downloaded to {result.output_dir}):")
    for path, content in sorted(result.files.items()):
        out.print(f"[cyan]{path}[/]")
        out.print(content.decode(errors="replace").rstrip("\n"), markup=False)
    out.print(f"[bold]Log of task {result.task_key}:[/]")
    out.print(result.log.rstrip("\n"), markup=False)


def install(app: typer.Typer) -> None:
    app.add_typer(example, name="example")
