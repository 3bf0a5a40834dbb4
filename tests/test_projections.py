"""Views follow the ledger exactly once and are rebuilt identically by replay."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import httpx
import pytest

from app.events.entries import AppendRequest, LedgerEntry, NewEvent
from app.projections.framework import Projection, Projector, dump_views
from app.runtime import Runtime, all_projections
from tests.conftest import bearer, register_org


class Crash(Exception):
    pass


class PositionLog(Projection):
    """Records each position it is given; the primary key turns a duplicate into an error."""

    name = "position_log"
    tables = ("position_log",)
    ddl = "CREATE TABLE IF NOT EXISTS position_log (position bigint PRIMARY KEY)"

    def __init__(self, crash_after_batches: int | None = None) -> None:
        self.crash_after_batches = crash_after_batches
        self.batches = 0

    async def apply(self, conn: asyncpg.Connection, entries: Sequence[LedgerEntry]) -> None:
        await conn.executemany(
            "INSERT INTO position_log VALUES ($1)", [(e.position,) for e in entries]
        )
        self.batches += 1
        if self.crash_after_batches is not None and self.batches > self.crash_after_batches:
            raise Crash("killed mid-replay")


async def _fill(runtime: Runtime, n: int) -> None:
    await asyncio.gather(*(
        runtime.appender.append(AppendRequest(
            f"org-{i % 4}", "x",
            [NewEvent("note", f"k{i}", "NoteWritten", {"n": i})],
        ))
        for i in range(n)
    ))
    while True:
        async with runtime.pool.acquire() as conn:
            if await conn.fetchval("SELECT count(*) FROM ledger_positions") == n:
                return
        await asyncio.sleep(0.02)


async def test_projector_killed_mid_replay_resumes_with_no_duplicate_and_no_gap(
    runtime: Runtime,
) -> None:
    await _fill(runtime, 500)
    crashing = Projector(runtime.pool, [PositionLog(crash_after_batches=3)], batch_size=50)
    await crashing.ensure_schema()
    with pytest.raises(Crash):
        await crashing.catch_up()
    async with runtime.pool.acquire() as conn:
        tracked = await conn.fetchval(
            "SELECT position FROM projection_tracking WHERE name = 'position_log'"
        )
        logged = await conn.fetchval("SELECT count(*) FROM position_log")
    assert tracked == 150 and logged == 150  # the fourth batch rolled back with the crash

    restarted = Projector(runtime.pool, [PositionLog()], batch_size=50)
    await restarted.catch_up()
    async with runtime.pool.acquire() as conn:
        positions = [r[0] for r in await conn.fetch("SELECT position FROM position_log "
                                                     "ORDER BY position")]
    assert positions == list(range(1, 501))


async def test_replay_rebuilds_views_identical_to_the_live_ones(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    tokens = [await register_org(client, f"org-{i}") for i in range(6)]
    for token in tokens:
        issued = await client.post("/tokens", json={"name": "extra"}, headers=bearer(token))
        await client.delete(f"/tokens/{issued.json()['info']['id']}", headers=bearer(token))
    await client.post("/tokens", json={"role": "auditor", "name": "audit"})
    async with runtime.pool.acquire() as conn:
        live = await dump_views(conn, all_projections())
    assert live["organizations"] and live["api_tokens"]

    await runtime.projector.stop()
    await runtime.projector.reset()
    async with runtime.pool.acquire() as conn:
        assert (await dump_views(conn, all_projections()))["api_tokens"] == []
    await runtime.projector.catch_up()
    async with runtime.pool.acquire() as conn:
        rebuilt = await dump_views(conn, all_projections())
    assert rebuilt == live


async def test_two_projectors_never_apply_an_entry_twice(runtime: Runtime) -> None:
    await _fill(runtime, 300)
    first = Projector(runtime.pool, [PositionLog()], batch_size=20)
    await first.ensure_schema()
    second = Projector(runtime.pool, [PositionLog()], batch_size=20)
    await asyncio.gather(first.catch_up(), second.catch_up())
    async with runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM position_log") == 300
