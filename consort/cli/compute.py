"""`consort plan|task`: run a compute plan from a YAML file, follow it, read its tasks.

A plan file (plan.yaml):

    name: round 1
    tag: demo                       # optional; also key, metadata, batch_size
    functions:                      # aliases: a function key, or {name: ...} to look up
      train: 5b0e...                #   one of your functions by name
      test: {name: test}
    assets:                         # aliases for data managers, samples, models, datasets
      dm-a: 9c41...
    tasks:
      - name: train-a               # a name other tasks refer to
        function: train
        worker: org-a               # optional with a data manager input
        inputs:
          opener: dm-a              # an asset key or alias
          datasamples: [3d1a..., 77fe...]
          model: {task: train-0, output: model}   # another task's output
        outputs:
          model: {permissions: {process: {public: false, authorized_ids: [org-b]}}}
"""

from __future__ import annotations

import collections
import tempfile
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.live import Live
from rich.table import Table
from rich.tree import Tree

from consort import models as m
from consort.cli._common import (
    JsonOption,
    WhereOption,
    client,
    counting,
    err,
    handled,
    out,
    parse_where,
    print_json,
    show_one,
    show_rows,
)
from consort.client import Client

STATUSES = ("WAITING", "TODO", "DOING", "DONE", "FAILED", "CANCELED")
STYLE = {"WAITING": "dim", "TODO": "cyan", "DOING": "yellow", "DONE": "green",
         "FAILED": "red", "CANCELED": "magenta"}
TASK_COLUMNS = ["key", "rank", "status", "worker", "category", "compute_plan_key"]

plan = typer.Typer(help="Compute plans.", no_args_is_help=True)
task = typer.Typer(help="Compute tasks.", no_args_is_help=True)


# --- the plan file -----------------------------------------------------------------------

class PlanFileError(ValueError):
    """The plan file does not describe a plan."""


