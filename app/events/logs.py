"""Task logs: appended by the worker while the task runs, kept after it ends.

Logs are operational output, not facts about assets, so they live beside the ledger in
`task_logs` (shared by every API replica) rather than in it; a failure report records
the SHA-256 of the final log when the runner stores it as an artifact.
"""

from __future__ import annotations

import asyncpg

DDL = """
CREATE TABLE IF NOT EXISTS task_logs (
    task_key  text   NOT NULL,
    seq       bigserial,
    data      bytea  NOT NULL,
    PRIMARY KEY (task_key, seq)
);
"""


class TaskLogs:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def ensure_schema(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(DDL)

    async def append(self, task_key: str, data: bytes) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute("INSERT INTO task_logs (task_key, data) VALUES ($1, $2)",
                               task_key, data)

    async def read(self, task_key: str) -> bytes:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT data FROM task_logs WHERE task_key = $1 ORDER BY seq", task_key)
        return b"".join(bytes(r["data"]) for r in rows)
