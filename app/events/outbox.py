"""The outbox: every committed ledger entry, published to NATS JetStream in position order.

Each entry goes to `<prefix>.<org>.<asset_kind>.<event_type>` (prefix `consort.ledger`) of
one stream (`CONSORT_LEDGER`, file storage), with header `Nats-Msg-Id` = entry id and the
entry's JSON (position and hashes included) as payload. The publisher follows
`ledger_positions` (woken by NOTIFY consort_positions, with a poll as safety net), so it
never skips an entry that committed late.

Progress is the row `outbox_tracking(name = stream)`: the last position the stream has
acknowledged. A batch is published while that row is locked (FOR UPDATE SKIP LOCKED: one
process publishes at a time, the others skip their turn), its publishes are pipelined
(sent back to back on one connection, only the last one awaiting an ack: see `_publish`)
and the row moves in the same transaction.

Order and exactly-once in the stream do not depend on the tracking row alone: the stream
belongs to the outbox, so its last message says how far publishing got. Before each
batch the publisher reads the stream's head (last sequence and that message's ledger
position), starts after max(tracking, head), and sends message i of the batch with
`Nats-Expected-Last-Sequence` = head + i. A message that would land after a gap (one lost
in a broken connection, or raced by another publisher) is rejected by the server instead
of stored out of order; the batch is rolled back and retried from the new head. A crash
between the acks and the tracking commit costs nothing either: the head is ahead of the
tracking row and nothing is sent twice (`Nats-Msg-Id` dedupe is a second guard).

NATS being down never blocks appends or start-up: the connection is made in the
background, re-made forever, and the publisher catches up from its position once it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Sequence

import asyncpg
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from app.events.background import stop_task, wake_or_poll
from app.events.entries import LedgerEntry
from app.events.notifications import Notifications
from app.events.reader import read_positions
from app.events.sequencer import POSITIONS_CHANNEL

log = logging.getLogger(__name__)

DEFAULT_STREAM = "CONSORT_LEDGER"
DEFAULT_SUBJECT_PREFIX = "consort.ledger"

TRACKING_DDL = """
CREATE TABLE IF NOT EXISTS outbox_tracking (
    name      text   PRIMARY KEY,
    position  bigint NOT NULL
);
"""
OUTBOX_SCHEMA_LOCK = 72_004

# Anything but these would split a subject token or be a wildcard.
_UNSAFE_TOKEN = re.compile(r"[^A-Za-z0-9_-]")



class StreamOutOfStep(Exception):
    """The stream acknowledged a batch at another sequence than the one expected."""


_NATS_ERRORS: tuple[type[BaseException], ...] = (
    StreamOutOfStep,
    nats.errors.Error,  # includes nats.js.errors.Error (APIError, NotFoundError, ...)
    OSError,
    TimeoutError,
)


@dataclasses.dataclass(frozen=True)
class OutboxConfig:
    stream: str = DEFAULT_STREAM
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    duplicate_window_s: float = 3600.0
    batch_size: int = 2000
    # How long a batch's acks may take before the batch is given up and retried.
    ack_timeout_s: float = 10.0
    reconnect_wait_s: float = 1.0
    poll_s: float = 0.5


def subject_token(value: str) -> str:
    """One subject token: characters NATS would misread are replaced by '_'."""
    return _UNSAFE_TOKEN.sub("_", value) or "_"


def subject_for(prefix: str, entry: LedgerEntry) -> str:
    return ".".join(
        (
            prefix,
            subject_token(entry.org),
            subject_token(entry.asset_kind),
            subject_token(entry.event_type),
        )
    )


def encode_entry(entry: LedgerEntry) -> bytes:
    return json.dumps(entry.to_json(), separators=(",", ":")).encode("utf-8")


class Outbox:
    """Publishes the ledger to JetStream; start() before use, stop() when done."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        notifications: Notifications | None,
        nats_url: str,
        config: OutboxConfig | None = None,
    ) -> None:
        self._pool = pool
        self._notifications = notifications
        self._nats_url = nats_url
        self.config = config or OutboxConfig()
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._stream_ready = False
        # Cached stream head: (last stream sequence, ledger position of that message).
        self._head: tuple[int, int] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.position = 0
        self.published = 0

    @property
    def name(self) -> str:
        return self.config.stream

    @property
    def connected(self) -> bool:
        """Connected to NATS with the stream in place: what /ready reports."""
        nc = self._nc
        return nc is not None and nc.is_connected and self._stream_ready

    async def ensure_schema(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", OUTBOX_SCHEMA_LOCK)
            await conn.execute(TRACKING_DDL)
            await conn.execute(
                "INSERT INTO outbox_tracking (name, position) VALUES ($1, 0) "
                "ON CONFLICT DO NOTHING",
                self.name,
            )

    async def start(self) -> None:
        """Create the tracking row and start publishing in the background.

        Never waits for NATS: an unreachable server only delays publishing.
        """
        await self.ensure_schema()
        if self._notifications is not None:
            self._wake = self._notifications.subscribe(POSITIONS_CHANNEL)
        self._task = asyncio.create_task(self._run(), name="ledger-outbox")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
        if self._notifications is not None:
            self._notifications.unsubscribe(POSITIONS_CHANNEL, self._wake)
        await self._disconnect()

    # -- NATS connection -------------------------------------------------------------

    async def connect(self) -> None:
        """Connect (once) and make sure the stream exists; raises if NATS does not answer."""
        if self._nc is None or self._nc.is_closed:
            self._nc = await nats.connect(
                self._nats_url,
                name="consort-outbox",
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=self.config.reconnect_wait_s,
                connect_timeout=2,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
            self._js = self._nc.jetstream()
            self._head = None
        if not self._stream_ready:
            await self.ensure_stream()

    async def _disconnect(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._stream_ready = False
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(*_NATS_ERRORS):
                await asyncio.wait_for(nc.close(), timeout=5)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS connection error: %s", exc)

    async def _on_disconnected(self) -> None:
        if self._task is None:
            return  # stopping
        log.warning("outbox lost its NATS connection; publishing paused")

    async def _on_reconnected(self) -> None:
        log.info("outbox reconnected to NATS; catching up")
        self._stream_ready = False  # the server may be a fresh one: check the stream again
        self._head = None
        self._wake.set()

    async def ensure_stream(self) -> None:
        """Create the stream, or bring its subjects and dedupe window to ours; idempotent."""
        assert self._js is not None
        cfg = self.config
        subjects = [f"{cfg.subject_prefix}.>"]
        try:
            info = await self._js.stream_info(cfg.stream)
        except nats.js.errors.NotFoundError:
            await self._js.add_stream(
                StreamConfig(
                    name=cfg.stream,
                    subjects=subjects,
                    storage=StorageType.FILE,
                    duplicate_window=cfg.duplicate_window_s,
                )
            )
            log.info("created JetStream stream %s (%s)", cfg.stream, subjects[0])
        else:
            current = info.config
            if current.storage != StorageType.FILE:
                log.warning("stream %s uses %s storage, not file", cfg.stream, current.storage)
            if (
                sorted(current.subjects or []) != subjects
                or abs((current.duplicate_window or 0) - cfg.duplicate_window_s) > 1e-3
            ):
                await self._js.update_stream(
                    dataclasses.replace(
                        current, subjects=subjects, duplicate_window=cfg.duplicate_window_s
                    )
                )
                log.info("updated JetStream stream %s", cfg.stream)
        self._stream_ready = True

    # -- publishing ------------------------------------------------------------------

    async def _stream_head(self) -> tuple[int, int]:
        """The stream's last sequence and the ledger position of that message (0 if none)."""
        assert self._js is not None
        info = await self._js.stream_info(self.config.stream)
        last_seq = info.state.last_seq
        if last_seq == 0:
            return 0, 0
        if self._head is not None and self._head[0] == last_seq:
            return self._head
        position = 0
        try:
            msg = await self._js.get_msg(self.config.stream, last_seq)
            position = _position_of(msg.data)
        except nats.js.errors.NotFoundError:
            pass  # purged or deleted: only the tracking row knows how far we got
        self._head = (last_seq, position)
        return self._head

    async def publish_once(self) -> int:
        """Publish the next batch; returns how many entries the stream newly holds.

        Returns 0 when there is nothing to publish or another process holds the turn.
        Raises on a NATS or PostgreSQL failure; the transaction is then rolled back.
        """
        if self._js is None:
            raise nats.errors.ConnectionClosedError
        js = self._js
        async with self._pool.acquire() as conn, conn.transaction():
            tracked = await conn.fetchval(
                "SELECT position FROM outbox_tracking WHERE name = $1 FOR UPDATE SKIP LOCKED",
                self.name,
            )
            if tracked is None:
                return 0  # another process is publishing (or the row is missing)
            head_seq, head_pos = await self._stream_head()
            start = max(tracked, head_pos)
            entries = await read_positions(conn, start, self.config.batch_size)
            if entries:
                last_seq = await self._publish(js, entries, head_seq)
                last = entries[-1].position
                assert last is not None
                self._head = (last_seq, last)
            else:
                last = start
            if last != tracked:
                await conn.execute(
                    "UPDATE outbox_tracking SET position = $2 WHERE name = $1", self.name, last
                )
        self.position = last
        self.published += len(entries)
        return len(entries)

    async def _publish(
        self, js: JetStreamContext, entries: Sequence[LedgerEntry], head_seq: int
    ) -> int:
        """Send the entries back to back; returns the stream sequence of the last one.

        Only the last message asks for an ack. Message i carries
        `Nats-Expected-Last-Sequence: head_seq + i`, so the server stores it only right
        after message i - 1; an ack of the last one at head_seq + len(entries) thus
        proves every message of the batch is stored, in order, once. Anything else
        (an error, a timeout, a duplicate) raises, and the next batch starts from the
        stream's head again.
        """
        nc = self._nc
        assert nc is not None
        prefix = self.config.subject_prefix
        *body, tail = entries
        for i, entry in enumerate(body):
            await nc.publish(
                subject_for(prefix, entry),
                encode_entry(entry),
                headers={
                    "Nats-Msg-Id": entry.id,
                    "Nats-Expected-Last-Sequence": str(head_seq + i),
                },
            )
        expected = head_seq + len(entries)
        try:
            ack = await js.publish(
                subject_for(prefix, tail),
                encode_entry(tail),
                timeout=self.config.ack_timeout_s,
                stream=self.config.stream,
                headers={
                    "Nats-Msg-Id": tail.id,
                    "Nats-Expected-Last-Sequence": str(expected - 1),
                },
            )
        except BaseException:
            self._head = None
            raise
        if ack.seq != expected or ack.duplicate:
            self._head = None
            raise StreamOutOfStep(
                f"stream {self.config.stream} acknowledged sequence {ack.seq} "
                f"(duplicate={ack.duplicate}), expected {expected}"
            )
        return expected

    async def catch_up(self) -> int:
        """Publish batches until the stream holds every positioned entry."""
        total = 0
        while True:
            published = await self.publish_once()
            total += published
            if published == 0:
                return total

    async def _run(self) -> None:
        failures = 0
        while True:
            nc = self._nc
            if nc is not None and not nc.is_closed and not nc.is_connected:
                # The client is reconnecting by itself; reconnected_cb wakes us up.
                self._wake.clear()
                await wake_or_poll(self._wake, self.config.poll_s)
                continue
            if not self.connected:
                try:
                    await self.connect()
                    failures = 0
                except _NATS_ERRORS as exc:
                    failures += 1
                    if failures == 1:
                        log.warning("outbox cannot reach NATS at %s: %s", self._nats_url, exc)
                    await asyncio.sleep(self.config.reconnect_wait_s)
                    continue
            self._wake.clear()
            try:
                published = await self.publish_once()
            except (*_NATS_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("outbox batch failed, retrying from the stream head: %s", exc)
                if not isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
                    self._stream_ready = False  # check the stream again (it may be gone)
                await asyncio.sleep(self.config.poll_s)
                continue
            if published >= self.config.batch_size:
                continue
            await wake_or_poll(self._wake, self.config.poll_s)


def _position_of(data: bytes | None) -> int:
    if not data:
        return 0
    try:
        value = json.loads(data).get("position")
    except (ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) else 0
