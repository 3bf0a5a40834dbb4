"""The sequencer gives committed ledger entries their global position.

Appenders never take a global lock; they only lock their own org's chain head. After
they commit, the sequencer (any process may run one; they take turns through a
transaction-scoped advisory lock) reads the entries that are committed but not yet
placed, interleaves the orgs while keeping each org's sequence order, and inserts
consecutive positions in one transaction. Because a position is only ever given to an
entry that has already committed, and sequencer transactions never overlap, a reader
following positions can never skip an entry that committed late.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import logging
from collections.abc import Iterable

import asyncpg

from app.events.background import stop_task, wake_or_poll
from app.events.notifications import Notifications

log = logging.getLogger(__name__)

SEQUENCER_LOCK = 72_002
POSITIONS_CHANNEL = "consort_positions"


class Sequencer:
    def __init__(
        self, pool: asyncpg.Pool, notifications: Notifications, max_batch: int = 20_000
    ) -> None:
        self._pool = pool
        self._notifications = notifications
        self._max_batch = max_batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-sequencer")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _run(self) -> None:
        wake = self._notifications.subscribe("consort_ledger")
        while True:
            # Clear before working: a NOTIFY that arrives meanwhile must wake the next wait.
            wake.clear()
            try:
                placed = await self.sequence_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.exception("sequencer pass failed; retrying")
                placed = 0
                await asyncio.sleep(0.5)
            if placed >= self._max_batch:
                continue
            # A poll as a safety net: a NOTIFY can be missed while the listener reconnects.
            await wake_or_poll(wake, 0.5)

    async def sequence_once(self) -> int:
        """Place every committed, unplaced entry (up to max_batch); returns how many."""
        async with self._pool.acquire() as conn, conn.transaction():
            # The lock is taken by a statement of its own: in READ COMMITTED each statement
            # reads a snapshot taken when it starts, and the reads below must see what the
            # previous holder committed.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SEQUENCER_LOCK)
            # Committed, unplaced entries of every org, and where positions go on. An org's
            # head and its entries commit together, so one snapshot sees a consistent pair.
            # LATERAL: an index range scan per org whatever the planner's statistics say
            # (a fresh, unanalyzed ledger once got a sequential scan per pass).
            rows = await conn.fetch(
                "SELECT h.org, l.sequence, l.recorded_at, "
                "(SELECT coalesce(max(position), 0) FROM ledger_positions) AS start "
                "FROM ledger_heads h LEFT JOIN sequencer_marks m USING (org) "
                "CROSS JOIN LATERAL (SELECT sequence, recorded_at FROM ledger "
                "WHERE org = h.org AND sequence > coalesce(m.sequenced_through, 0) "
                "AND sequence <= h.last_sequence ORDER BY sequence) l "
                "WHERE h.last_sequence > coalesce(m.sequenced_through, 0) "
                "ORDER BY h.org, l.sequence"
            )
            if not rows:
                return 0
            start = rows[0]["start"]
            ordered = list(_interleave(rows))[: self._max_batch]
            await conn.copy_records_to_table(
                "ledger_positions",
                records=[(start + i + 1, org, seq) for i, (org, seq) in enumerate(ordered)],
                columns=("position", "org", "sequence"),
            )
            marks: dict[str, int] = {}
            for org, seq in ordered:
                marks[org] = seq
            await conn.execute(
                "WITH m AS (INSERT INTO sequencer_marks (org, sequenced_through) "
                "SELECT * FROM unnest($1::text[], $2::bigint[]) "
                "ON CONFLICT (org) DO UPDATE SET sequenced_through = EXCLUDED.sequenced_through) "
                "SELECT pg_notify($3, $4)",
                list(marks), list(marks.values()), POSITIONS_CHANNEL, str(start + len(ordered)),
            )
            return len(ordered)


def _interleave(rows: Iterable[asyncpg.Record]) -> Iterable[tuple[str, int]]:
    """Merge the orgs' runs by record time; each org's own order is kept as is."""
    runs: dict[str, list[tuple[dt.datetime, str, int]]] = {}
    for org, sequence, recorded_at, _ in rows:
        runs.setdefault(org, []).append((recorded_at, org, sequence))
    if len(runs) == 1:
        return ((org, sequence) for _, org, sequence in next(iter(runs.values())))
    # Tuples compare by (time, org) first: sequences of one org are never compared, as
    # each run is already in order and heapq.merge keeps ties in input order.
    return ((org, sequence) for _, org, sequence in heapq.merge(*runs.values()))
