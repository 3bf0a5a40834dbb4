"""Commands on compute plans and tasks: load what the rules need, decide, record.

Each command reads the views, lets the pure rules decide, and records the events with the
versions it read. If another command changed one of those aggregates meanwhile, the
append is refused and the command runs again on fresh state (a few times), so that
automatic consequences, such as a child becoming TODO when its last parent is DONE, are
never lost to a race.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

from app.api.schemas_assets import TaskActionIn, TaskIn
from app.domain.errors import Conflict, Forbidden, NotFound
from app.domain.events import DomainEvent
from app.domain.functions import OutputKind
from app.domain.leases import lease_expired
from app.domain.organizations import Principal, ledger_of
from app.domain.outputs import (
    FailureReportRegistered,
    ModelDisabled,
    ModelRegistered,
    PerformanceRegistered,
    check_performance_value,
)
from app.domain.plans import ComputePlanRegistered, cancel_plan
from app.domain.registration import check_metadata, check_new_key
from app.domain.tasks import (
    ErrorType,
    OutputRequest,
    PlanInfo,
    RegistrationContext,
    StoredTask,
    TaskInput,
    TaskRequest,
    TaskStatus,
    TaskStatusChanged,
    change_status,
    check_output_registration,
    children_ready,
    missing_outputs,
    register_tasks,
    transient_outputs_to_disable,
)
from app.events.appender import VersionConflict
from app.events.leases import ExpiredRun, Lease
from app.projections import queries as q
from app.runtime import Runtime

T = TypeVar("T")
ATTEMPTS = 6


async def retrying(command: Callable[[], Awaitable[T]]) -> T:
    """Run a command again on fresh state when it lost a race on an aggregate."""
    for attempt in range(ATTEMPTS):
        try:
            return await command()
        except VersionConflict:
            if attempt == ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.005 * 2**attempt)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection during a synchronous, allocation-heavy step.

    Checking a 10,000-task batch allocates millions of objects; the collector would run
    full passes over the whole heap many times meanwhile (about 40% of the step's time).
    Safe in async code because the step never awaits: nothing else runs until it ends,
    and whatever cyclic garbage it left is collected by the next regular pass."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def acting_org(actor: Principal) -> str:
    actor.require_writer()
    if actor.kind != "org" or actor.org is None:
        raise Forbidden("this action is taken by an organization's token", code="org_only")
    return actor.org


def _requests(tasks: Sequence[TaskIn]) -> list[TaskRequest]:
    return [
        TaskRequest(
            key=str(t.key or uuid.uuid4()), function_key=t.function_key, worker=t.worker,
            inputs=[TaskInput(i.identifier, i.asset_key, i.parent_task_key, i.parent_output)
                    for i in t.inputs],
            outputs={n: OutputRequest(o.permissions.domain() if o.permissions else None,
                                      o.transient) for n, o in t.outputs.items()},
            category=t.category,
            logs_permission=t.logs_permission.domain() if t.logs_permission else None,
            metadata=check_metadata(t.metadata),
        )
        for t in tasks
    ]


async def register_plan(
    runtime: Runtime, actor: Principal, key: str, name: str, tag: str,
    metadata: dict[str, str], tasks: Sequence[TaskIn],
) -> list[str]:
    """A plan and its tasks in one atomic command; returns the task keys in rank order."""
    org = acting_org(actor)
    plan_event = ComputePlanRegistered(key=key, owner=org, name=name, tag=tag,
                                       metadata=check_metadata(metadata))
    with gc_paused():
        requests = _requests(tasks)
    return await retrying(lambda: _register(runtime, actor, org, PlanInfo(key, org), None,
                                            requests, plan_event))


async def add_tasks(
    runtime: Runtime, actor: Principal, plan_key: str, tasks: Sequence[TaskIn]
) -> list[str]:
    org = acting_org(actor)
    with gc_paused():
        requests = _requests(tasks)

    async def attempt() -> list[str]:
        async with runtime.pool.acquire() as conn:
            found = await q.plan(conn, plan_key)
        if found is None:
            raise NotFound(f"no compute plan {plan_key}")
        return await _register(runtime, actor, org, found[0], found[1], requests, None)

    return await retrying(attempt)


async def _register(
    runtime: Runtime, actor: Principal, org: str, plan: PlanInfo, plan_version: int | None,
    requests: list[TaskRequest], plan_event: ComputePlanRegistered | None,
) -> list[str]:
    batch_keys = {r.key for r in requests}
    asset_keys = {i.asset_key for r in requests for i in r.inputs if i.asset_key}
    parent_keys = {i.parent_task_key for r in requests for i in r.inputs
                   if i.parent_task_key and i.parent_task_key not in batch_keys}
    async with runtime.pool.acquire() as conn:
        stored, versions = await q.tasks(conn, parent_keys)
        ctx = RegistrationContext(
            orgs=await q.org_ids(conn), plan=plan,
            functions=await q.functions(conn, {r.function_key for r in requests}),
            data_managers=await q.data_managers(conn, asset_keys),
            data_samples=await q.data_samples(conn, asset_keys),
            models=await q.models(conn, asset_keys),
            datasets=await q.datasets(conn, asset_keys),
            tasks=stored,
            existing_keys=await q.existing_keys(conn, batch_keys | {plan.key}),
            disabled_outputs=await q.disabled_outputs(conn, parent_keys),
        )
    if plan_event is not None:
        check_new_key(plan.key, plan.key in ctx.existing_keys)
    events: list[DomainEvent] = [plan_event] if plan_event is not None else []
    with gc_paused():
        registered = register_tasks(org, requests, ctx)
    events.extend(registered)
    expected = {f"compute_task/{k}": 0 for k in batch_keys}
    expected.update({f"compute_task/{k}": v for k, v in versions.items()})
    expected[f"compute_plan/{plan.key}"] = plan_version or 0
    await runtime.record(actor, ledger_of(actor, None), events, expected)
    return [e.key for e in registered]


async def cancel(runtime: Runtime, actor: Principal, plan_key: str) -> None:
    org = acting_org(actor)

    async def attempt() -> None:
        async with runtime.pool.acquire() as conn:
            found = await q.plan(conn, plan_key)
            if found is None:
                raise NotFound(f"no compute plan {plan_key}")
            tasks, versions = await q.plan_tasks(conn, plan_key)
        plan, plan_version = found
        events = cancel_plan(plan_key, plan.owner, org, plan.canceled, tasks)
        expected = {f"compute_task/{k}": v for k, v in versions.items()}
        expected[f"compute_plan/{plan_key}"] = plan_version
        await runtime.record(actor, org, events, expected, reason="compute plan canceled")

    await retrying(attempt)


async def _task(runtime: Runtime, key: str) -> tuple[StoredTask, int]:
    async with runtime.pool.acquire() as conn:
        found, versions = await q.tasks(conn, [key])
    if key not in found:
        raise NotFound(f"no compute task {key}")
    return found[key], versions[key]


async def act_on_task(
    runtime: Runtime, actor: Principal, key: str, body: TaskActionIn
) -> Lease | None:
    """start / done / fail / cancel, with what follows automatically.

    A runner (`body.runner_id`) starting the task takes its lease first and gets it back;
    its done/fail are refused (409 lease_lost) once another run took the task over.
    """
    org = acting_org(actor)
    target = {"start": TaskStatus.DOING, "done": TaskStatus.DONE, "fail": TaskStatus.FAILED,
              "cancel": TaskStatus.CANCELED}[body.action]
    runner = body.runner_id
    if runner is None or target is TaskStatus.CANCELED:
        await _change_status(runtime, actor, org, key, target, body)
        return None
    if target is not TaskStatus.DOING:
        held = await runtime.leases.holder(key)
        if held is None or held.runner_id != runner:
            raise Conflict(f"runner {runner} no longer holds task {key}", code="lease_lost",
                           key=key)
        await _change_status(runtime, actor, org, key, target, body)
        return held
    task, _ = await _task(runtime, key)
    if task.worker != org:  # checked again by the rule; no lease for a wrong sender
        raise Forbidden(f"only the task's worker ({task.worker}) may start it",
                        code="wrong_sender")
    if task.status is TaskStatus.DOING:
        held = await runtime.leases.holder(key)
        if held is not None and held.runner_id == runner and held.live:
            return held  # the same runner's start, sent again after a lost answer
    lease = await runtime.leases.grant(key, runner, body.lease_seconds)
    if lease is None:
        raise Conflict(f"task {key} is being run by another runner", code="task_leased", key=key)
    try:
        await _change_status(runtime, actor, org, key, target, body)
    except BaseException:
        await runtime.leases.release(lease)
        raise
    return lease


async def expire_lease(runtime: Runtime, run: ExpiredRun) -> list[str]:
    """A runner stopped renewing its lease: retry the task or fail it (INTERNAL).

    Recorded on the worker's ledger by the system. Returns the new statuses (empty when
    the task had moved on meanwhile)."""
    system = Principal(kind="system")

    async def attempt() -> list[str]:
        task, version = await _task(runtime, run.task_key)
        held = await runtime.leases.holder(run.task_key)
        if held is None or held.attempt != run.attempt or held.runner_id != run.runner_id:
            return []  # a new run started meanwhile
        events = lease_expired(task, run.attempt, run.runner_id)
        if not events:
            return []
        target = TaskStatus(events[0].data()["status"])
        expected = {f"compute_task/{task.key}": version}
        if target.final:
            events += await _disable_transients(runtime, task, target, expected)
        await runtime.record(system, task.worker, events, expected,
                             reason=f"lease of runner {run.runner_id} expired "
                                    f"(attempt {run.attempt})")
        await _release_disabled(runtime, events)
        return [target.value]

    return await retrying(attempt)


async def _release_disabled(runtime: Runtime, events: Sequence[DomainEvent]) -> None:
    for event in events:
        if isinstance(event, ModelDisabled):
            await release_model_file(runtime, event.key)


async def _change_status(
    runtime: Runtime, actor: Principal, org: str, key: str, target: TaskStatus,
    body: TaskActionIn,
) -> None:
    async def attempt() -> None:
        task, version = await _task(runtime, key)
        expected = {f"compute_task/{key}": version}
        async with runtime.pool.acquire() as conn:
            registered = await q.registered_outputs(conn, key)
        error_type = ErrorType(body.error_type) if body.error_type else None
        change = change_status(task, target, org, missing_outputs=missing_outputs(
            task, registered), error_type=error_type)
        events: list[DomainEvent] = [change]
        if target is TaskStatus.FAILED:
            events.append(FailureReportRegistered(
                key=key, error_type=change.error_type or ErrorType.EXECUTION.value,
                logs_checksum=body.logs_checksum, message=body.message,
            ))
        if target is TaskStatus.DONE:
            events += await _children_to_todo(runtime, task, expected)
        if target.final:
            events += await _disable_transients(runtime, task, target, expected)
        await runtime.record(actor, org, events, expected, reason=body.message)
        await _release_disabled(runtime, events)

    await retrying(attempt)


async def release_model_file(runtime: Runtime, model_key: str) -> None:
    """Delete a disabled model's file unless another live asset has the same bytes
    (the store is content-addressed, so identical files are stored once)."""
    async with runtime.pool.acquire() as conn:
        checksum = await conn.fetchval("SELECT checksum FROM models WHERE key = $1", model_key)
        still_used = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM models WHERE checksum = $1 AND NOT disabled) "
            "OR EXISTS (SELECT 1 FROM data_managers WHERE opener_checksum = $1) "
            "OR EXISTS (SELECT 1 FROM functions WHERE image = $1)",
            checksum,
        )
    if checksum is not None and not still_used:
        await runtime.artifacts.delete(checksum)


async def _children_to_todo(
    runtime: Runtime, done: StoredTask, expected: dict[str, int]
) -> list[DomainEvent]:
    async with runtime.pool.acquire() as conn:
        kids, kid_versions = await q.children(conn, done.key)
        other_parents = {p for k in kids.values() for p in k.parent_task_keys} - {done.key}
        parents, parent_versions = await q.tasks(conn, other_parents)
    statuses = {k: t.status for k, t in parents.items()} | {done.key: TaskStatus.DONE}
    events: list[DomainEvent] = []
    for child in children_ready(done.key, kids.values(), statuses):
        events.append(change_status_auto(child, TaskStatus.TODO))
    # Guard every task this decision read: a concurrent change makes it run again.
    expected.update({f"compute_task/{k}": v for k, v in kid_versions.items()})
    expected.update({f"compute_task/{k}": v for k, v in parent_versions.items()})
    return events


def change_status_auto(task: StoredTask, target: TaskStatus) -> DomainEvent:
    return TaskStatusChanged(key=task.key, compute_plan_key=task.compute_plan_key,
                             previous=task.status.value, status=target.value)


async def _disable_transients(
    runtime: Runtime, task: StoredTask, target: TaskStatus, expected: dict[str, int]
) -> list[DomainEvent]:
    """Transient outputs of this task's parents whose consumers are now all final."""
    now_final = dataclass_replace_status(task, target)
    events: list[DomainEvent] = []
    async with runtime.pool.acquire() as conn:
        parents, parent_versions = await q.tasks(conn, task.parent_task_keys)
        for parent in parents.values():
            if not any(o.transient for o in parent.outputs.values()):
                continue
            kids, kid_versions = await q.children(conn, parent.key)
            kids[task.key] = now_final
            consumers: dict[str, list[StoredTask]] = {}
            rows = await conn.fetch(
                "SELECT key, inputs FROM compute_tasks WHERE key = ANY($1)", list(kids))
            for row in rows:
                for item in q.json_value(row["inputs"]):
                    if item.get("parent_task_key") == parent.key:
                        consumers.setdefault(item["parent_output"], []).append(kids[row["key"]])
            for name in transient_outputs_to_disable(parent, consumers):
                model_rows = await conn.fetch(
                    "SELECT key FROM models WHERE compute_task_key = $1 AND identifier = $2 "
                    "AND NOT disabled", parent.key, name)
                events += [ModelDisabled(key=r["key"], compute_task_key=parent.key,
                                         identifier=name) for r in model_rows]
            expected.update({f"compute_task/{k}": v for k, v in kid_versions.items()
                             if k != task.key})
        expected.update({f"compute_task/{k}": v for k, v in parent_versions.items()})
    return events


