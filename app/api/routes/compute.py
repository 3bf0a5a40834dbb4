"""Compute plans and tasks: register (atomically, in batches), follow, act, cancel."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Query, status
from fastapi.responses import Response, StreamingResponse

from app.api import compute
from app.api import schemas_out as out
from app.api.asset_views import require_logs_permission
from app.api.deps import PrincipalDep, RuntimeDep
from app.api.files import Download, binary, file_response
from app.api.filters import MetadataFilter, MetadataQuery
from app.api.pagination import MAX_LIMIT, Page, decode_cursor, encode_cursor
from app.api.problems import ApiProblem
from app.api.schemas_assets import (
    ComputePlanIn,
    LeaseIn,
    ModelOutputIn,
    PerformanceIn,
    TaskActionIn,
    TaskBatchIn,
    plan_json,
)
from app.domain.errors import Conflict, Forbidden, InvalidCommand, NotFound
from app.domain.permissions import Permissions
from app.events.leases import Lease
from app.projections import queries as q
from app.projections.queries import json_value
from app.runtime import Runtime

router = APIRouter(tags=["compute"])

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
_JSON_TASK_FIELDS = ("inputs", "outputs", "logs_permission", "metadata")


def task_json(row: asyncpg.Record) -> dict[str, Any]:
    d = dict(row)
    for field in _JSON_TASK_FIELDS:
        d[field] = json_value(d[field])
    d.pop("position", None)
    d.pop("version", None)
    return d


async def _plan(runtime: Runtime, key: str) -> dict[str, Any]:
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM compute_plans WHERE key = $1", key)
    if row is None:
        raise NotFound(f"no compute plan {key}")
    d = plan_json(row)
    d["metadata"] = json_value(d["metadata"])
    return d


async def _task(runtime: Runtime, key: str) -> dict[str, Any]:
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM compute_tasks WHERE key = $1", key)
    if row is None:
        raise NotFound(f"no compute task {key}")
    return task_json(row)


@router.post("/compute_plans", status_code=status.HTTP_201_CREATED,
             response_model=out.PlanRegistered)
async def register_plan(
    body: ComputePlanIn, actor: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """Register a compute plan with any number of tasks, all or nothing."""
    key = str(body.key or uuid.uuid4())
    task_keys = await compute.register_plan(
        runtime, actor, key, body.name, body.tag, body.metadata, body.tasks
    )
    return {"plan": await _plan(runtime, key), "task_keys": task_keys}


@router.get("/compute_plans", response_model=Page[out.ComputePlan])
async def list_plans(
    _: PrincipalDep, runtime: RuntimeDep, metadata: MetadataQuery, owner: str | None = None,
    plan_status: Annotated[str | None, Query(alias="status")] = None,
    cursor: str | None = None, limit: Limit = 100,
) -> dict[str, Any]:
    after = decode_cursor(cursor, 1)
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT * FROM compute_plans WHERE position > $1 "
            "AND ($2::text IS NULL OR owner = $2) AND ($3::text IS NULL OR status = $3) "
            f"{MetadataFilter.sql(5)} ORDER BY position LIMIT $4",
            after[0] if after else 0, owner, plan_status, limit + 1, *metadata.args,
        )
    items = [plan_json(r) | {"metadata": json_value(r["metadata"])} for r in rows[:limit]]
    more = len(rows) > limit
    return {"items": items,
            "next_cursor": encode_cursor([rows[limit - 1]["position"]]) if more else None}


@router.get("/compute_plans/{key}", response_model=out.ComputePlan)
async def get_plan(key: str, _: PrincipalDep, runtime: RuntimeDep) -> dict[str, Any]:
    return await _plan(runtime, key)


@router.post("/compute_plans/{key}/tasks", status_code=status.HTTP_201_CREATED,
             response_model=out.TaskKeys)
async def add_tasks(
    key: str, body: TaskBatchIn, actor: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """Add a batch of tasks to an existing plan (atomic)."""
    return {"task_keys": await compute.add_tasks(runtime, actor, key, body.tasks)}


@router.post("/compute_plans/{key}/cancel", response_model=out.ComputePlan)
async def cancel_plan(key: str, actor: PrincipalDep, runtime: RuntimeDep) -> dict[str, Any]:
    """Cancel the plan and every task of it that is not final yet."""
    await compute.cancel(runtime, actor, key)
    return await _plan(runtime, key)


@router.get("/compute_plans/{key}/graph", response_model=out.PlanGraph)
async def plan_graph(key: str, _: PrincipalDep, runtime: RuntimeDep) -> dict[str, Any]:
    """The plan's task graph in one call: nodes and parent → child edges."""
    await _plan(runtime, key)
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT key, rank, status, worker, category, function_key, inputs "
            "FROM compute_tasks WHERE compute_plan_key = $1 ORDER BY rank, position", key,
        )
    nodes, edges = [], []
    for r in rows:
        nodes.append({k: r[k] for k in ("key", "rank", "status", "worker", "category",
                                        "function_key")})
        for item in json_value(r["inputs"]):
            if item.get("parent_task_key"):
                edges.append({"source": item["parent_task_key"], "target": r["key"],
                              "output": item["parent_output"], "input": item["identifier"]})
    return {"nodes": nodes, "edges": edges}


