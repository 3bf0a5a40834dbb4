"""The projection framework: views that follow the ledger exactly once.

A `Projection` owns some tables and knows how to fold ledger entries into them. The
`Projector` feeds it entries in global position order; in the same transaction as the
view's changes it moves the view's tracking position, so a crash anywhere leaves either
both or neither, and a restart resumes where the last commit stopped: no duplicate, no
gap. Several projectors (one per API process) may run; the tracking rows' locks make
them take turns. `reset()` drops every view; the projector then rebuilds from position 0.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from app.events.background import stop_task, wake_or_poll
from app.events.entries import LedgerEntry
from app.events.notifications import Notifications
from app.events.reader import read_positions

log = logging.getLogger(__name__)

PROJECTED_CHANNEL = "consort_projected"
# Entries per projection transaction: big enough that replay pays the per-batch round
# trips rarely, small enough that a live batch stays a short transaction.
BATCH_SIZE = 10_000

TRACKING_DDL = """
CREATE TABLE IF NOT EXISTS projection_tracking (
    name      text   PRIMARY KEY,
    position  bigint NOT NULL
);
-- Last sequence of each org that every view includes: what read-your-writes waits on.
CREATE TABLE IF NOT EXISTS projected_marks (
    org       text   PRIMARY KEY,
    sequence  bigint NOT NULL
);
"""


class Projection(abc.ABC):
    """A view: its tables, and how each ledger entry changes them."""

    name: str
    # Tables this view owns, in creation order; dropped in reverse by reset().
    tables: Sequence[str]
    ddl: str

    @abc.abstractmethod
    async def apply(self, conn: asyncpg.Connection, entries: Sequence[LedgerEntry]) -> None:
        """Fold entries (already in position order) into the view's tables."""


