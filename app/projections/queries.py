"""Loading domain facts from the views, for the rules to decide on.

Each loader returns plain domain dataclasses plus, where a command must guard against a
concurrent change, the aggregate versions it read (for optimistic concurrency).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import asyncpg

from app.domain.assets import (
    DataManagerInfo,
    DataSampleInfo,
    DatasetInfo,
    FunctionInfo,
    ModelInfo,
    TaskOutput,
)
from app.domain.functions import InputKind, InputSpec, OutputKind, OutputSpec
from app.domain.permissions import Permission, Permissions
from app.domain.tasks import PlanInfo, StoredTask, TaskStatus, output_from_json

ASSET_TABLES = ("functions", "data_managers", "data_samples", "datasets", "compute_plans",
                "compute_tasks", "models")


def json_value(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


async def org_ids(conn: asyncpg.Connection) -> frozenset[str]:
    return frozenset(r["id"] for r in await conn.fetch("SELECT id FROM organizations"))


async def model_export_enabled(conn: asyncpg.Connection, org: str) -> bool:
    return bool(await conn.fetchval(
        "SELECT model_export_enabled FROM organizations WHERE id = $1", org))


async def existing_keys(conn: asyncpg.Connection, keys: Iterable[str]) -> frozenset[str]:
    """Which of these keys name an asset of any kind already."""
    wanted = list(set(keys))
    if not wanted:
        return frozenset()
    union = " UNION ALL ".join(f"SELECT key FROM {t} WHERE key = ANY($1)" for t in ASSET_TABLES)
    return frozenset(r["key"] for r in await conn.fetch(union, wanted))


async def functions(conn: asyncpg.Connection, keys: Iterable[str]) -> dict[str, FunctionInfo]:
    rows = await conn.fetch(
        "SELECT key, owner, permissions, inputs, outputs FROM functions WHERE key = ANY($1)",
        list(set(keys)),
    )
    return {
        r["key"]: FunctionInfo(
            key=r["key"], owner=r["owner"],
            permissions=Permissions.from_json(json_value(r["permissions"])),
            inputs={n: InputSpec(InputKind(s["kind"]), s["multiple"], s["optional"])
                    for n, s in json_value(r["inputs"]).items()},
            outputs={n: OutputSpec(OutputKind(s["kind"]), s["multiple"])
                     for n, s in json_value(r["outputs"]).items()},
        )
        for r in rows
    }


async def data_managers(
    conn: asyncpg.Connection, keys: Iterable[str]
) -> dict[str, DataManagerInfo]:
    rows = await conn.fetch(
        "SELECT key, owner, permissions, logs_permission FROM data_managers "
        "WHERE key = ANY($1)", list(set(keys)),
    )
    return {
        r["key"]: DataManagerInfo(
            r["key"], r["owner"], Permissions.from_json(json_value(r["permissions"])),
            Permission.from_json(json_value(r["logs_permission"])),
        )
        for r in rows
    }


async def data_samples(
    conn: asyncpg.Connection, keys: Iterable[str]
) -> dict[str, DataSampleInfo]:
    rows = await conn.fetch(
        "SELECT key, owner, data_manager_keys FROM data_samples WHERE key = ANY($1)",
        list(set(keys)),
    )
    return {r["key"]: DataSampleInfo(r["key"], r["owner"], tuple(r["data_manager_keys"]))
            for r in rows}


async def models(conn: asyncpg.Connection, keys: Iterable[str]) -> dict[str, ModelInfo]:
    rows = await conn.fetch(
        "SELECT key, owner, permissions, disabled FROM models WHERE key = ANY($1)",
        list(set(keys)),
    )
    return {r["key"]: ModelInfo(r["key"], r["owner"],
                                Permissions.from_json(json_value(r["permissions"])), r["disabled"])
            for r in rows}


async def datasets(conn: asyncpg.Connection, keys: Iterable[str]) -> dict[str, DatasetInfo]:
    rows = await conn.fetch(
        "SELECT key, owner, permissions FROM datasets WHERE key = ANY($1)", list(set(keys))
    )
    return {r["key"]: DatasetInfo(r["key"], r["owner"],
                                  Permissions.from_json(json_value(r["permissions"])))
            for r in rows}


_TASK_COLUMNS = ("key, owner, worker, rank, status, compute_plan_key, outputs, "
                 "parent_task_keys, version")


def _task(row: asyncpg.Record) -> StoredTask:
    outputs: dict[str, TaskOutput] = {
        name: output_from_json(o) for name, o in json_value(row["outputs"]).items()
    }
    return StoredTask(
        key=row["key"], owner=row["owner"], worker=row["worker"], rank=row["rank"],
        status=TaskStatus(row["status"]), compute_plan_key=row["compute_plan_key"],
        outputs=outputs, parent_task_keys=tuple(row["parent_task_keys"]),
    )


async def tasks(
    conn: asyncpg.Connection, keys: Iterable[str]
) -> tuple[dict[str, StoredTask], dict[str, int]]:
    """Tasks by key, and the version of each as read."""
    rows = await conn.fetch(
        f"SELECT {_TASK_COLUMNS} FROM compute_tasks WHERE key = ANY($1)", list(set(keys))
    )
    return {r["key"]: _task(r) for r in rows}, {r["key"]: r["version"] for r in rows}


async def children(
    conn: asyncpg.Connection, parent_key: str
) -> tuple[dict[str, StoredTask], dict[str, int]]:
    rows = await conn.fetch(
        f"SELECT {_TASK_COLUMNS} FROM compute_tasks WHERE parent_task_keys @> ARRAY[$1]",
        parent_key,
    )
    return {r["key"]: _task(r) for r in rows}, {r["key"]: r["version"] for r in rows}


async def plan_tasks(conn: asyncpg.Connection, plan_key: str) -> tuple[
    list[StoredTask], dict[str, int]
]:
    rows = await conn.fetch(
        f"SELECT {_TASK_COLUMNS} FROM compute_tasks WHERE compute_plan_key = $1", plan_key
    )
    return [_task(r) for r in rows], {r["key"]: r["version"] for r in rows}


async def plan(conn: asyncpg.Connection, key: str) -> tuple[PlanInfo, int] | None:
    row = await conn.fetchrow(
        "SELECT key, owner, cancelation_date, version FROM compute_plans WHERE key = $1", key
    )
    if row is None:
        return None
    return PlanInfo(row["key"], row["owner"], row["cancelation_date"] is not None), row["version"]


async def registered_outputs(conn: asyncpg.Connection, task_key: str) -> dict[str, int]:
    """How many assets each output identifier of a task has produced so far."""
    rows = await conn.fetch(
        "SELECT identifier, count(*) AS n FROM ("
        " SELECT identifier FROM models WHERE compute_task_key = $1"
        " UNION ALL SELECT identifier FROM performances WHERE compute_task_key = $1"
        " UNION ALL SELECT identifier FROM datasets WHERE compute_task_key = $1"
        ") o GROUP BY identifier",
        task_key,
    )
    return {r["identifier"]: r["n"] for r in rows}


async def disabled_outputs(
    conn: asyncpg.Connection, task_keys: Iterable[str]
) -> frozenset[tuple[str, str]]:
    rows = await conn.fetch(
        "SELECT compute_task_key, identifier FROM models "
        "WHERE compute_task_key = ANY($1) AND disabled", list(set(task_keys)),
    )
    return frozenset((r["compute_task_key"], r["identifier"]) for r in rows)


async def is_input_of_open_task(
    conn: asyncpg.Connection, org: str, task_key: str, asset_key: str,
    producer_task_key: str | None, producer_output: str | None,
) -> bool:
    """`org` is the worker of `task_key`, which is TODO or DOING (a runner fetches inputs
    while it starts the task) and takes this asset as input (by key, or as the output
    `producer_output` of its parent `producer_task_key`)."""
    row = await conn.fetchrow(
        "SELECT inputs FROM compute_tasks WHERE key = $1 AND worker = $2 "
        "AND status IN ('TODO', 'DOING')", task_key, org)
    if row is None:
        return False
    for item in json_value(row["inputs"]):
        if item.get("asset_key") == asset_key:
            return True
        if producer_task_key is not None and item.get("parent_task_key") == producer_task_key \
                and item.get("parent_output") == producer_output:
            return True
    return False
