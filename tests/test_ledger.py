"""The ledger on a real PostgreSQL: chain, immutability, concurrency, global order."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg
import httpx
import pytest

from app.domain.errors import Conflict
from app.events.appender import Appender
from app.events.canonical import chain_hash
from app.events.entries import AppendRequest, NewEvent, encode_data, hashed_fields
from app.events.reader import read_org, read_positions
from app.events.verify import verify_org
from app.runtime import Runtime
from tests.conftest import register_org


def _event(key: str, n: int = 0) -> NewEvent:
    return NewEvent(asset_kind="note", asset_key=key, event_type="NoteWritten", data={"n": n})


async def _settled(runtime: Runtime) -> None:
    """Wait until the sequencer has placed everything appended so far."""
    for _ in range(200):
        async with runtime.pool.acquire() as conn:
            pending = await conn.fetchval(
                "SELECT count(*) FROM ledger l LEFT JOIN ledger_positions p "
                "USING (org, sequence) WHERE p.position IS NULL"
            )
        if pending == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("sequencer did not place every entry")


async def test_appends_form_a_gapless_chain_per_org(runtime: Runtime) -> None:
    await asyncio.gather(*(
        runtime.appender.append(AppendRequest(org, org, [_event(f"{org}-{i}", i)]))
        for i in range(50) for org in ("org-a", "org-b")
    ))
    async with runtime.pool.acquire() as conn:
        for org in ("org-a", "org-b"):
            entries = await read_org(conn, org, 0, 1000)
            assert [e.sequence for e in entries] == list(range(1, 51))
            assert all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:], strict=False))
            result = await verify_org(conn, org)
            assert result.ok and result.entries_checked == 50


async def test_a_command_with_several_events_is_appended_atomically(runtime: Runtime) -> None:
    await runtime.appender.append(AppendRequest("org-a", "org-a", [_event("x")]))
    request = AppendRequest(
        "org-a", "org-a", [_event("y"), _event("x", 1)], expected_versions={"note/x": 0}
    )
    with pytest.raises(Conflict):
        await runtime.appender.append(request)
    async with runtime.pool.acquire() as conn:
        assert [e.asset_key for e in await read_org(conn, "org-a", 0, 10)] == ["x"]


async def test_ledger_rows_cannot_be_updated_or_deleted(runtime: Runtime) -> None:
    await runtime.appender.append(AppendRequest("org-a", "org-a", [_event("x")]))
    await _settled(runtime)
    async with runtime.pool.acquire() as conn:
        for sql in (
            "UPDATE ledger SET reason = 'x'",
            "DELETE FROM ledger",
            "TRUNCATE ledger CASCADE",
            "UPDATE ledger_positions SET position = position + 100",
            "DELETE FROM ledger_positions",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)


async def test_tampering_with_one_row_is_named_by_verify(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    for i in range(5):
        await runtime.appender.append(AppendRequest("org-a", "org-a", [_event(f"k{i}", i)]))
    async with runtime.pool.acquire() as conn:
        bad_id = await conn.fetchval(
            "SELECT id::text FROM ledger WHERE org = 'org-a' AND sequence = 3"
        )
        async with conn.transaction():
            # Replica mode skips triggers: what an attacker with superuser access could do.
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "UPDATE ledger SET data = '{\"n\":99}' WHERE org = 'org-a' AND sequence = 3"
            )
    response = await client.get("/ledger/org-a/verify")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is False
    assert body["first_bad_sequence"] == 3
    assert body["first_bad_entry_id"] == bad_id
    assert body["entries_checked"] == 2


async def test_deleting_the_last_row_is_detected_by_verify(runtime: Runtime) -> None:
    for i in range(3):
        await runtime.appender.append(AppendRequest("org-a", "org-a", [_event(f"k{i}", i)]))
    await _settled(runtime)
    async with runtime.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute("DELETE FROM ledger_positions WHERE org = 'org-a' AND sequence = 3")
        await conn.execute("DELETE FROM ledger WHERE org = 'org-a' AND sequence = 3")
    async with runtime.pool.acquire() as conn:
        result = await verify_org(conn, "org-a")
    assert not result.ok and result.first_bad_sequence == 3


async def test_two_concurrent_conflicting_commands_one_wins_the_other_gets_409(
    client: httpx.AsyncClient,
) -> None:
    responses = await asyncio.gather(*(
        client.post("/organizations", json={"id": "org-a", "name": f"A{i}"}) for i in range(2)
    ))
    codes = sorted(r.status_code for r in responses)
    assert codes == [201, 409], [r.text for r in responses]
    orgs = (await client.get("/organizations")).json()["items"]
    assert len(orgs) == 1


async def test_stale_expected_version_is_refused_alone_in_its_batch(runtime: Runtime) -> None:
    await runtime.appender.append(AppendRequest("org-a", "org-a", [_event("x")]))
    stale = AppendRequest("org-a", "org-a", [_event("x", 1)], expected_versions={"note/x": 0})
    fresh = AppendRequest("org-a", "org-a", [_event("x", 2)], expected_versions={"note/x": 1})
    other = AppendRequest("org-b", "org-b", [_event("y")])
    results = await asyncio.gather(
        *(runtime.appender.append(r) for r in (stale, fresh, other)), return_exceptions=True
    )
    assert isinstance(results[0], Conflict)
    assert not isinstance(results[1], Exception) and not isinstance(results[2], Exception)


async def test_two_processes_racing_on_one_aggregate_one_wins(
    runtime: Runtime, database_url: str
) -> None:
    # A second appender on its own pool stands for another API process.
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    other = Appender(pool)
    other.start()
    try:
        requests = [
            AppendRequest("org-a", "org-a", [_event("x", i)], expected_versions={"note/x": 0})
            for i in range(2)
        ]
        results = await asyncio.gather(
            runtime.appender.append(requests[0]), other.append(requests[1]),
            return_exceptions=True,
        )
    finally:
        await other.stop()
        await pool.close()
    assert sorted(isinstance(r, Conflict) for r in results) == [False, True]
    async with runtime.pool.acquire() as conn:
        assert (await verify_org(conn, "org-a")).entries_checked == 1


async def test_an_entry_that_commits_late_is_never_skipped_by_a_position_reader(
    runtime: Runtime, database_url: str
) -> None:
    await runtime.appender.append(AppendRequest("org-slow", "org-slow", [_event("s0")]))
    await _settled(runtime)
    slow = await asyncpg.connect(database_url)
    try:
        tx = slow.transaction()
        await tx.start()
        # A slow appender: holds org-slow's head and has written its row, not committed yet.
        head = await slow.fetchrow(
            "SELECT last_sequence, last_hash FROM ledger_heads WHERE org = 'org-slow' FOR UPDATE"
        )
        when = dt.datetime.now(dt.UTC)
        entry_id = str(uuid.uuid4())
        fields = hashed_fields(
            id=entry_id, org="org-slow", sequence=2, recorded_at=when, actor="org-slow",
            asset_kind="note", asset_key="s1", version=1, event_type="NoteWritten",
            data={"n": 1}, reason="",
        )
        digest = chain_hash(bytes(head["last_hash"]), fields)
        await slow.execute(
            "INSERT INTO ledger VALUES ('org-slow', 2, $1, $2, 'org-slow', 'note', 's1', 1, "
            "'NoteWritten', $3, '', $4, $5)",
            uuid.UUID(entry_id), when, encode_data({"n": 1}), bytes(head["last_hash"]), digest,
        )
        await slow.execute("UPDATE ledger_heads SET last_sequence = 2, last_hash = $1 "
                           "WHERE org = 'org-slow'", digest)
        # Meanwhile other orgs append, get placed, and a reader follows them.
        for i in range(3):
            await runtime.appender.append(AppendRequest("org-fast", "org-fast", [_event(f"f{i}")]))
        await _settled(runtime)
        async with runtime.pool.acquire() as conn:
            seen = await read_positions(conn, 0, 100)
        assert [e.org for e in seen] == ["org-slow"] + ["org-fast"] * 3
        await tx.commit()
    finally:
        await slow.close()
    await runtime.appender.append(AppendRequest("org-fast", "org-fast", [_event("f3")]))
    await _settled(runtime)
    async with runtime.pool.acquire() as conn:
        later = await read_positions(conn, seen[-1].position or 0, 100)
        every = await read_positions(conn, 0, 100)
    assert {(e.org, e.sequence) for e in later} == {("org-slow", 2), ("org-fast", 4)}
    assert [e.position for e in every] == list(range(1, 7))


async def test_positions_keep_each_orgs_sequence_order(runtime: Runtime) -> None:
    await asyncio.gather(*(
        runtime.appender.append(AppendRequest(f"org-{i % 3}", "x", [_event(f"k{i}")]))
        for i in range(90)
    ))
    await _settled(runtime)
    async with runtime.pool.acquire() as conn:
        entries = await read_positions(conn, 0, 1000)
    assert [e.position for e in entries] == list(range(1, 91))
    for org in ("org-0", "org-1", "org-2"):
        assert [e.sequence for e in entries if e.org == org] == list(range(1, 31))


async def test_a_command_response_already_shows_in_the_views(client: httpx.AsyncClient) -> None:
    for i in range(10):
        await register_org(client, f"org-{i}")
        got = await client.get(f"/organizations/org-{i}")
        assert got.status_code == 200
