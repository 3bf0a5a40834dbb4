"""Reading asset rows from the views for the HTTP layer: one shape for every asset kind."""

from __future__ import annotations

from typing import Any

from app.api.filters import MetadataFilter
from app.api.pagination import decode_cursor, encode_cursor
from app.api.schemas_assets import PermissionsIn
from app.domain.errors import Forbidden, NotFound
from app.domain.organizations import Principal
from app.domain.permissions import Permission, Permissions, permission
from app.projections import queries as q
from app.projections.queries import json_value
from app.runtime import Runtime


async def resolve_permissions(runtime: Runtime, body: PermissionsIn, owner: str) -> Permissions:
    async with runtime.pool.acquire() as conn:
        orgs = await q.org_ids(conn)
    process = permission(body.process.public, body.process.authorized_ids, owner, orgs)
    download = process if body.download is None else permission(
        body.download.public, body.download.authorized_ids, owner, orgs)
    return Permissions(process, download)


async def require_logs_permission(runtime: Runtime, actor: Principal, task_key: str) -> None:
    """A task's logs, and its failure report which holds them, follow the task's
    logs_permission (the administrator reads every one)."""
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT logs_permission FROM compute_tasks WHERE key = $1", task_key)
    if row is None:
        raise NotFound(f"no compute task {task_key}")
    perm = Permission.from_json(json_value(row["logs_permission"]))
    if actor.kind != "admin" and (actor.org is None or not perm.allows(actor.org)):
        raise Forbidden(f"{actor.org or actor.kind} may not read the logs of {task_key}")


async def asset_exists(runtime: Runtime, key: str) -> bool:
    async with runtime.pool.acquire() as conn:
        return key in await q.existing_keys(conn, [key])


async def asset_row(runtime: Runtime, table: str, key: str) -> dict[str, Any]:
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow(f"SELECT * FROM {table} WHERE key = $1", key)
    if row is None:
        raise NotFound(f"no {table[:-1].replace('_', ' ')} {key}")
    return decode_row(dict(row))


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    row.pop("position", None)
    return {k: json_value(v) if k in _JSON_FIELDS else v for k, v in row.items()}


_JSON_FIELDS = {"permissions", "logs_permission", "metadata", "inputs", "outputs", "command",
                "entrypoint", "environment", "files"}


async def list_assets(
    runtime: Runtime, table: str, cursor: str | None, limit: int, owner: str | None,
    metadata: MetadataFilter, extra_sql: str = "", extra_args: tuple[Any, ...] = (),
) -> dict[str, Any]:
    """A page of `table` in registration order; `extra_sql` numbers its parameters from $6."""
    after = decode_cursor(cursor, 1)
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT * FROM {table} WHERE position > $1 AND ($2::text IS NULL OR owner = $2) "
            f"{MetadataFilter.sql(4)} {extra_sql} ORDER BY position LIMIT $3",
            after[0] if after else 0, owner, limit + 1, *metadata.args, *extra_args,
        )
    more = len(rows) > limit
    return {"items": [decode_row(dict(r)) for r in rows[:limit]],
            "next_cursor": encode_cursor([rows[limit - 1]["position"]]) if more else None}


