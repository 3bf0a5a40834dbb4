"""Task leases: which runner holds each DOING task, until when, and on which attempt.

A lease is operational state, like task logs: it changes every few seconds while a task
runs, so it lives beside the ledger in `task_leases` rather than in it. The ledger only
records what a lease decides: DOING (started), and TODO or FAILED when one expired.
Rows are kept after the task ends so that the attempt count survives.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import asyncpg

DDL = """
CREATE TABLE IF NOT EXISTS task_leases (
    task_key    text        PRIMARY KEY,
    runner_id   text        NOT NULL,
    attempt     integer     NOT NULL,
    expires_at  timestamptz NOT NULL
);
"""


_COLUMNS = "task_key, runner_id, attempt, expires_at"  # the fields of Lease


@dataclasses.dataclass(frozen=True)
class Lease:
    task_key: str
    runner_id: str
    attempt: int
    expires_at: dt.datetime

    @property
    def live(self) -> bool:
        return self.expires_at > dt.datetime.now(dt.UTC)


@dataclasses.dataclass(frozen=True)
class ExpiredRun:
    """A DOING task whose runner stopped renewing its lease."""

    task_key: str
    runner_id: str
    attempt: int


class TaskLeases:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def ensure_schema(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(DDL)

    async def attempts(self, task_key: str) -> int:
        """How many runs of the task have started so far."""
        async with self._pool.acquire() as conn:
            value = await conn.fetchval(
                "SELECT attempt FROM task_leases WHERE task_key = $1", task_key)
        return int(value or 0)

    async def grant(self, task_key: str, runner_id: str, ttl_s: float) -> Lease | None:
        """A new run of the task is about to start: `runner_id` holds it, on the next
        attempt. None while another runner holds a live lease on it.

        Taken before DOING is recorded, so that a DOING task always has a live lease
        (the sweeper never sees one in between) and two runners never both start it.
        """
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "INSERT INTO task_leases AS l (task_key, runner_id, attempt, expires_at) "
                "VALUES ($1, $2, 1, now() + make_interval(secs => $3)) "
                "ON CONFLICT (task_key) DO UPDATE SET runner_id = EXCLUDED.runner_id, "
                "attempt = l.attempt + 1, expires_at = EXCLUDED.expires_at "
                "WHERE l.expires_at < now() "
                f"RETURNING {_COLUMNS}",
                task_key, runner_id, ttl_s,
            )
        return Lease(**dict(row)) if row is not None else None

    async def release(self, lease: Lease) -> None:
        """Give a lease up at once (its run did not start after all): expire it now,
        keeping the row so the attempt count stays right for the next start."""
        async with self._pool.acquire() as conn:
            await conn.execute(
                "UPDATE task_leases SET expires_at = now() - interval '1 second', "
                "attempt = attempt - 1 WHERE task_key = $1 AND runner_id = $2 "
                "AND attempt = $3", lease.task_key, lease.runner_id, lease.attempt)

    async def renew(self, task_key: str, runner_id: str, ttl_s: float) -> Lease | None:
        """Extend the lease if `runner_id` still holds it; None when it does not."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "UPDATE task_leases SET expires_at = now() + make_interval(secs => $3) "
                "WHERE task_key = $1 AND runner_id = $2 "
                f"RETURNING {_COLUMNS}",
                task_key, runner_id, ttl_s,
            )
        return Lease(**dict(row)) if row is not None else None

    async def holder(self, task_key: str) -> Lease | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM task_leases "
                "WHERE task_key = $1", task_key)
        return Lease(**dict(row)) if row is not None else None

    async def expired(self, limit: int = 100) -> list[ExpiredRun]:
        """DOING tasks whose lease expired. A task started without a runner id (a
        person playing the worker by hand) has no lease and is never expired."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT t.key, l.runner_id, l.attempt FROM task_leases l "
                "JOIN compute_tasks t ON t.key = l.task_key "
                "WHERE l.expires_at < now() AND t.status = 'DOING' "
                "ORDER BY l.expires_at LIMIT $1",
                limit,
            )
        return [ExpiredRun(r["key"], r["runner_id"], r["attempt"]) for r in rows]
