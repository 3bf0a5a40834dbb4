"""Task log storage in PostgreSQL: chunk offsets under racing appends, and a database made
before chunks had offsets brought up to date."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.events.logs import LogRead, TaskLogs
from app.events.pool import create_pool

OLD_DDL = """
CREATE TABLE task_logs (
    task_key  text   NOT NULL,
    seq       bigserial,
    data      bytea  NOT NULL,
    PRIMARY KEY (task_key, seq)
);
"""


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    created = await create_pool(database_url, 8)
    try:
        yield created
    finally:
        await created.close()


async def test_racing_appends_to_one_log_take_consecutive_offsets(pool: asyncpg.Pool) -> None:
    logs = TaskLogs(pool)
    await logs.ensure_schema()
    chunks = [f"{i:03} {'x' * i}\n".encode() for i in range(40)]
    # 8 connections: the appends really overlap in PostgreSQL
    starts = await asyncio.gather(*(logs.append("t", chunk) for chunk in chunks))
    by_start = sorted(zip(starts, chunks, strict=True))
    expected = 0
    for start, chunk in by_start:
        assert start == expected
        expected += len(chunk)
    whole = b"".join(chunk for _, chunk in by_start)
    assert await logs.read("t") == LogRead(whole, len(whole))
    assert (await logs.read("t", 100)).data == whole[100:]
    assert (await logs.read("other")).size == 0


async def test_an_empty_append_is_refused(pool: asyncpg.Pool) -> None:
    logs = TaskLogs(pool)
    await logs.ensure_schema()
    with pytest.raises(ValueError, match="empty"):
        await logs.append("t", b"")


async def test_logs_stored_before_offsets_get_them_when_the_schema_is_updated(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        await conn.execute(OLD_DDL)
        # two tasks' chunks interleaved, as two runners would have appended them
        for task, data in (("a", b"a1\n"), ("b", b"b-one\n"), ("a", b"a-two\n"),
                           ("b", b"b2\n"), ("a", b"a3\n")):
            await conn.execute("INSERT INTO task_logs (task_key, data) VALUES ($1, $2)",
                               task, data)
    logs = TaskLogs(pool)
    await asyncio.gather(logs.ensure_schema(), TaskLogs(pool).ensure_schema())
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT task_key, start_offset FROM task_logs "
                                "ORDER BY task_key, seq")
        nullable = await conn.fetchval(
            "SELECT is_nullable FROM information_schema.columns "
            "WHERE table_name = 'task_logs' AND column_name = 'start_offset'")
    assert [(r["task_key"], r["start_offset"]) for r in rows] == [
        ("a", 0), ("a", 3), ("a", 9), ("b", 0), ("b", 6)]
    assert nullable == "NO"
    assert (await logs.read("a", 4)).data == b"-two\na3\n"
    assert await logs.append("a", b"a4\n") == 12
    await logs.ensure_schema()  # again: nothing left to do
    assert (await logs.read("a", 9)).data == b"a3\na4\n"
    assert (await logs.read("b")).size == 9