def _function_keys(api: Client, spec: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    by_name: dict[str, str] | None = None
    for alias, ref in (spec.get("functions") or {}).items():
        if isinstance(ref, dict) and "name" in ref:
            if by_name is None:
                me = api.me().org
                by_name = {f.name: f.key for f in api.iter_functions(owner=me)}
            if ref["name"] not in by_name:
                raise PlanFileError(f"no function named {ref['name']!r} (alias {alias!r})")
            found[alias] = by_name[ref["name"]]
        else:
            found[alias] = str(ref)
    return found


def plan_tasks(spec: dict[str, Any], functions: dict[str, str], plan_key: str
               ) -> list[dict[str, Any]]:
    """The plan file's tasks as API tasks: names become keys, aliases asset keys."""
    assets = {str(k): str(v) for k, v in (spec.get("assets") or {}).items()}
    entries = spec.get("tasks") or []
    keys = {}
    for i, entry in enumerate(entries):
        name = str(entry.get("name", f"task-{i}"))
        if name in keys:
            raise PlanFileError(f"two tasks are named {name!r}")
        # Keys derived from the plan key: running the same file again with the same plan
        # key is refused as a duplicate instead of making a second copy.
        keys[name] = str(uuid.uuid5(uuid.UUID(plan_key), name))
    tasks = []
    for i, entry in enumerate(entries):
        name = str(entry.get("name", f"task-{i}"))
        ref = str(entry.get("function", ""))
        inputs = []
        for identifier, value in (entry.get("inputs") or {}).items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    parent = str(item.get("task", ""))
                    if parent not in keys:
                        raise PlanFileError(f"task {name!r}: input {identifier!r} names an "
                                            f"unknown task {parent!r}")
                    inputs.append({"identifier": identifier, "parent_task_key": keys[parent],
                                   "parent_output": str(item.get("output", identifier))})
                else:
                    inputs.append({"identifier": identifier,
                                   "asset_key": assets.get(str(item), str(item))})
        task_spec = {"key": keys[name], "function_key": functions.get(ref, ref),
                     "inputs": inputs, "outputs": entry.get("outputs") or {},
                     "metadata": {"name": name, **(entry.get("metadata") or {})}}
        for field in ("worker", "category", "logs_permission"):
            if entry.get(field) is not None:
                task_spec[field] = entry[field]
        tasks.append(task_spec)
    return tasks


def _status_table(plan_name: str, counts: dict[str, int]) -> Table:
    total = sum(counts.values())
    table = Table(title=f"{plan_name}: {counts.get('DONE', 0)}/{total} done")
    for status in STATUSES:
        table.add_column(status, justify="right", style=STYLE[status])
    table.add_row(*(str(counts.get(s, 0)) for s in STATUSES))
    return table


def follow_plan(api: Client, registered: m.ComputePlan, timeout: float | None) -> m.ComputePlan:
    """A live table of task counts per status until the plan is final."""
    with Live(_status_table(registered.name, registered.status_counts), console=err,
              refresh_per_second=4) as live:
        def update(counts: dict[str, int]) -> None:
            live.update(_status_table(registered.name, counts))

        return api.wait_compute_plan(registered.key, timeout=timeout, on_progress=update)


@plan.command("run")
@handled
def plan_run(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="plan.yaml")],
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Register and return")] = False,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds to wait")] = None,
    as_json: JsonOption = False,
) -> None:
    """Register a whole compute plan from a YAML file, then follow it until it ends."""
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict) or not spec.get("name"):
        raise PlanFileError(f"{path}: a plan file needs at least a name")
    plan_key = str(spec.get("key") or uuid.uuid4())
    with client() as api:
        tasks = plan_tasks(spec, _function_keys(api, spec), plan_key)
        with counting("registering tasks") as progress:
            registered = api.add_compute_plan(
                str(spec["name"]), tasks, key=plan_key, tag=str(spec.get("tag", "")),
                metadata={str(k): str(v) for k, v in (spec.get("metadata") or {}).items()},
                batch_size=batch_size or int(spec.get("batch_size", 1000)),
                on_progress=progress)
        err.print(f"Registered plan {plan_key} with {len(registered.task_keys)} tasks",
                  markup=False)
        if no_wait:
            _report(registered.plan, as_json, waited=False)
            return
        final = follow_plan(api, registered.plan, timeout)
    _report(final, as_json, waited=True)


def _report(final: m.ComputePlan, as_json: bool, waited: bool) -> None:
    """The plan's status; after waiting, exit 1 unless it is DONE."""
    if as_json:
        print_json(final)
    else:
        out.print(f"{final.key} {final.status}", markup=False)
    if waited and final.status != "DONE":
        raise typer.Exit(1)


@plan.command("list")
@handled
def plan_list(
    owner: Annotated[str | None, typer.Option("--owner")] = None,
    status: Annotated[str | None, typer.Option("--status")] = None,
    where: WhereOption = [],  # noqa: B006
    as_json: JsonOption = False,
) -> None:
    """Compute plans, oldest first."""
    with client() as api:
        show_rows(api.iter_compute_plans(owner=owner, status=status,
                                         metadata=parse_where(where)),
                  ["key", "name", "owner", "status", "task_count", "created_at"], as_json)


@plan.command("show")
@handled
def plan_show(key: str, as_json: JsonOption = False) -> None:
    """One compute plan with its counts per status."""
    with client() as api:
        show_one(api.get_compute_plan(key), as_json)


@plan.command("wait")
@handled
def plan_wait(key: str, timeout: Annotated[float | None, typer.Option("--timeout")] = None,
              as_json: JsonOption = False) -> None:
    """Follow a plan until it ends (exit 1 unless it is DONE)."""
    with client() as api:
        final = follow_plan(api, api.get_compute_plan(key), timeout)
    _report(final, as_json, waited=True)


@plan.command("cancel")
@handled
def plan_cancel(key: str) -> None:
    """Cancel a plan and every task of it that is not final."""
    with client() as api:
        out.print(f"{key} {api.cancel_compute_plan(key).status}", markup=False)


