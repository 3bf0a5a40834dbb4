"""The dispatcher: every TODO task is handed to its worker's runners over JetStream.

It is a reconciler, not an event handler: it compares the tasks view (status TODO, at
some version) with `task_dispatch` (what was published, at which version) and publishes
the difference on `consort.tasks.<worker>` of the work-queue stream `CONSORT_TASKS`
(names set by `DispatchConfig`),
with `Nats-Msg-Id` = `<task>:<version>`. So a crash between a publish and its row, two
API replicas dispatching at once, or a replay of the views costs at most a duplicate
message, which JetStream drops (same id) or the runner drops (the task is no longer
TODO, or its lease is held). A task requeued after a lost runner is TODO again at a new
version, hence dispatched again.

Woken by the projector's NOTIFY (a task became TODO in the views), with a poll as a
safety net; NATS being down only delays dispatching.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re

import asyncpg
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from app.events.background import stop_task, wake_or_poll
from app.events.notifications import Notifications
from app.projections.framework import PROJECTED_CHANNEL
from app.projections.queries import json_value

log = logging.getLogger(__name__)

DDL = """
CREATE TABLE IF NOT EXISTS task_dispatch (
    task_key      text        PRIMARY KEY,
    version       integer     NOT NULL,
    dispatched_at timestamptz NOT NULL DEFAULT now()
);
"""

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclasses.dataclass(frozen=True)
class DispatchConfig:
    """Where tasks go; another stream/prefix isolates a deployment (or a test) sharing
    one NATS with others."""

    stream: str = "CONSORT_TASKS"
    subject_prefix: str = "consort.tasks"

    def worker_subject(self, worker: str) -> str:
        """The subject a worker organization's runners consume."""
        return f"{self.subject_prefix}.{_UNSAFE.sub('_', worker) or '_'}"

    def stream_config(self) -> StreamConfig:
        # Work-queue retention: a message is gone once a runner acked it, and each worker's
        # subject has exactly one durable consumer, shared by all that org's runners.
        return StreamConfig(name=self.stream, subjects=[f"{self.subject_prefix}.>"],
                            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                            duplicate_window=120.0)


async def ensure_tasks_stream(js: nats.js.JetStreamContext, config: DispatchConfig) -> None:
    try:
        await js.stream_info(config.stream)
    except nats.js.errors.NotFoundError:
        with contextlib.suppress(nats.js.errors.BadRequestError):  # created concurrently
            await js.add_stream(config.stream_config())


def _message(row: asyncpg.Record) -> bytes:
    """What a runner needs to prepare the task while it asks the API to start it."""
    return json.dumps({
        "task_key": row["key"], "worker": row["worker"], "version": row["version"],
        "compute_plan_key": row["compute_plan_key"], "rank": row["rank"],
        "task": {"key": row["key"], "function_key": row["function_key"],
                 "inputs": json_value(row["inputs"]), "outputs": json_value(row["outputs"])},
    }).encode()


class Dispatcher:
    """Publishes TODO tasks to their workers; start() then stop()."""

    def __init__(
        self, pool: asyncpg.Pool, notifications: Notifications | None, nats_url: str,
        config: DispatchConfig | None = None, *, poll_s: float = 1.0, batch_size: int = 500,
    ) -> None:
        self.config = config or DispatchConfig()
        self._pool = pool
        self._notifications = notifications
        self._nats_url = nats_url
        self._poll_s = poll_s
        self._batch_size = batch_size
        self._nc: NatsClient | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dispatched = 0

    async def start(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(DDL)
        if self._notifications is not None:
            self._wake = self._notifications.subscribe(PROJECTED_CHANNEL)
        self._task = asyncio.create_task(self._run(), name="task-dispatcher")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
        if self._notifications is not None:
            self._notifications.unsubscribe(PROJECTED_CHANNEL, self._wake)
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await asyncio.wait_for(nc.close(), timeout=5)

    async def _run(self) -> None:
        while True:
            try:
                if self._nc is None or self._nc.is_closed:
                    self._nc = await nats.connect(
                        self._nats_url, name="consort-dispatcher", allow_reconnect=True,
                        max_reconnect_attempts=-1, reconnect_time_wait=1, connect_timeout=2)
                    await ensure_tasks_stream(self._nc.jetstream(), self.config)
                while await self.dispatch_once():
                    pass
            except asyncio.CancelledError:
                raise
            except (nats.errors.Error, OSError, TimeoutError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:
                log.warning("dispatching paused: %s", exc)
            self._wake.clear()
            await wake_or_poll(self._wake, self._poll_s)
            # Every projected batch wakes us; under a stream of commits, one pass per
            # 10 ms is plenty and keeps the TODO scan off PostgreSQL's hot path.
            await asyncio.sleep(0.01)

    async def dispatch_once(self) -> int:
        """Publish one batch of undispatched TODO tasks; returns how many."""
        if self._nc is None:
            raise nats.errors.ConnectionClosedError
        js = self._nc.jetstream()
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT t.key, t.worker, t.version, t.compute_plan_key, t.rank, t.function_key, "
                "t.inputs, t.outputs "
                "FROM compute_tasks t LEFT JOIN task_dispatch d ON d.task_key = t.key "
                "WHERE t.status = 'TODO' AND (d.task_key IS NULL OR d.version <> t.version) "
                "ORDER BY t.position LIMIT $1", self._batch_size)
            if not rows:
                return 0
            acks = [
                js.publish(
                    self.config.worker_subject(r["worker"]),
                    _message(r),
                    stream=self.config.stream,
                    headers={"Nats-Msg-Id": f"{r['key']}:{r['version']}"},
                )
                for r in rows
            ]
            await asyncio.gather(*acks)
            await conn.executemany(
                "INSERT INTO task_dispatch (task_key, version) VALUES ($1, $2) "
                "ON CONFLICT (task_key) DO UPDATE SET version = EXCLUDED.version, "
                "dispatched_at = now()", [(r["key"], r["version"]) for r in rows])
        self.dispatched += len(rows)
        return len(rows)
