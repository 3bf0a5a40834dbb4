"""The lease sweeper: DOING tasks whose runner went silent are retried or failed.

Every API replica runs one; they may find the same expired lease, and the optimistic
concurrency of the ledger lets exactly one of them act on it (the others see the task
has moved on).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from app.domain.errors import DomainError
from app.events.appender import VersionConflict
from app.events.background import stop_task
from app.events.leases import ExpiredRun, TaskLeases

log = logging.getLogger(__name__)

ExpireRun = Callable[[ExpiredRun], Awaitable[list[str]]]


class LeaseSweeper:
    def __init__(self, leases: TaskLeases, expire: ExpireRun, *, every_s: float = 1.0) -> None:
        self._leases = leases
        self._expire = expire
        self._every_s = every_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lease-sweeper")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def sweep_once(self) -> dict[str, list[str]]:
        """Act on every expired lease found now; returns task key → new status(es)."""
        acted: dict[str, list[str]] = {}
        for run in await self._leases.expired():
            try:
                outcome = await self._expire(run)
            except (DomainError, VersionConflict) as exc:
                log.info("lease of %s on %s: %s", run.runner_id, run.task_key, exc)
                continue
            if outcome:
                log.warning("runner %s lost task %s (attempt %d): now %s", run.runner_id,
                            run.task_key, run.attempt, outcome[0])
                acted[run.task_key] = outcome
        return acted

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("lease sweep failed: %s", exc)
            await asyncio.sleep(self._every_s)