@router.get("/compute_plans/{key}/performances", response_model=out.Performances)
async def plan_performances(
    key: str, _: PrincipalDep, runtime: RuntimeDep, identifier: str | None = None
) -> dict[str, Any]:
    """Every performance of the plan (performances are public), in registration order."""
    await _plan(runtime, key)
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT p.key, p.compute_task_key, p.identifier, p.value, p.created_at, t.rank, "
            "t.worker, t.metadata FROM performances p JOIN compute_tasks t "
            "ON t.key = p.compute_task_key WHERE p.compute_plan_key = $1 "
            "AND ($2::text IS NULL OR p.identifier = $2) ORDER BY p.position",
            key, identifier,
        )
    return {"items": [dict(r) | {"metadata": json_value(r["metadata"])} for r in rows]}


# A task as JSON, built by PostgreSQL: pages of 1,000 tasks are sent without decoding and
# re-encoding their JSON columns in Python (same fields as task_json).
_TASK_DOC = "(to_jsonb(t) - 'position' - 'version')::text"


def _json(body: str, status_code: int = 200) -> Response:
    return Response(content=body, status_code=status_code, media_type="application/json")


# Served as JSON that PostgreSQL builds (see _TASK_DOC): documented, not re-validated.
@router.get("/tasks", response_class=Response, responses={200: {"model": Page[out.Task]}})
async def list_tasks(
    _: PrincipalDep, runtime: RuntimeDep, metadata: MetadataQuery,
    compute_plan_key: str | None = None, worker: str | None = None, owner: str | None = None,
    task_status: Annotated[str | None, Query(alias="status")] = None,
    rank: int | None = None, category: str | None = None,
    cursor: str | None = None, limit: Limit = 100,
) -> Response:
    """Tasks in registration order, filtered: `{"items": [...], "next_cursor": ...}`;
    page with `next_cursor`."""
    after = decode_cursor(cursor, 1)
    async with runtime.pool.acquire() as conn:
        # The page is chosen first, then turned into JSON: in one query level PostgreSQL
        # may build the JSON of every matching row before sorting and cutting the page.
        rows = await conn.fetch(
            f"SELECT position, {_TASK_DOC} AS doc FROM (SELECT * FROM compute_tasks "
            "WHERE position > $1 AND ($2::text IS NULL OR compute_plan_key = $2) "
            "AND ($3::text IS NULL OR worker = $3) AND ($4::text IS NULL OR owner = $4) "
            "AND ($5::text IS NULL OR status = $5) AND ($6::int IS NULL OR rank = $6) "
            f"AND ($7::text IS NULL OR category = $7) {MetadataFilter.sql(9)} "
            "ORDER BY position, key LIMIT $8) t ORDER BY position, key",
            after[0] if after else 0, compute_plan_key, worker, owner, task_status, rank,
            category, limit + 1, *metadata.args,
        )
    more = len(rows) > limit
    next_cursor = json.dumps(encode_cursor([rows[limit - 1]["position"]]) if more else None)
    items = ",".join(r["doc"] for r in rows[:limit])
    return _json(f'{{"items":[{items}],"next_cursor":{next_cursor}}}')