def dataclass_replace_status(task: StoredTask, status: TaskStatus) -> StoredTask:
    return dataclasses.replace(task, status=status)


def output_model_key(task_key: str, identifier: str, multiple: bool) -> str:
    """A single output's model key is derived from the task and identifier, so a second
    registration collides on the same aggregate (409) even when both race."""
    if multiple:
        return str(uuid.uuid4())
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"consort:{task_key}/{identifier}"))


async def register_model(
    runtime: Runtime, actor: Principal, key: str, identifier: str, checksum: str, size: int
) -> str:
    org = acting_org(actor)
    task, version = await _task(runtime, key)
    async with runtime.pool.acquire() as conn:
        count = (await q.registered_outputs(conn, key)).get(identifier, 0)
    output = check_output_registration(task, identifier, OutputKind.MODEL, org, count)
    model_key = output_model_key(key, identifier, output.multiple)
    event = ModelRegistered(
        key=model_key, compute_task_key=key, identifier=identifier, owner=task.worker,
        permissions=output.permissions.to_json(), checksum=checksum, size=size,
        transient=output.transient,
    )
    await _record_output(runtime, actor, org, key, version, event, output.multiple)
    return model_key


async def register_performance(
    runtime: Runtime, actor: Principal, key: str, identifier: str, value: float
) -> str:
    org = acting_org(actor)
    task, version = await _task(runtime, key)
    async with runtime.pool.acquire() as conn:
        count = (await q.registered_outputs(conn, key)).get(identifier, 0)
    check_output_registration(task, identifier, OutputKind.PERFORMANCE, org, count)
    perf_key = output_model_key(key, identifier, False)
    event = PerformanceRegistered(
        key=perf_key, compute_task_key=key, compute_plan_key=task.compute_plan_key,
        identifier=identifier, value=check_performance_value(value),
    )
    await _record_output(runtime, actor, org, key, version, event, False)
    return perf_key


async def _record_output(
    runtime: Runtime, actor: Principal, org: str, task_key: str, task_version: int,
    event: DomainEvent, multiple: bool,
) -> None:
    expected = {f"compute_task/{task_key}": task_version}
    if not multiple:
        expected[f"{event.asset_kind}/{event.asset_key}"] = 0
    try:
        await runtime.record(actor, org, [event], expected)
    except VersionConflict as exc:
        if exc.aggregate.startswith("compute_task/"):
            raise
        raise Conflict(
            f"output {getattr(event, 'identifier', '')!r} of {task_key} is already registered",
            code="output_already_registered", key=task_key,
        ) from exc
