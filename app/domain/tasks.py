"""Compute tasks: batch registration, rank, worker, status machine, outputs.

`register_tasks` checks a whole batch against the SPEC ("Registering tasks") and returns one
`TaskRegistered` per task, or raises: a batch is all or nothing. The status functions
implement "Task lifecycle": who may move a task where, and what follows automatically.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from app.domain.assets import (
    DataManagerInfo,
    DataSampleInfo,
    DatasetInfo,
    FunctionInfo,
    ModelInfo,
    TaskOutput,
)
from app.domain.errors import Conflict, Forbidden, InvalidCommand
from app.domain.events import DomainEvent
from app.domain.functions import InputKind, OutputKind
from app.domain.permissions import Permission, Permissions


class TaskStatus(enum.StrEnum):
    WAITING = "WAITING"
    TODO = "TODO"
    DOING = "DOING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELED = "CANCELED"

    @property
    def final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELED})


class TaskCategory(enum.StrEnum):
    TRAIN = "TRAIN"
    TEST = "TEST"
    AGGREGATE = "AGGREGATE"
    COMPOSITE = "COMPOSITE"
    PREDICT = "PREDICT"


class ErrorType(enum.StrEnum):
    BUILD = "BUILD"
    EXECUTION = "EXECUTION"
    INTERNAL = "INTERNAL"


# The composite task's head output stays with the worker whatever the request says.
COMPOSITE_HEAD_OUTPUT = "local"


@dataclasses.dataclass(frozen=True)
class TaskInput:
    """An input: an existing asset, or the output of a parent task."""

    identifier: str
    asset_key: str | None = None
    parent_task_key: str | None = None
    parent_output: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.asset_key is not None:
            return {"identifier": self.identifier, "asset_key": self.asset_key}
        return {
            "identifier": self.identifier,
            "parent_task_key": self.parent_task_key,
            "parent_output": self.parent_output,
        }


@dataclasses.dataclass(frozen=True)
class OutputRequest:
    permissions: Permissions | None = None
    transient: bool = False


@dataclasses.dataclass(frozen=True)
class TaskRequest:
    key: str
    function_key: str
    inputs: Sequence[TaskInput]
    outputs: Mapping[str, OutputRequest] = dataclasses.field(default_factory=dict)
    worker: str | None = None
    category: TaskCategory | None = None
    logs_permission: Permission | None = None
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StoredTask:
    """What the rules need to know of a task that is already registered."""

    key: str
    owner: str
    worker: str
    rank: int
    status: TaskStatus
    compute_plan_key: str
    outputs: Mapping[str, TaskOutput]
    parent_task_keys: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PlanInfo:
    key: str
    owner: str
    canceled: bool = False


@dataclasses.dataclass
class RegistrationContext:
    """Everything stored that a batch refers to (loaded by the application layer)."""

    orgs: frozenset[str]
    plan: PlanInfo
    functions: Mapping[str, FunctionInfo]
    data_managers: Mapping[str, DataManagerInfo] = dataclasses.field(default_factory=dict)
    data_samples: Mapping[str, DataSampleInfo] = dataclasses.field(default_factory=dict)
    models: Mapping[str, ModelInfo] = dataclasses.field(default_factory=dict)
    datasets: Mapping[str, DatasetInfo] = dataclasses.field(default_factory=dict)
    tasks: Mapping[str, StoredTask] = dataclasses.field(default_factory=dict)
    # Keys of the batch that are already registered (as any asset): a retry, hence 409.
    existing_keys: frozenset[str] = frozenset()
    # Outputs whose files were deleted (transient, all consumers final): (task, identifier).
    disabled_outputs: frozenset[tuple[str, str]] = frozenset()


@dataclasses.dataclass(frozen=True)
class TaskRegistered(DomainEvent):
    asset_kind: ClassVar[str] = "compute_task"

    key: str
    compute_plan_key: str
    function_key: str
    owner: str
    worker: str
    rank: int
    status: str
    category: str
    inputs: list[dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    parent_task_keys: list[str]
    logs_permission: dict[str, Any]
    metadata: dict[str, str]


@dataclasses.dataclass(frozen=True)
class TaskStatusChanged(DomainEvent):
    asset_kind: ClassVar[str] = "compute_task"

    key: str
    compute_plan_key: str
    previous: str
    status: str
    error_type: str | None = None


def _bad(message: str, code: str) -> InvalidCommand:
    return InvalidCommand(message, code=code)


def register_tasks(
    requester: str, requests: Sequence[TaskRequest], ctx: RegistrationContext
) -> list[TaskRegistered]:
    """Check a batch against every registration rule; all tasks are accepted or none."""
    if ctx.plan.owner != requester:
        raise Forbidden(f"only {ctx.plan.owner} may add tasks to plan {ctx.plan.key}")
    if ctx.plan.canceled:
        raise _bad(f"compute plan {ctx.plan.key} is canceled", "plan_canceled")
    counts = Counter(r.key for r in requests)
    duplicated = sorted(k for k, n in counts.items() if n > 1)
    if duplicated:
        raise _bad(f"task key(s) repeated in the batch: {', '.join(duplicated)}", "duplicate_key")
    existing = sorted(ctx.existing_keys & counts.keys())
    if existing:
        raise Conflict(f"task {existing[0]} already exists", code="already_exists",
                       key=existing[0])
    by_key = {r.key: r for r in requests}
    order = _topological_order(requests, ctx)
    registered: dict[str, TaskRegistered] = {}
    # Tasks of the batch as parents, each built once (a parent may feed many children).
    batch: dict[str, _Parent] = {}
    for key in order:
        event, outputs = _register_one(requester, by_key[key], ctx, batch)
        registered[key] = event
        batch[key] = _Parent(key=key, worker=event.worker, rank=event.rank,
                             status=TaskStatus(event.status), outputs=outputs)
    return [registered[k] for k in order]


def _topological_order(requests: Sequence[TaskRequest], ctx: RegistrationContext) -> list[str]:
    """Parents before children (Kahn's algorithm, in request order among equals)."""
    in_batch = {r.key for r in requests}
    waiting: dict[str, set[str]] = {}
    children: dict[str, list[str]] = {}
    for request in requests:
        parents = {i.parent_task_key for i in request.inputs if i.parent_task_key is not None}
        for parent in parents:
            if parent not in in_batch and parent not in ctx.tasks:
                raise _bad(f"task {request.key}: unknown parent task {parent}", "unknown_parent")
        waiting[request.key] = {p for p in parents if p in in_batch}
        for parent in waiting[request.key]:
            children.setdefault(parent, []).append(request.key)
    ready = collections.deque(key for key, parents in waiting.items() if not parents)
    order: list[str] = []
    while ready:
        key = ready.popleft()
        order.append(key)
        for child in children.get(key, ()):
            waiting[child].discard(key)
            if not waiting[child]:
                ready.append(child)
    if len(order) < len(waiting):
        raise _bad(f"the tasks form a cycle: {' -> '.join(_a_cycle(waiting))}", "cycle")
    return order


def _a_cycle(waiting: Mapping[str, set[str]]) -> list[str]:
    """One cycle among tasks still waiting for a parent (each has one, in the cycle or
    itself waiting on one), found by walking up parents until a task repeats."""
    key = next(k for k, parents in waiting.items() if parents)
    path: list[str] = []
    while key not in path:
        path.append(key)
        key = min(waiting[key])
    return [*path[path.index(key):], key]


@dataclasses.dataclass(frozen=True)
class _Parent:
    key: str
    worker: str
    rank: int
    status: TaskStatus
    outputs: Mapping[str, TaskOutput]


def _parent(key: str, ctx: RegistrationContext, batch: Mapping[str, _Parent]) -> _Parent:
    if key in batch:
        return batch[key]
    stored = ctx.tasks[key]
    return _Parent(key, stored.worker, stored.rank, stored.status, stored.outputs)


def output_from_json(value: Mapping[str, Any]) -> TaskOutput:
    return TaskOutput(
        kind=OutputKind(value["kind"]), multiple=bool(value["multiple"]),
        permissions=Permissions.from_json(value["permissions"]),
        transient=bool(value["transient"]),
    )


_ASSET_INPUT_KINDS = {
    InputKind.MODEL: OutputKind.MODEL,
    InputKind.DATASET: OutputKind.DATASET,
}


def _register_one(
    requester: str,
    request: TaskRequest,
    ctx: RegistrationContext,
    batch: Mapping[str, _Parent],
) -> tuple[TaskRegistered, dict[str, TaskOutput]]:
    where = f"task {request.key}"
    function = ctx.functions.get(request.function_key)
    if function is None:
        raise _bad(f"{where}: unknown function {request.function_key}", "unknown_asset")
    if not function.permissions.process.allows(requester):
        raise Forbidden(f"{requester} may not use function {function.key}")

    # Which identifiers are given, how often, and are they declared?
    given = Counter(i.identifier for i in request.inputs)
    for identifier, n in given.items():
        spec = function.inputs.get(identifier)
        if spec is None:
            raise _bad(f"{where}: input {identifier!r} is not declared by the function",
                       "undeclared_input")
        if n > 1 and not spec.multiple:
            raise _bad(f"{where}: input {identifier!r} is not multiple but given {n} times",
                       "input_not_multiple")
    for identifier, spec in function.inputs.items():
        if not spec.optional and identifier not in given:
            raise _bad(f"{where}: required input {identifier!r} is missing", "missing_input")

    data_manager: DataManagerInfo | None = None
    samples: list[DataSampleInfo] = []
    asset_permissions: list[tuple[str, Permission]] = [(function.key, function.permissions.process)]
    parent_outputs: list[tuple[str, TaskOutput]] = []
    parents: dict[str, _Parent] = {}
    for item in request.inputs:
        spec = function.inputs[item.identifier]
        if (item.asset_key is None) == (item.parent_task_key is None):
            raise _bad(f"{where}: input {item.identifier!r} needs either an asset key or a "
                       "parent task output", "invalid_input")
        if item.parent_task_key is not None:
            if spec.kind not in _ASSET_INPUT_KINDS:
                raise _bad(f"{where}: input {item.identifier!r} of kind {spec.kind} cannot come "
                           "from a task output", "input_kind_mismatch")
            parent = _parent(item.parent_task_key, ctx, batch)
            parents[parent.key] = parent
            name = item.parent_output or ""
            output = parent.outputs.get(name)
            if output is None:
                raise _bad(f"{where}: parent {parent.key} declares no output {name!r}",
                           "unknown_parent_output")
            if output.kind is not _ASSET_INPUT_KINDS[spec.kind]:
                raise _bad(f"{where}: output {name!r} of {parent.key} is a {output.kind}, input "
                           f"{item.identifier!r} wants a {spec.kind}", "input_kind_mismatch")
            if output.multiple and not spec.multiple:
                raise _bad(f"{where}: multiple output {name!r} of {parent.key} cannot feed the "
                           f"single input {item.identifier!r}", "input_not_multiple")
            if (parent.key, name) in ctx.disabled_outputs:
                raise _bad(f"{where}: output {name!r} of {parent.key} was transient and has "
                           "been deleted", "disabled_model")
            parent_outputs.append((f"{parent.key}/{name}", output))
            continue
        key = item.asset_key
        assert key is not None
        if spec.kind is InputKind.DATA_MANAGER:
            dm = ctx.data_managers.get(key)
            if dm is None:
                raise _bad(f"{where}: unknown data manager {key}", "unknown_asset")
            data_manager = dm
            asset_permissions.append((key, dm.permissions.process))
        elif spec.kind is InputKind.DATA_SAMPLE:
            sample = ctx.data_samples.get(key)
            if sample is None:
                raise _bad(f"{where}: unknown data sample {key}", "unknown_asset")
            samples.append(sample)
        elif spec.kind is InputKind.MODEL:
            model = ctx.models.get(key)
            if model is None:
                raise _bad(f"{where}: unknown model {key}", "unknown_asset")
            if model.disabled:
                raise _bad(f"{where}: model {key} was transient and has been deleted",
                           "disabled_model")
            asset_permissions.append((key, model.permissions.process))
        elif spec.kind is InputKind.DATASET:
            dataset = ctx.datasets.get(key)
            if dataset is None:
                raise _bad(f"{where}: unknown dataset {key}", "unknown_asset")
            asset_permissions.append((key, dataset.permissions.process))

    if data_manager is not None:
        strays = [s.key for s in samples if data_manager.key not in s.data_manager_keys]
        if strays:
            raise _bad(f"{where}: data sample(s) {', '.join(strays)} do not belong to data "
                       f"manager {data_manager.key}", "sample_not_in_data_manager")

    # Worker: where the data is, or given explicitly when there is no data.
    if data_manager is not None:
        if request.worker is not None and request.worker != data_manager.owner:
            raise _bad(f"{where}: worker must be {data_manager.owner}, the data manager's owner, "
                       f"not {request.worker}", "worker_mismatch")
        worker = data_manager.owner
    else:
        if request.worker is None:
            raise _bad(f"{where}: a task without a data manager needs an explicit worker",
                       "worker_required")
        if request.worker not in ctx.orgs:
            raise _bad(f"{where}: unknown worker organization {request.worker}", "unknown_org")
        worker = request.worker

    for asset_key, perm in asset_permissions:
        if not perm.allows(requester):
            raise Forbidden(f"{requester} may not process {asset_key}")
        if not perm.allows(worker):
            raise Forbidden(f"{where}: worker {worker} may not process {asset_key}",
                            code="worker_cannot_process")
    for label, output in parent_outputs:
        if not output.permissions.process.allows(worker):
            raise Forbidden(f"{where}: worker {worker} may not process {label}",
                            code="worker_cannot_process")

    category = request.category or _infer_category(function)
    outputs = _task_outputs(where, request, function, category, worker, ctx)
    rank = 0 if not parents else max(p.rank for p in parents.values()) + 1
    status = initial_status([p.status for p in parents.values()])
    logs = request.logs_permission or (
        data_manager.logs_permission if data_manager is not None
        else Permission(public=False, authorized_ids=tuple(dict.fromkeys([requester, worker])))
    )
    return TaskRegistered(
        key=request.key, compute_plan_key=ctx.plan.key, function_key=function.key,
        owner=requester, worker=worker, rank=rank, status=status.value, category=category.value,
        inputs=[i.to_json() for i in request.inputs],
        outputs={name: o.to_json() for name, o in outputs.items()},
        parent_task_keys=sorted(parents), logs_permission=logs.to_json(),
        metadata=dict(request.metadata),
    ), outputs


def _infer_category(function: FunctionInfo) -> TaskCategory:
    kinds = {o.kind for o in function.outputs.values()}
    if OutputKind.PERFORMANCE in kinds:
        return TaskCategory.TEST
    if not any(s.kind is InputKind.DATA_MANAGER for s in function.inputs.values()):
        return TaskCategory.AGGREGATE
    return TaskCategory.TRAIN


def _task_outputs(
    where: str,
    request: TaskRequest,
    function: FunctionInfo,
    category: TaskCategory,
    worker: str,
    ctx: RegistrationContext,
) -> dict[str, TaskOutput]:
    undeclared = sorted(set(request.outputs) - set(function.outputs))
    if undeclared:
        raise _bad(f"{where}: output(s) {', '.join(undeclared)} are not declared by the function",
                   "undeclared_output")
    default = Permission(public=False, authorized_ids=tuple(dict.fromkeys([request_owner(ctx),
                                                                           worker])))
    outputs: dict[str, TaskOutput] = {}
    for name, spec in function.outputs.items():
        asked = request.outputs.get(name, OutputRequest())
        if spec.kind is OutputKind.PERFORMANCE:
            if asked.transient:
                raise _bad(f"{where}: performance output {name!r} cannot be transient",
                           "performance_transient")
            if asked.permissions is not None and not asked.permissions.process.public:
                raise _bad(f"{where}: performance output {name!r} is always public",
                           "performance_public")
            perms = Permissions(Permission.everyone(), Permission.everyone())
        elif category is TaskCategory.COMPOSITE and name == COMPOSITE_HEAD_OUTPUT:
            head = Permission.private_to(worker)
            perms = Permissions(head, head)
        elif asked.permissions is not None:
            perms = Permissions(
                _with_owner(asked.permissions.process, worker, ctx.orgs, where),
                _with_owner(asked.permissions.download, worker, ctx.orgs, where),
            )
        else:
            perms = Permissions(default, default)
        outputs[name] = TaskOutput(spec.kind, spec.multiple, perms, asked.transient)
    return outputs


def request_owner(ctx: RegistrationContext) -> str:
    return ctx.plan.owner


def _with_owner(perm: Permission, owner: str, orgs: frozenset[str], where: str) -> Permission:
    unknown = sorted(set(perm.authorized_ids) - orgs)
    if unknown:
        raise _bad(f"{where}: unknown organization(s) in authorized_ids: {', '.join(unknown)}",
                   "unknown_org")
    ids = perm.authorized_ids if owner in perm.authorized_ids else (owner, *perm.authorized_ids)
    return Permission(perm.public, ids)


def initial_status(parent_statuses: Iterable[TaskStatus]) -> TaskStatus:
    """TODO without parents or when all are DONE; CANCELED if one failed or was canceled."""
    statuses = set(parent_statuses)
    if statuses & _ENDED_BADLY:
        return TaskStatus.CANCELED
    if statuses <= _ONLY_DONE:
        return TaskStatus.TODO
    return TaskStatus.WAITING


# Sets built once: an enum member looked up in a loop costs a descriptor call each time,
# which showed in the registration of large batches.
_ENDED_BADLY = frozenset({TaskStatus.FAILED, TaskStatus.CANCELED})
_ONLY_DONE = frozenset({TaskStatus.DONE})


# (from, to) → who may ask: the task's worker or its owner.
_TRANSITIONS: dict[tuple[TaskStatus, TaskStatus], str] = {
    (TaskStatus.TODO, TaskStatus.DOING): "worker",
    (TaskStatus.DOING, TaskStatus.DONE): "worker",
    (TaskStatus.DOING, TaskStatus.FAILED): "worker",
    (TaskStatus.WAITING, TaskStatus.CANCELED): "owner",
    (TaskStatus.TODO, TaskStatus.CANCELED): "owner",
    (TaskStatus.DOING, TaskStatus.CANCELED): "owner",
}
_SENDER_OF_TARGET = {
    TaskStatus.DOING: "worker", TaskStatus.DONE: "worker", TaskStatus.FAILED: "worker",
    TaskStatus.CANCELED: "owner",
}


def change_status(
    task: StoredTask,
    target: TaskStatus,
    sender: str,
    *,
    missing_outputs: Sequence[str] = (),
    error_type: ErrorType | None = None,
) -> TaskStatusChanged:
    """A status change asked by `sender` (an org id): 403 for the wrong sender, 400 for a
    transition that does not exist, 400 for DONE with an output still missing."""
    role = _SENDER_OF_TARGET.get(target)
    if role is None:
        raise _bad(f"a task cannot be moved to {target} by request", "bad_transition")
    expected = task.worker if role == "worker" else task.owner
    if sender != expected:
        raise Forbidden(f"only the task's {role} ({expected}) may move it to {target}",
                        code="wrong_sender")
    if (task.status, target) not in _TRANSITIONS:
        raise _bad(f"task {task.key} cannot go from {task.status} to {target}", "bad_transition")
    if target is TaskStatus.DONE and missing_outputs:
        raise _bad(f"task {task.key} cannot be DONE: output(s) {', '.join(missing_outputs)} "
                   "not registered", "outputs_missing")
    return TaskStatusChanged(
        key=task.key, compute_plan_key=task.compute_plan_key, previous=task.status.value,
        status=target.value,
        error_type=(error_type or ErrorType.EXECUTION).value if target is TaskStatus.FAILED
        else None,
    )


def check_output_registration(
    task: StoredTask, identifier: str, kind: OutputKind, sender: str, already_registered: int
) -> TaskOutput:
    """An output may be registered only while DOING, by the worker, once unless multiple."""
    if sender != task.worker:
        raise Forbidden(f"only the worker {task.worker} registers outputs of {task.key}",
                        code="wrong_sender")
    if task.status is not TaskStatus.DOING:
        raise _bad(f"outputs of {task.key} can be registered only while it is DOING "
                   f"(it is {task.status})", "task_not_doing")
    output = task.outputs.get(identifier)
    if output is None:
        raise _bad(f"task {task.key} declares no output {identifier!r}", "undeclared_output")
    if output.kind is not kind:
        raise _bad(f"output {identifier!r} of {task.key} is a {output.kind}, not a {kind}",
                   "output_kind_mismatch")
    if already_registered and not output.multiple:
        raise Conflict(f"output {identifier!r} of {task.key} is already registered",
                       code="output_already_registered", key=task.key)
    return output


def missing_outputs(task: StoredTask, registered: Mapping[str, int]) -> list[str]:
    return sorted(name for name in task.outputs if not registered.get(name))


def children_ready(
    done_task: str, children: Iterable[StoredTask], statuses: Mapping[str, TaskStatus]
) -> list[StoredTask]:
    """WAITING children of `done_task` whose parents are now all DONE (they become TODO).

    `statuses` gives the current status of every parent involved, `done_task` included.
    """
    ready = []
    for child in children:
        if child.status is not TaskStatus.WAITING or done_task not in child.parent_task_keys:
            continue
        if all(statuses.get(p) is TaskStatus.DONE for p in child.parent_task_keys):
            ready.append(child)
    return ready


def transient_outputs_to_disable(
    parent: StoredTask, consumers: Mapping[str, Sequence[StoredTask]]
) -> list[str]:
    """Transient outputs of `parent` whose every consuming task is final.

    `consumers` maps an output identifier to the tasks that take it as input.
    """
    names = []
    for name, output in parent.outputs.items():
        users = consumers.get(name, ())
        if output.transient and users and all(t.status.final for t in users):
            names.append(name)
    return sorted(names)