class Projector:
    def __init__(
        self,
        pool: asyncpg.Pool,
        projections: Sequence[Projection],
        notifications: Notifications | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self._pool = pool
        self.projections = list(projections)
        self._notifications = notifications
        self._batch_size = batch_size
        self._task: asyncio.Task[None] | None = None
        # (position it starts after, the read) of the next batch, while catching up.
        self._read_ahead: tuple[int, asyncio.Task[list[LedgerEntry]]] | None = None
        self.position = 0

    async def ensure_schema(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(72003)")
            await conn.execute(TRACKING_DDL)
            for projection in self.projections:
                await conn.execute(projection.ddl)
            await conn.executemany(
                "INSERT INTO projection_tracking (name, position) VALUES ($1, 0) "
                "ON CONFLICT DO NOTHING",
                [(p.name,) for p in self.projections],
            )

    async def reset(self) -> None:
        """Drop and recreate every view, tracking back at 0 (then catch_up rebuilds)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(72003)")
            await conn.execute(TRACKING_DDL)
            await conn.execute("LOCK TABLE projection_tracking IN EXCLUSIVE MODE")
            for projection in self.projections:
                for table in reversed(projection.tables):
                    await conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
                await conn.execute(projection.ddl)
            await conn.execute("DELETE FROM projected_marks")
            await conn.execute("DELETE FROM projection_tracking")
            await conn.executemany(
                "INSERT INTO projection_tracking (name, position) VALUES ($1, 0)",
                [(p.name,) for p in self.projections],
            )
        self.position = 0

    async def run_once(self, *, read_ahead: bool = False) -> int:
        """Apply the next batch of entries to every view; returns how many were read.

        With `read_ahead` (catching up a backlog) the batch after this one is read on
        another connection while this one is applied and committed: the ledger is
        immutable and positions are gapless, so that read needs no lock."""
        async with self._pool.acquire() as conn, conn.transaction():
            # Views can be rebuilt from the ledger, so a commit lost in a crash costs
            # nothing but a re-apply; skip waiting for the fsync (set_config(..., true) is
            # SET LOCAL, folded into the first query to save a round trip).
            tracking = {
                r["name"]: r["position"]
                for r in await conn.fetch(
                    "SELECT t.name, t.position FROM projection_tracking t, "
                    "set_config('synchronous_commit', 'off', true) "
                    "WHERE t.name = ANY($1) ORDER BY t.name FOR UPDATE OF t",
                    [p.name for p in self.projections],
                )
            }
            start = min(tracking.values(), default=0)
            entries = await self._take_read_ahead(start)
            if not entries:
                entries = await read_positions(conn, start, self._batch_size, hashes=False)
            if not entries:
                self.position = start
                return 0
            if read_ahead and entries[-1].position is not None:
                self._read_ahead = (entries[-1].position, asyncio.create_task(
                    self._read_alone(entries[-1].position)))
            for projection in self.projections:
                done = tracking[projection.name]
                todo = entries if done <= start else [
                    e for e in entries if e.position is not None and e.position > done]
                if todo:
                    await projection.apply(conn, todo)
            last = entries[-1].position
            assert last is not None
            marks: dict[str, int] = {}
            for entry in entries:
                marks[entry.org] = entry.sequence
            # The marks ride along so waiters in every process learn them without a query
            # (NOTIFY payloads are capped near 8 kB; past that waiters read the table).
            payload = json.dumps({"position": last, "marks": marks}, separators=(",", ":"))
            if len(payload) > 7000:
                payload = json.dumps({"position": last})
            # Tracking, marks and the notification in one statement.
            await conn.execute(
                "WITH t AS (UPDATE projection_tracking SET position = $2 WHERE name = ANY($1)), "
                "m AS (INSERT INTO projected_marks (org, sequence) "
                "SELECT * FROM unnest($3::text[], $4::bigint[]) "
                "ON CONFLICT (org) DO UPDATE SET sequence = EXCLUDED.sequence) "
                "SELECT pg_notify($5, $6)",
                [p.name for p in self.projections], last, list(marks), list(marks.values()),
                PROJECTED_CHANNEL, payload,
            )
        self.position = last
        return len(entries)

    async def catch_up(self, on_batch: Callable[[int], None] | None = None) -> int:
        """Apply batches until nothing is left; returns the number of entries applied.

        `on_batch` hears the running total after each batch (for progress reports)."""
        total = 0
        try:
            while True:
                applied = await self.run_once(read_ahead=True)
                total += applied
                if applied == 0:
                    return total
                if on_batch is not None:
                    on_batch(total)
        finally:
            await self._take_read_ahead(-1)  # drop one left over (an error, or the end)

    async def _read_alone(self, after: int) -> list[LedgerEntry]:
        async with self._pool.acquire() as conn:
            return await read_positions(conn, after, self._batch_size, hashes=False)

    async def _take_read_ahead(self, start: int) -> list[LedgerEntry]:
        """The batch read ahead if it starts at `start` (else nothing; it is dropped)."""
        pending, self._read_ahead = self._read_ahead, None
        if pending is None:
            return []
        after, task = pending
        if after != start:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return []
        return await task

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="projector")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _run(self) -> None:
        assert self._notifications is not None
        wake = self._notifications.subscribe("consort_positions")
        while True:
            wake.clear()
            try:
                applied = await self.run_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.exception("projector pass failed; retrying")
                applied = 0
                await asyncio.sleep(0.5)
            if applied >= self._batch_size:
                continue
            await wake_or_poll(wake, 0.5)


# Below this many rows an INSERT per row (pipelined by executemany) is as cheap as COPY.
COPY_THRESHOLD = 16


async def insert_rows(
    conn: asyncpg.Connection, table: str, columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
) -> None:
    """Insert view rows: COPY for a big run (replay, a 10,000-task plan), else INSERTs.

    COPY costs PostgreSQL a few microseconds a row where an INSERT costs tens; json(b)
    columns take the JSON text, as with INSERT."""
    if len(rows) >= COPY_THRESHOLD:
        await conn.copy_records_to_table(table, records=rows, columns=list(columns))
    elif rows:
        await conn.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join(f'${i + 1}' for i in range(len(columns)))})",
            rows,
        )


def runs_by_type(entries: Sequence[LedgerEntry]) -> list[tuple[str, list[LedgerEntry]]]:
    """Consecutive entries of one event type, grouped: lets a view write each run with one
    executemany while keeping the ledger's order between runs."""
    runs: list[tuple[str, list[LedgerEntry]]] = []
    for entry in entries:
        if runs and runs[-1][0] == entry.event_type:
            runs[-1][1].append(entry)
        else:
            runs.append((entry.event_type, [entry]))
    return runs


async def dump_views(conn: asyncpg.Connection, projections: Sequence[Projection]) -> dict[str, Any]:
    """Every row of every view, in a stable order: for comparing live and rebuilt views."""
    dump: dict[str, Any] = {}
    for projection in projections:
        for table in projection.tables:
            rows = await conn.fetch(f"SELECT * FROM {table}")
            dump[table] = sorted(
                json.dumps(dict(r), default=str, sort_keys=True) for r in rows
            )
    return dump
