"""Group commit: concurrent append requests share one transaction.

Every command's events go through `Appender.append`. A single writer task per process
drains the queue and writes whatever has accumulated (from any organization) in one
transaction: lock the chain heads of the orgs involved (row locks, never a table lock),
check optimistic versions, COPY the rows, move the heads, commit once. One fsync thus
carries many commands. A request that fails its version check is refused alone; the
rest of the batch commits. Global positions are not assigned here but by the sequencer
after commit (docs/adr/0002-ledger-ordering.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
import uuid
from collections.abc import Iterator

import asyncpg

from app.domain.errors import Conflict
from app.events.background import stop_task
from app.events.canonical import GENESIS_HASH, chain_hash_of
from app.events.entries import (
    AppendRequest,
    LedgerEntry,
    canonical_entry,
    encode_data,
    format_time,
)

log = logging.getLogger(__name__)

LEDGER_CHANNEL = "consort_ledger"
LEDGER_COLUMNS = (
    "org", "sequence", "id", "recorded_at", "actor", "asset_kind", "asset_key", "version",
    "event_type", "data", "reason", "prev_hash", "hash",
)


class VersionConflict(Conflict):
    """Another command changed an aggregate since this one read it."""

    def __init__(self, aggregate: str, expected: int, actual: int) -> None:
        super().__init__(
            f"{aggregate} changed concurrently (expected version {expected}, found {actual}); "
            "read it again and retry",
            code="concurrent_modification",
            key=aggregate.partition("/")[2],
        )
        self.aggregate = aggregate


@dataclasses.dataclass
class _Pending:
    request: AppendRequest
    future: asyncio.Future[list[LedgerEntry]]


class Appender:
    """Appends requests to the ledger with group commit; start() before use."""

    def __init__(self, pool: asyncpg.Pool, max_batch_events: int = 5000) -> None:
        self._pool = pool
        self._max_batch_events = max_batch_events
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.appended_events = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-appender")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("ledger appender stopped"))

    async def append(self, request: AppendRequest) -> list[LedgerEntry]:
        """Append one command's events atomically; returns the recorded entries."""
        if not request.events:
            return []
        future: asyncio.Future[list[LedgerEntry]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(request, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0].request.events)
            while not self._queue.empty() and size < self._max_batch_events:
                item = self._queue.get_nowait()
                batch.append(item)
                size += len(item.request.events)
            batch = [p for p in batch if not p.future.cancelled()]
            if not batch:
                continue
            for attempt in range(3):
                try:
                    await self._write(batch)
                    break
                except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                    log.warning("ledger batch hit a deadlock, retrying (attempt %d)", attempt + 1)
                except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
                    log.exception("ledger batch failed")
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(exc)
                    break
            else:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(RuntimeError("ledger busy, retry"))

    async def _write(self, batch: list[_Pending]) -> None:
        orgs = sorted({p.request.org for p in batch})
        aggregates = sorted(
            {e.aggregate for p in batch for e in p.request.events}
            | {a for p in batch for a in p.request.expected_versions}
        )
        results: list[tuple[_Pending, list[LedgerEntry] | Exception]] = []
        # Six round trips per batch, whatever its size: BEGIN, heads, aggregates, COPY,
        # moves, COMMIT. An upsert whose conflict branch rewrites the row unchanged both
        # creates what is missing and locks what exists (in the order of the sorted input),
        # and returns the latest committed values, as SELECT ... FOR UPDATE would.
        async with self._pool.acquire() as conn, conn.transaction():
            heads = {
                r["org"]: (r["last_sequence"], bytes(r["last_hash"]))
                for r in await conn.fetch(
                    "INSERT INTO ledger_heads AS h (org, last_sequence, last_hash) "
                    "SELECT unnest($1::text[]), 0, $2 "
                    "ON CONFLICT (org) DO UPDATE SET org = h.org "
                    "RETURNING org, last_sequence, last_hash",
                    orgs, GENESIS_HASH,
                )
            }
            # Heads first, then aggregates, each in key order: a fixed lock order.
            read: dict[str, int] = {
                r["aggregate"]: r["version"]
                for r in await conn.fetch(
                    "INSERT INTO aggregate_versions AS a (aggregate, version) "
                    "SELECT unnest($1::text[]), 0 "
                    "ON CONFLICT (aggregate) DO UPDATE SET version = a.version "
                    "RETURNING aggregate, version",
                    aggregates,
                )
            }
            versions = dict(read)
            now = dt.datetime.now(dt.UTC)
            time = format_time(now)
            ids = _uuids(sum(len(p.request.events) for p in batch))
            rows: list[tuple[object, ...]] = []
            for pending in batch:
                request = pending.request
                conflict = _check_versions(request, versions)
                if conflict is not None:
                    results.append((pending, conflict))
                    continue
                org, actor = request.org, request.actor
                last_sequence, last_hash = heads[org]
                entries: list[LedgerEntry] = []
                for event in request.events:
                    last_sequence += 1
                    aggregate = event.aggregate
                    version = versions[aggregate] = versions[aggregate] + 1
                    entry_id = next(ids)
                    data_json = encode_data(event.data)
                    digest = chain_hash_of(last_hash, canonical_entry(
                        id=entry_id, org=org, sequence=last_sequence, time=time, actor=actor,
                        asset_kind=event.asset_kind, asset_key=event.asset_key,
                        version=version, event_type=event.event_type, data_json=data_json,
                        reason=event.reason,
                    ))
                    entries.append(LedgerEntry(
                        id=entry_id, org=org, sequence=last_sequence, recorded_at=now,
                        actor=actor, asset_kind=event.asset_kind, asset_key=event.asset_key,
                        version=version, event_type=event.event_type, data_json=data_json,
                        reason=event.reason, prev_hash=last_hash, hash=digest,
                    ))
                    rows.append((
                        org, last_sequence, entry_id, now, actor, event.asset_kind,
                        event.asset_key, version, event.event_type, data_json, event.reason,
                        last_hash, digest,
                    ))
                    last_hash = digest
                heads[org] = (last_sequence, last_hash)
                results.append((pending, entries))
            if rows:
                await conn.copy_records_to_table("ledger", records=rows, columns=LEDGER_COLUMNS)
                touched = [o for o in orgs if heads[o][0] > 0]
                moved = [a for a in aggregates if versions[a] != read[a]]
                await conn.execute(
                    "WITH h AS (UPDATE ledger_heads h SET last_sequence = n.seq, "
                    "last_hash = n.hash "
                    "FROM unnest($1::text[], $2::bigint[], $3::bytea[]) AS n(org, seq, hash) "
                    "WHERE h.org = n.org), "
                    "a AS (UPDATE aggregate_versions a SET version = n.version "
                    "FROM unnest($4::text[], $5::int[]) AS n(aggregate, version) "
                    "WHERE a.aggregate = n.aggregate) "
                    f"SELECT pg_notify('{LEDGER_CHANNEL}', '')",
                    touched, [heads[o][0] for o in touched], [heads[o][1] for o in touched],
                    moved, [versions[a] for a in moved],
                )
        for pending, outcome in results:
            if pending.future.done():
                continue
            if isinstance(outcome, Exception):
                pending.future.set_exception(outcome)
            else:
                self.appended_events += len(outcome)
                pending.future.set_result(outcome)


def _uuids(count: int) -> Iterator[str]:
    """Random (version 4) UUIDs, from one read of the OS's random source."""
    raw = os.urandom(16 * count)
    for i in range(0, 16 * count, 16):
        yield str(uuid.UUID(bytes=raw[i:i + 16], version=4))


def _check_versions(request: AppendRequest, versions: dict[str, int]) -> Conflict | None:
    for aggregate, expected in request.expected_versions.items():
        actual = versions.get(aggregate, 0)
        if actual != expected:
            return VersionConflict(aggregate, expected, actual)
    return None

