"""One LISTEN connection per process, fanned out to the tasks that wait on a channel.

Waiters get an `asyncio.Event` that is set on every NOTIFY of their channel. A NOTIFY can
be lost while the connection is re-established, so waiters also poll with a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import asyncpg

from app.events.background import stop_task

log = logging.getLogger(__name__)

CHANNELS = ("consort_ledger", "consort_positions", "consort_projected")


class Notifications:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._events: dict[str, list[asyncio.Event]] = defaultdict(list)
        self._callbacks: dict[str, list[Callable[[str], None]]] = defaultdict(list)
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, channel: str) -> asyncio.Event:
        event = asyncio.Event()
        self._events[channel].append(event)
        return event

    def unsubscribe(self, channel: str, event: asyncio.Event) -> None:
        if event in self._events[channel]:
            self._events[channel].remove(event)

    def on(self, channel: str, callback: Callable[[str], None]) -> None:
        self._callbacks[channel].append(callback)

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.create_task(self._watch(), name="pg-notifications")

    async def stop(self) -> None:
        await stop_task(self._task)
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def _dispatch(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        for event in self._events[channel]:
            event.set()
        for callback in self._callbacks[channel]:
            callback(payload)

    def _wake_all(self) -> None:
        for channel in CHANNELS:
            self._dispatch(None, 0, channel, "")

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        for channel in CHANNELS:
            await conn.add_listener(channel, self._dispatch)
        self._conn = conn

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._conn is not None and not self._conn.is_closed():
                continue
            try:
                await self._connect()
                self._wake_all()  # whatever was notified meanwhile is picked up by a poll
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("cannot re-open the LISTEN connection: %s", exc)