@router.get("/tasks/{key}", response_class=Response,
             responses={200: {"model": out.Task}, 404: {}})
async def get_task(key: str, _: PrincipalDep, runtime: RuntimeDep) -> Response:
    """One task."""
    async with runtime.pool.acquire() as conn:
        doc = await conn.fetchval(f"SELECT {_TASK_DOC} FROM compute_tasks t WHERE key = $1", key)
    if doc is None:
        raise NotFound(f"no compute task {key}")
    return _json(doc)


@router.post("/tasks/{key}/actions", response_model=out.Task,
             response_model_exclude_unset=True)
async def task_action(
    key: str, body: TaskActionIn, actor: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """start / done / fail (with a failure report) by the worker; cancel by the owner.

    A runner passes its `runner_id` to start: the answer then carries its `lease`, which it
    renews with POST /tasks/{key}/lease until it reports done or fail."""
    lease = await compute.act_on_task(runtime, actor, key, body)
    task = await _task(runtime, key)
    if lease is not None:
        task["lease"] = lease_json(lease)
    return task


@router.post("/tasks/{key}/lease", response_model=out.LeaseRenewed)
async def renew_lease(
    key: str, body: LeaseIn, actor: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """The runner running the task renews its lease and learns the task's status (a
    status other than DOING is the runner's cue to stop its container). 409 lease_lost
    when another run took the task over."""
    org = compute.acting_org(actor)
    task = await _task(runtime, key)
    if task["worker"] != org:
        raise Forbidden(f"only the worker {task['worker']} runs {key}", code="wrong_sender")
    lease = await runtime.leases.renew(key, body.runner_id, body.lease_seconds)
    if lease is not None and body.release:
        await runtime.leases.release(lease)
    if lease is None:
        raise Conflict(f"runner {body.runner_id} no longer holds task {key}",
                       code="lease_lost", key=key)
    return {"task_key": key, "status": task["status"], "lease": lease_json(lease)}


def lease_json(lease: Lease) -> dict[str, Any]:
    return {"runner_id": lease.runner_id, "attempt": lease.attempt,
            "expires_at": lease.expires_at.isoformat()}


@router.post("/tasks/{key}/outputs/{identifier}/performance", response_model=out.Performance,
             response_model_exclude_unset=True,
             status_code=status.HTTP_201_CREATED)
async def register_performance(
    key: str, identifier: str, body: PerformanceIn, actor: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    perf_key = await compute.register_performance(runtime, actor, key, identifier, body.value)
    return {"key": perf_key, "compute_task_key": key, "identifier": identifier,
            "value": body.value}


@router.post("/tasks/{key}/outputs/{identifier}/model", status_code=status.HTTP_201_CREATED,
             response_model=out.Model)
async def register_model(
    key: str, identifier: str, body: ModelOutputIn, actor: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """The worker registers a model file it uploaded with POST /files."""
    checksum = body.checksum.lower()
    if not await runtime.artifacts.exists(checksum):
        raise InvalidCommand(f"no uploaded file has checksum {checksum}", code="unknown_file")
    size = await runtime.artifacts.size(checksum)
    model_key = await compute.register_model(runtime, actor, key, identifier, checksum, size)
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM models WHERE key = $1", model_key)
    assert row is not None
    return dict(row) | {"permissions": json_value(row["permissions"])}


@router.get("/tasks/{key}/failure_report", response_model=out.FailureReport)
async def get_failure_report(key: str, actor: PrincipalDep, runtime: RuntimeDep
                            ) -> dict[str, Any]:
    """Why a FAILED task failed: its error type, a message, and the checksum of its log as
    the runner stored it (download it from .../failure_report/logs)."""
    await require_logs_permission(runtime, actor, key)
    return await _failure_report(runtime, key)


@router.get("/tasks/{key}/failure_report/logs", response_model=None, response_class=Download,
             responses=binary("The log kept with the failure report"))
async def download_failure_logs(key: str, actor: PrincipalDep, runtime: RuntimeDep
                                ) -> StreamingResponse:
    """The task's log as kept with its failure report."""
    await require_logs_permission(runtime, actor, key)
    report = await _failure_report(runtime, key)
    if report["logs_checksum"] is None:
        raise NotFound(f"the failure report of {key} holds no log", code="no_log")
    return await file_response(runtime.artifacts, report["logs_checksum"], f"{key}.log")


async def _failure_report(runtime: Runtime, key: str) -> dict[str, Any]:
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT key AS compute_task_key, error_type, logs_checksum, message, created_at "
            "FROM failure_reports WHERE key = $1", key)
    if row is None:
        raise NotFound(f"task {key} has no failure report", code="no_failure_report")
    return dict(row)


@router.get("/models/{key}/file", response_model=None, response_class=Download,
             responses=binary("The model file"))
async def download_model(
    key: str, actor: PrincipalDep, runtime: RuntimeDep, for_task: str | None = None,
) -> StreamingResponse:
    """A model file: needs process permission on the model, and either the owner's
    `model_export_enabled` or `for_task`: an open (TODO/DOING) task of the caller's that
    takes this model as input (how a runner fetches its inputs; export is about people)."""
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM models WHERE key = $1", key)
        if row is None:
            raise NotFound(f"no model {key}")
        perms = Permissions.from_json(json_value(row["permissions"]))
        if actor.kind != "admin":
            if actor.org is None or not perms.process.allows(actor.org):
                raise Forbidden(f"{actor.org or actor.kind} may not process model {key}")
            runs_it = for_task is not None and await q.is_input_of_open_task(
                conn, actor.org, for_task, key, row["compute_task_key"], row["identifier"])
            if actor.org != row["owner"] and not runs_it and \
                    not await q.model_export_enabled(conn, row["owner"]):
                raise Forbidden(f"{row['owner']} does not allow model export",
                                code="model_export_disabled")
    if row["disabled"]:
        raise ApiProblem(410, "model_disabled", f"model {key} was transient and is deleted")
    return await file_response(runtime.artifacts, row["checksum"], f"{key}.model")


@router.get("/models", response_model=Page[out.Model])
async def list_models(
    _: PrincipalDep, runtime: RuntimeDep, compute_task_key: str | None = None,
    owner: str | None = None, cursor: str | None = None, limit: Limit = 100,
) -> dict[str, Any]:
    after = decode_cursor(cursor, 1)
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT * FROM models WHERE position > $1 "
            "AND ($2::text IS NULL OR compute_task_key = $2) "
            "AND ($3::text IS NULL OR owner = $3) ORDER BY position LIMIT $4",
            after[0] if after else 0, compute_task_key, owner, limit + 1,
        )
    more = len(rows) > limit
    items = [{k: v for k, v in dict(r).items() if k != "position"}
             | {"permissions": json_value(r["permissions"])} for r in rows[:limit]]
    return {"items": items,
            "next_cursor": encode_cursor([rows[limit - 1]["position"]]) if more else None}


@router.get("/models/{key}", response_model=out.Model)
async def get_model(key: str, _: PrincipalDep, runtime: RuntimeDep) -> dict[str, Any]:
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM models WHERE key = $1", key)
    if row is None:
        raise NotFound(f"no model {key}")
    return {k: v for k, v in dict(row).items() if k != "position"} | {
        "permissions": json_value(row["permissions"])}