def graph_dot(graph: m.PlanGraph) -> str:
    lines = ["digraph plan {", "  rankdir=LR;"]
    for node in graph.nodes:
        lines.append(f'  "{node.key}" [label="{node.key[:8]}\\n{node.category} '
                     f'{node.worker}\\n{node.status}"];')
    for edge in graph.edges:
        lines.append(f'  "{edge.source}" -> "{edge.target}" [label="{edge.output}"];')
    lines.append("}")
    return "\n".join(lines)


def graph_tree(graph: m.PlanGraph, title: str) -> Tree:
    """Ranks as branches, each task with the parents it reads from."""
    parents: dict[str, list[str]] = collections.defaultdict(list)
    for edge in graph.edges:
        parents[edge.target].append(f"{edge.source[:8]}.{edge.output}")
    tree = Tree(title)
    ranks: dict[int, Tree] = {}
    for node in graph.nodes:
        if node.rank not in ranks:
            ranks[node.rank] = tree.add(f"rank {node.rank}")
        inputs = f" ← {', '.join(parents[node.key])}" if parents[node.key] else ""
        ranks[node.rank].add(f"[{STYLE.get(node.status, '')}]{node.key[:8]} {node.category} "
                             f"@{node.worker} {node.status}[/]{inputs}")
    return tree


@plan.command("graph")
@handled
def plan_graph(
    key: str,
    dot: Annotated[bool, typer.Option("--dot", help="Graphviz output")] = False,
    as_json: JsonOption = False,
) -> None:
    """The plan's task graph, by rank (or as Graphviz dot)."""
    with client() as api:
        graph = api.get_compute_plan_graph(key)
    if as_json:
        print_json(graph)
    elif dot:
        print(graph_dot(graph))
    else:
        out.print(graph_tree(graph, f"plan {key}"))


@task.command("list")
@handled
def task_list(
    plan_key: Annotated[str | None, typer.Option("--plan", help="Compute plan key")] = None,
    worker: Annotated[str | None, typer.Option("--worker")] = None,
    status: Annotated[str | None, typer.Option("--status")] = None,
    rank: Annotated[int | None, typer.Option("--rank")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1)] = None,
    where: WhereOption = [],  # noqa: B006
    as_json: JsonOption = False,
) -> None:
    """Tasks in registration order, filtered."""
    with client() as api:
        rows = api.iter_tasks(compute_plan_key=plan_key, worker=worker, status=status,
                              rank=rank, metadata=parse_where(where))
        if limit is not None:
            rows = (t for _, t in zip(range(limit), rows, strict=False))
        show_rows(rows, TASK_COLUMNS, as_json)


@task.command("show")
@handled
def task_show(key: str, as_json: JsonOption = False) -> None:
    """One task."""
    with client() as api:
        show_one(api.get_task(key), as_json)


@task.command("failure")
@handled
def task_failure(
    key: str,
    logs: Annotated[bool, typer.Option("--logs", help="Print the log kept with it")] = False,
    as_json: JsonOption = False,
) -> None:
    """Why a FAILED task failed: error type, message, and the log the runner kept."""
    with client() as api:
        report = api.get_failure_report(key)
        if not logs:
            show_one(report, as_json)
            return
        with tempfile.TemporaryDirectory() as folder:
            saved = api.download_failure_logs(key, Path(folder) / "log")
            print(saved.read_text(errors="replace"), end="")


@task.command("logs")
@handled
def task_logs(
    key: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Until the task ends")] = False,
    tail: Annotated[int | None, typer.Option("--tail", min=1)] = None,
) -> None:
    """A task's log (stdout and stderr of its container)."""
    with client() as api:
        if not follow:
            print(api.read_logs(key, tail=tail), end="")
            return
        for chunk in api.follow_logs(key):
            print(chunk, end="", flush=True)


def install(app: typer.Typer) -> None:
    app.add_typer(plan, name="plan")
    app.add_typer(task, name="task")
