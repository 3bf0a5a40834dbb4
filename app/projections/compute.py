"""Views of compute plans and tasks and what tasks produce: models, performances, failures.

Plan status and per-status counts are maintained here from task events; the status itself
is derived by the domain rule `plan_status`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import asyncpg

from app.domain.plans import plan_status
from app.domain.tasks import TaskStatus
from app.events.entries import LedgerEntry
from app.projections.assets import j
from app.projections.framework import Projection, insert_rows, runs_by_type

STATUS_COLUMNS = {s: f"n_{s.value.lower()}" for s in TaskStatus}
_FINAL = ("DONE", "FAILED", "CANCELED")
_INSERT_TASKS = """
WITH e AS MATERIALIZED (  -- parse each entry's JSON once (inlined, it would be per field)
    SELECT data::jsonb AS d, at, position, version
    FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::int[])
        AS u(data, at, position, version)
), ins AS (
    INSERT INTO compute_tasks (key, compute_plan_key, function_key, owner, worker, rank, status,
        category, inputs, outputs, parent_task_keys, logs_permission, metadata, created_at,
        position, version, end_date)
    SELECT d->>'key', d->>'compute_plan_key', d->>'function_key', d->>'owner', d->>'worker',
        (d->>'rank')::int, d->>'status', d->>'category', d->'inputs', d->'outputs',
        ARRAY(SELECT jsonb_array_elements_text(d->'parent_task_keys')), d->'logs_permission',
        d->'metadata', at, position, version,
        CASE WHEN d->>'status' = ANY($5::text[]) THEN at END
    FROM e
    RETURNING compute_plan_key, status
)
SELECT compute_plan_key, status, count(*)::int AS n FROM ins GROUP BY 1, 2
"""


class ComputeView(Projection):
    name = "compute"
    tables = ("compute_plans", "compute_tasks", "models", "performances", "failure_reports")
    ddl = f"""
    CREATE TABLE IF NOT EXISTS compute_plans (
        key text PRIMARY KEY, owner text NOT NULL, name text NOT NULL, tag text NOT NULL,
        metadata jsonb NOT NULL, created_at timestamptz NOT NULL, position bigint NOT NULL,
        version integer NOT NULL, status text NOT NULL, {", ".join(f"{c} integer NOT NULL DEFAULT 0"
                                          for c in STATUS_COLUMNS.values())},
        start_date timestamptz, end_date timestamptz,
        cancelation_date timestamptz, failure_date timestamptz
    );
    CREATE INDEX IF NOT EXISTS compute_plans_owner ON compute_plans (owner, position);
    CREATE TABLE IF NOT EXISTS compute_tasks (
        key text PRIMARY KEY, compute_plan_key text NOT NULL, function_key text NOT NULL,
        owner text NOT NULL, worker text NOT NULL, rank integer NOT NULL, status text NOT NULL,
        category text NOT NULL, inputs jsonb NOT NULL, outputs jsonb NOT NULL,
        parent_task_keys text[] NOT NULL, logs_permission jsonb NOT NULL,
        metadata jsonb NOT NULL, created_at timestamptz NOT NULL, position bigint NOT NULL,
        version integer NOT NULL, start_date timestamptz, end_date timestamptz,
        error_type text
    );
    CREATE INDEX IF NOT EXISTS compute_tasks_plan ON compute_tasks (compute_plan_key, position);
    CREATE INDEX IF NOT EXISTS compute_tasks_worker ON compute_tasks (worker, status, position);
    CREATE INDEX IF NOT EXISTS compute_tasks_parents ON compute_tasks USING gin (parent_task_keys);
    -- What the dispatcher and the lease sweeper look for, among many final tasks.
    CREATE INDEX IF NOT EXISTS compute_tasks_open ON compute_tasks (status, position)
        WHERE status IN ('TODO', 'DOING');
    CREATE TABLE IF NOT EXISTS models (
        key text PRIMARY KEY, compute_task_key text NOT NULL, identifier text NOT NULL,
        owner text NOT NULL, permissions jsonb NOT NULL, checksum text NOT NULL,
        size bigint NOT NULL, transient boolean NOT NULL, disabled boolean NOT NULL,
        created_at timestamptz NOT NULL, position bigint NOT NULL
    );
    CREATE INDEX IF NOT EXISTS models_task ON models (compute_task_key, identifier);
    CREATE TABLE IF NOT EXISTS performances (
        key text PRIMARY KEY, compute_task_key text NOT NULL, compute_plan_key text NOT NULL,
        identifier text NOT NULL, value double precision NOT NULL,
        created_at timestamptz NOT NULL, position bigint NOT NULL
    );
    CREATE INDEX IF NOT EXISTS performances_plan ON performances (compute_plan_key, position);
    CREATE TABLE IF NOT EXISTS failure_reports (
        key text PRIMARY KEY, error_type text NOT NULL, logs_checksum text, message text NOT NULL,
        created_at timestamptz NOT NULL
    );
    """

    async def apply(self, conn: asyncpg.Connection, entries: Sequence[LedgerEntry]) -> None:
        touched_plans: set[str] = set()
        for event_type, run in runs_by_type(entries):
            if event_type == "ComputePlanRegistered":
                await insert_rows(
                    conn, "compute_plans", ("key", "owner", "name", "tag", "metadata",
                                            "created_at", "position", "version", "status"),
                    [(d["key"], d["owner"], d["name"], d["tag"], j(d["metadata"]),
                      e.recorded_at, e.position, e.version, "EMPTY")
                     for e in run for d in (e.data,)],
                )
            elif event_type == "ComputePlanCanceled":
                await conn.executemany(
                    "UPDATE compute_plans SET cancelation_date = $2, version = $3 WHERE key = $1",
                    [(e.data["key"], e.recorded_at, e.version) for e in run],
                )
                touched_plans.update(e.data["key"] for e in run)
            elif event_type == "TaskRegistered":
                # PostgreSQL takes the fields out of the entries' JSON itself: a plan of
                # 10,000 tasks is one statement, with no decoding and re-encoding of every
                # task's inputs and outputs in Python. The counts per (plan, status) come back.
                counts = await conn.fetch(
                    _INSERT_TASKS, [e.current_json for e in run], [e.recorded_at for e in run],
                    [e.position for e in run], [e.version for e in run], list(_FINAL),
                )
                await self._count(conn, Counter(
                    {(r["compute_plan_key"], r["status"]): r["n"] for r in counts}), Counter())
                touched_plans.update(r["compute_plan_key"] for r in counts)
            elif event_type == "TaskStatusChanged":
                datas = [e.data for e in run]
                await conn.executemany(
                    "UPDATE compute_tasks SET status = $2, version = $3, error_type = $4, "
                    "start_date = CASE WHEN $2 = 'DOING' THEN $5 ELSE start_date END, "
                    "end_date = CASE WHEN $2 = ANY($6::text[]) THEN $5 ELSE end_date END "
                    "WHERE key = $1",
                    [(d["key"], d["status"], e.version, d.get("error_type"), e.recorded_at,
                      list(_FINAL)) for e, d in zip(run, datas, strict=True)],
                )
                added = Counter((d["compute_plan_key"], d["status"]) for d in datas)
                removed = Counter((d["compute_plan_key"], d["previous"]) for d in datas)
                await self._count(conn, added, removed)
                await conn.executemany(
                    "UPDATE compute_plans SET "
                    "start_date = CASE WHEN $2 = 'DOING' THEN coalesce(start_date, $3) "
                    "ELSE start_date END, "
                    "failure_date = CASE WHEN $2 = 'FAILED' THEN coalesce(failure_date, $3) "
                    "ELSE failure_date END WHERE key = $1",
                    [(d["compute_plan_key"], d["status"], e.recorded_at)
                     for e, d in zip(run, datas, strict=True)],
                )
                touched_plans.update(d["compute_plan_key"] for d in datas)
            elif event_type == "ModelRegistered":
                await insert_rows(
                    conn, "models", ("key", "compute_task_key", "identifier", "owner",
                                     "permissions", "checksum", "size", "transient", "disabled",
                                     "created_at", "position"),
                    [(d["key"], d["compute_task_key"], d["identifier"], d["owner"],
                      j(d["permissions"]), d["checksum"], d["size"], d["transient"], False,
                      e.recorded_at, e.position) for e in run for d in (e.data,)],
                )
            elif event_type == "ModelDisabled":
                await conn.executemany(
                    "UPDATE models SET disabled = true WHERE key = $1",
                    [(e.data["key"],) for e in run],
                )
            elif event_type == "PerformanceRegistered":
                await insert_rows(
                    conn, "performances", ("key", "compute_task_key", "compute_plan_key",
                                           "identifier", "value", "created_at", "position"),
                    [(d["key"], d["compute_task_key"], d["compute_plan_key"], d["identifier"],
                      d["value"], e.recorded_at, e.position) for e in run for d in (e.data,)],
                )
            elif event_type == "FailureReportRegistered":
                await insert_rows(
                    conn, "failure_reports", ("key", "error_type", "logs_checksum", "message",
                                              "created_at"),
                    [(d["key"], d["error_type"], d["logs_checksum"], d["message"], e.recorded_at)
                     for e in run for d in (e.data,)],
                )
        if touched_plans:
            await self._refresh_status(conn, sorted(touched_plans),
                                       max(e.recorded_at for e in entries))

    async def _count(
        self, conn: asyncpg.Connection, added: Counter[tuple[str, str]],
        removed: Counter[tuple[str, str]],
    ) -> None:
        deltas: Counter[tuple[str, str]] = Counter(added)
        deltas.subtract(removed)
        for (plan, status), delta in deltas.items():
            if delta:
                column = STATUS_COLUMNS[TaskStatus(status)]
                await conn.execute(
                    f"UPDATE compute_plans SET {column} = {column} + $2 WHERE key = $1",
                    plan, delta,
                )

    async def _refresh_status(
        self, conn: asyncpg.Connection, plans: list[str], when: object
    ) -> None:
        columns = ", ".join(STATUS_COLUMNS.values())
        rows = await conn.fetch(
            f"SELECT key, status, end_date, cancelation_date, {columns} FROM compute_plans "
            "WHERE key = ANY($1)", plans,
        )
        updates = []
        for row in rows:
            counts = {s: row[c] for s, c in STATUS_COLUMNS.items()}
            status = plan_status(counts, row["cancelation_date"] is not None).value
            ended = status in ("DONE", "FAILED", "CANCELED")
            end_date = (row["end_date"] or when) if ended else None
            if status != row["status"] or end_date != row["end_date"]:
                updates.append((row["key"], status, end_date))
        if updates:
            await conn.executemany(
                "UPDATE compute_plans SET status = $2, end_date = $3 WHERE key = $1", updates
            )
