"""Read your writes: a command answers only once every view includes its entries.

The projector's NOTIFY carries the per-org marks it reached; every process keeps the
highest marks it has heard of. A waiter whose entries are already covered returns at
once; otherwise it waits for the next notification. When a payload lacks the marks (too
many orgs in one batch) or a NOTIFY may have been missed, the marks table is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence

import asyncpg

from app.events.background import stop_task, wake_or_poll
from app.events.entries import LedgerEntry
from app.events.notifications import Notifications

log = logging.getLogger(__name__)


class ViewsBehind(Exception):
    """The entries are recorded, but the views did not show them in time.

    The command took effect (the ledger has it) and will appear once the projector
    catches up: the caller must not be told it failed.
    """

    def __init__(self, recorded: dict[str, int], waited_s: float) -> None:
        self.recorded = recorded
        self.waited_s = waited_s
        where = ", ".join(f"{org} up to sequence {seq}" for org, seq in sorted(recorded.items()))
        super().__init__(f"recorded on the ledger ({where}), but the views did not show it "
                         f"within {waited_s:g} s; it will appear once they catch up")

class ProjectionWaiter:
    def __init__(self, pool: asyncpg.Pool, notifications: Notifications) -> None:
        self._pool = pool
        self._notifications = notifications
        self._marks: dict[str, int] = {}
        self._waiters: list[tuple[dict[str, int], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._refresh = asyncio.Event()

    def start(self) -> None:
        self._notifications.on("consort_projected", self._on_projected)
        self._task = asyncio.create_task(self._run(), name="projection-waiter")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def wait(self, entries: Sequence[LedgerEntry], timeout: float = 30.0) -> None:
        """Return once every view includes these entries (ViewsBehind after `timeout`)."""
        need: dict[str, int] = {}
        for entry in entries:
            need[entry.org] = max(need.get(entry.org, 0), entry.sequence)
        if self._satisfied(need):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item = (need, future)
        # No table read here: marks heard of are merged synchronously when a NOTIFY
        # arrives, so a projection that landed before this point is already in
        # `_satisfied` above, and one after it finds the waiter registered. A NOTIFY lost
        # while the listener reconnects is covered by the poll of `_run`.
        self._waiters.append(item)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(future)
        except TimeoutError:
            raise ViewsBehind(need, timeout) from None
        finally:
            if item in self._waiters:
                self._waiters.remove(item)

    def _satisfied(self, need: dict[str, int]) -> bool:
        return all(self._marks.get(org, 0) >= seq for org, seq in need.items())

    def _merge(self, marks: dict[str, int]) -> None:
        for org, seq in marks.items():
            if seq > self._marks.get(org, 0):
                self._marks[org] = seq
        for need, future in list(self._waiters):
            if not future.done() and self._satisfied(need):
                future.set_result(None)

    def _on_projected(self, payload: str) -> None:
        try:
            marks = json.loads(payload).get("marks") if payload else None
        except ValueError:
            marks = None
        if isinstance(marks, dict):
            self._merge({str(k): int(v) for k, v in marks.items()})
        else:
            self._refresh.set()

    async def _run(self) -> None:
        while True:
            await wake_or_poll(self._refresh, 0.2)
            self._refresh.clear()
            if not self._waiters:
                continue
            try:
                async with self._pool.acquire() as conn:
                    rows = await conn.fetch("SELECT org, sequence FROM projected_marks")
                self._merge({r["org"]: r["sequence"] for r in rows})
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.exception("cannot read projected marks")
