"""The process's PostgreSQL connection pool, set up for many short transactions.

- `jit = off`: PostgreSQL's JIT compiles any query whose estimated cost is high, which
  costs tens to hundreds of milliseconds per query here (asyncpg's type introspection
  and big replay reads among them) and never pays back on short OLTP statements.
- No reset on release: asyncpg's default runs `SELECT pg_advisory_unlock_all(); CLOSE ALL;
  UNLISTEN *; RESET ALL;` every time a connection goes back to the pool, one more round
  trip per acquire (three per HTTP command). asyncpg still rolls back a transaction left
  open. Rule that makes this safe: code never leaves session state on a pooled
  connection — settings are `SET LOCAL`/`set_config(..., true)`, advisory locks are
  `pg_advisory_xact_lock`, LISTEN has a connection of its own (`Notifications`).
"""

from __future__ import annotations

import asyncpg


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool `reset` hook: nothing to undo (see the module's rule)."""


async def create_pool(database_url: str, max_size: int) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        database_url,
        min_size=min(2, max_size),
        max_size=max_size,
        server_settings={"jit": "off"},
        reset=_keep_session,
        statement_cache_size=500,
    )
    return pool
