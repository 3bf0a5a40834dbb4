"""Task logs: appended by the worker while the task runs, kept after it ends.

Logs are operational output, not facts about assets, so they live beside the ledger in
`task_logs` (shared by every API replica) rather than in it; a failure report records
the SHA-256 of the final log when the runner stores it as an artifact.

Each chunk records the byte offset at which it starts in its task's log, so a reader that
follows a log asks for what came after the bytes it has and PostgreSQL reads only the
chunks from there on (through the `(task_key, start_offset)` index), instead of the whole
log on every poll.
"""

from __future__ import annotations

import dataclasses

import asyncpg

DDL = """
CREATE TABLE IF NOT EXISTS task_logs (
    task_key      text   NOT NULL,
    seq           bigserial,
    start_offset  bigint NOT NULL,
    data          bytea  NOT NULL,
    PRIMARY KEY (task_key, seq)
);
"""

# Databases made before chunks had offsets: add the column, give every existing chunk
# its offset (the sum of the sizes of the task's earlier chunks, in append order), then
# require it. Runs once, under SCHEMA_LOCK, in the same transaction as the check.
# Replicas of the previous version must be stopped first: their appends do not set the
# offset and are refused once the column is NOT NULL.
MIGRATION = """
ALTER TABLE task_logs ADD COLUMN IF NOT EXISTS start_offset bigint;
UPDATE task_logs AS t SET start_offset = b.start_offset
FROM (SELECT task_key, seq,
             coalesce(sum(octet_length(data)) OVER (
                 PARTITION BY task_key ORDER BY seq
                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS start_offset
      FROM task_logs) AS b
WHERE t.task_key = b.task_key AND t.seq = b.seq AND t.start_offset IS NULL;
ALTER TABLE task_logs ALTER COLUMN start_offset SET NOT NULL;
"""

# Unique: two chunks of one task can never claim the same bytes, whatever goes wrong.
INDEX = """
CREATE UNIQUE INDEX IF NOT EXISTS task_logs_offset ON task_logs (task_key, start_offset);
"""

SCHEMA_LOCK = 72_005  # bigint key space, beside the other schema locks (72_001...)
APPEND_LOCK = 72_006  # (APPEND_LOCK, hashtext(task key)): two-int key space, per task


@dataclasses.dataclass(frozen=True)
class LogRead:
    """Bytes of a task's log from some offset, and the log's whole size when read."""

    data: bytes
    size: int


class TaskLogs:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def ensure_schema(self) -> None:
        """Create the table, or bring an older one up to date; safe from several API
        processes starting at once."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await conn.execute(DDL)
            nullable = await conn.fetchval(
                "SELECT is_nullable FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'task_logs' "
                "AND column_name = 'start_offset'")
            # Checked first so that a normal start takes no ACCESS EXCLUSIVE lock.
            if nullable != "NO":
                await conn.execute(MIGRATION)
            await conn.execute(INDEX)

    async def append(self, task_key: str, data: bytes) -> int:
        """Append a chunk; returns the offset at which it starts.

        One runner appends a task's log, in order; the per-task lock still makes two
        racing appends (a retried request, a runner taking over) take consecutive
        offsets rather than the same one. It is taken in its own statement so that the
        INSERT's snapshot, taken after it, sees the chunk committed by the previous
        holder."""
        if not data:
            raise ValueError("an empty chunk would share its offset with the next one")
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                               APPEND_LOCK, task_key)
            start: int = await conn.fetchval(
                "INSERT INTO task_logs (task_key, start_offset, data) "
                "SELECT $1, coalesce((SELECT start_offset + octet_length(data) "
                "                     FROM task_logs WHERE task_key = $1 "
                "                     ORDER BY start_offset DESC LIMIT 1), 0), $2 "
                "RETURNING start_offset",
                task_key, data)
        return start

    async def read(self, task_key: str, offset: int = 0) -> LogRead:
        """The log's bytes after the first `offset` (all of it by default) and its size.

        Reads the chunk holding byte `offset` and those after it, cut in PostgreSQL so
        that only the wanted bytes leave it; one statement, so the size is that of the
        log the bytes come from. Past the end: no bytes, and the size."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT start_offset + octet_length(data) AS end_offset, "
                "       substring(data FROM least(greatest($2 - start_offset, 0), "
                "                                 octet_length(data))::integer + 1) AS data "
                "FROM task_logs WHERE task_key = $1 AND start_offset >= coalesce("
                "    (SELECT max(start_offset) FROM task_logs "
                "     WHERE task_key = $1 AND start_offset <= $2), 0) "
                "ORDER BY start_offset",
                task_key, offset)
        return LogRead(b"".join(bytes(r["data"]) for r in rows),
                       int(rows[-1]["end_offset"]) if rows else 0)
