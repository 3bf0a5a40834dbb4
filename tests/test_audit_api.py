"""The audit API: reading ledgers page by page, and following them live over SSE."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from app.api import stream
from app.api.app import create_app
from app.events.sequencer import POSITIONS_CHANNEL
from app.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, bearer, register_org

# --- helpers -----------------------------------------------------------------------------


async def issue_tokens(client: httpx.AsyncClient, org: str, n: int) -> None:
    """Append n TokenIssued entries to `org`'s ledger (the administrator acts for it)."""
    for i in range(n):
        r = await client.post("/tokens", json={"role": "org", "org": org, "name": f"t{i}"})
        assert r.status_code == 201, r.text


async def auditor_token(client: httpx.AsyncClient) -> str:
    r = await client.post("/tokens", json={"role": "auditor", "name": "auditor"})
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


async def all_pages(
    client: httpx.AsyncClient, path: str, limit: int, token: str = ADMIN_TOKEN,
    **params: Any,
) -> tuple[list[dict[str, Any]], int]:
    """Every item of a listing, following next_after; also how many pages it took."""
    items: list[dict[str, Any]] = []
    after, pages = 0, 0
    while True:
        r = await client.get(path, params={"after": after, "limit": limit, **params},
                             headers=bearer(token))
        assert r.status_code == 200, r.text
        page = r.json()
        pages += 1
        items += page["items"]
        if page["next_after"] is None:
            return items, pages
        after = page["next_after"]


def assert_problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == code


@dataclass
class SseMessage:
    id: str | None
    event: str | None
    data: dict[str, Any] | None
    comment: str | None = None


class SseReader:
    """Parses a text/event-stream response line by line into messages."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def next(self) -> SseMessage:
        fields: dict[str, str] = {}
        while True:
            line = await self._lines.__anext__()
            if line == "":
                if fields:
                    data = json.loads(fields["data"]) if "data" in fields else None
                    return SseMessage(fields.get("id"), fields.get("event"), data)
                continue
            if line.startswith(":"):
                return SseMessage(None, None, None, comment=line[1:].strip())
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")

    async def events(self, n: int, timeout: float = 10.0) -> list[SseMessage]:
        """The next n events (comments skipped); fails the test after `timeout` seconds."""
        got: list[SseMessage] = []
        async with asyncio.timeout(timeout):
            while len(got) < n:
                message = await self.next()
                if message.comment is None:
                    got.append(message)
        return got


@pytest.fixture
async def server(runtime: Runtime) -> AsyncIterator[str]:
    """The app served by a real uvicorn on a free local port (ASGITransport buffers)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(runtime, manage_runtime=False), log_level="warning",
        timeout_graceful_shutdown=3,
    )
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    async with asyncio.timeout(10):
        while not srv.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        await task
        sock.close()


def stream_client(base_url: str, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, headers=bearer(token),
                             timeout=httpx.Timeout(10.0, read=30.0))


def positions(messages: list[SseMessage]) -> list[int]:
    return [int(m.id) for m in messages if m.id is not None]


# --- one organization's ledger -----------------------------------------------------------


async def test_org_events_come_in_sequence_order_page_by_page(client: httpx.AsyncClient) -> None:
    await register_org(client, "org-a")
    await register_org(client, "org-b")
    await issue_tokens(client, "org-a", 3)  # org-a: 2 + 3 = 5 entries

    r = await client.get("/ledger/org-a/events", params={"limit": 2})
    assert r.status_code == 200
    page = r.json()
    assert [e["sequence"] for e in page["items"]] == [1, 2]
    assert page["next_after"] == 2
    first = page["items"][0]
    assert first["org"] == "org-a" and first["event_type"] == "OrganizationRegistered"
    assert first["asset_kind"] == "organization" and first["asset_key"] == "org-a"
    assert first["data"]["name"] == "ORG-A" and first["actor"] == "admin"
    assert isinstance(first["position"], int) and first["prev_hash"] == "00" * 32

    items, pages = await all_pages(client, "/ledger/org-a/events", limit=2)
    assert [e["sequence"] for e in items] == [1, 2, 3, 4, 5]
    assert pages == 3
    assert {e["org"] for e in items} == {"org-a"}
    for earlier, later in zip(items, items[1:], strict=False):
        assert later["prev_hash"] == earlier["hash"]
    assert [e["event_type"] for e in items[2:]] == ["TokenIssued"] * 3

    tail = (await client.get("/ledger/org-a/events", params={"after": 3})).json()
    assert [e["sequence"] for e in tail["items"]] == [4, 5] and tail["next_after"] is None
    end = (await client.get("/ledger/org-a/events", params={"after": 5})).json()
    assert end == {"items": [], "next_after": None}


async def test_org_events_default_limit_is_100_and_limit_caps_at_1000(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    await register_org(client, "org-a")
    await issue_tokens(client, "org-a", 100)  # 102 entries
    page = (await client.get("/ledger/org-a/events")).json()
    assert len(page["items"]) == 100 and page["next_after"] == 100
    big = (await client.get("/ledger/org-a/events", params={"limit": 1000})).json()
    assert len(big["items"]) == 102 and big["next_after"] is None


async def test_bad_after_or_limit_is_a_422_problem(client: httpx.AsyncClient) -> None:
    await register_org(client, "org-a")
    for path in ("/ledger/org-a/events", "/ledger/events"):
        for params in ({"limit": 0}, {"limit": 1001}, {"limit": "ten"}, {"after": -1},
                       {"after": "x"}):
            assert_problem(await client.get(path, params=params), 422, "validation_error")


async def test_unknown_org_ledger_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/ledger/nobody/events"), 404, "not_found")


async def test_org_cannot_read_another_orgs_ledger_but_auditor_can(
    client: httpx.AsyncClient,
) -> None:
    token_a = await register_org(client, "org-a")
    token_b = await register_org(client, "org-b")
    auditor = await auditor_token(client)

    r = await client.get("/ledger/org-b/events", headers=bearer(token_a))
    assert_problem(r, 403, "forbidden")
    # An org may not even learn whether another ledger exists.
    assert_problem(await client.get("/ledger/nobody/events", headers=bearer(token_a)),
                   403, "forbidden")
    own = await client.get("/ledger/org-b/events", headers=bearer(token_b))
    assert own.status_code == 200 and len(own.json()["items"]) == 2
    audited = await client.get("/ledger/org-b/events", headers=bearer(auditor))
    assert audited.status_code == 200
    assert audited.json() == own.json()
    # The auditor token itself was recorded on the system ledger, which only auditors
    # and the administrator read.
    system = await client.get("/ledger/_system/events", headers=bearer(auditor))
    assert [e["event_type"] for e in system.json()["items"]] == ["TokenIssued"]
    assert_problem(await client.get("/ledger/_system/events", headers=bearer(token_a)),
                   403, "forbidden")
    assert_problem(await client.get("/ledger/org-a/events", headers=bearer("nope")),
                   401, "invalid_token")


# --- every ledger, by global position ----------------------------------------------------


async def test_global_events_page_by_position_across_every_ledger(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    for org in ("org-a", "org-b", "org-c"):
        await register_org(client, org)
    await issue_tokens(client, "org-b", 2)
    await auditor_token(client)  # one entry on the system ledger
    async with runtime.pool.acquire() as conn:
        total = await conn.fetchval("SELECT count(*) FROM ledger")
    assert total == 9

    items, pages = await all_pages(client, "/ledger/events", limit=4)
    assert pages == 3
    assert [e["position"] for e in items] == list(range(1, total + 1))
    assert {e["org"] for e in items} == {"org-a", "org-b", "org-c", "_system"}
    # Each org's entries keep their sequence order within the global order.
    for org in ("org-a", "org-b", "org-c"):
        own = [e["sequence"] for e in items if e["org"] == org]
        assert own == sorted(own) == list(range(1, len(own) + 1))

    after_five = (await client.get("/ledger/events", params={"after": 5, "limit": 2})).json()
    assert [e["position"] for e in after_five["items"]] == [6, 7]
    assert after_five["next_after"] == 7
    assert after_five["items"] == items[5:7]


async def test_global_events_for_an_org_token_hold_only_its_own_ledger(
    client: httpx.AsyncClient,
) -> None:
    token_a = await register_org(client, "org-a")
    await register_org(client, "org-b")
    await issue_tokens(client, "org-b", 3)
    await issue_tokens(client, "org-a", 1)
    auditor = await auditor_token(client)

    seen_by_a, _ = await all_pages(client, "/ledger/events", limit=2, token=token_a)
    assert {e["org"] for e in seen_by_a} == {"org-a"}
    assert [e["sequence"] for e in seen_by_a] == [1, 2, 3]
    own_ledger, _ = await all_pages(client, "/ledger/org-a/events", limit=10, token=token_a)
    assert seen_by_a == own_ledger

    filtered = await client.get("/ledger/events", params={"org": "org-a"},
                                headers=bearer(token_a))
    assert filtered.json()["items"] == seen_by_a
    asks_for_b = await client.get("/ledger/events", params=[("org", "org-a"), ("org", "org-b")],
                                  headers=bearer(token_a))
    assert_problem(asks_for_b, 403, "forbidden")

    seen_by_auditor, _ = await all_pages(client, "/ledger/events", limit=3, token=auditor)
    assert {e["org"] for e in seen_by_auditor} == {"org-a", "org-b", "_system"}
    assert len(seen_by_auditor) == 3 + 5 + 1


async def test_global_event_filters_are_repeatable_and_combine(
    client: httpx.AsyncClient,
) -> None:
    for org in ("org-a", "org-b", "org-c"):
        await register_org(client, org)
    await issue_tokens(client, "org-c", 2)

    r = await client.get("/ledger/events", params={"event_type": "OrganizationRegistered"})
    assert [e["asset_key"] for e in r.json()["items"]] == ["org-a", "org-b", "org-c"]

    r = await client.get("/ledger/events",
                         params=[("org", "org-a"), ("org", "org-c"), ("asset_kind", "token")])
    got = r.json()["items"]
    assert [(e["org"], e["asset_kind"]) for e in got] == [
        ("org-a", "token"), ("org-c", "token"), ("org-c", "token"), ("org-c", "token")
    ]
    r = await client.get("/ledger/events", params=[
        ("event_type", "OrganizationRegistered"), ("event_type", "TokenIssued"),
        ("org", "org-b"),
    ])
    assert [e["event_type"] for e in r.json()["items"]] == [
        "OrganizationRegistered", "TokenIssued"
    ]
    paged, pages = await all_pages(client, "/ledger/events", limit=1, asset_kind="organization")
    assert [e["asset_key"] for e in paged] == ["org-a", "org-b", "org-c"] and pages == 3
    none = await client.get("/ledger/events", params={"asset_kind": "no-such-kind"})
    assert none.json() == {"items": [], "next_after": None}


# --- the live stream ---------------------------------------------------------------------


async def test_stream_resumes_from_last_event_id_with_no_gap_and_no_duplicate(
    client: httpx.AsyncClient, server: str
) -> None:
    await register_org(client, "org-a")  # positions 1, 2
    auditor = await auditor_token(client)  # position 3
    received: list[SseMessage] = []

    async with stream_client(server, auditor) as http:
        async with http.stream("GET", "/ledger/stream") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            sse = SseReader(response)
            received += await sse.events(3)  # what was there before connecting
            await issue_tokens(client, "org-a", 2)  # positions 4, 5, live
            received += await sse.events(2)
        assert positions(received) == [1, 2, 3, 4, 5]
        last_event_id = received[-1].id
        assert last_event_id is not None

        await register_org(client, "org-b")  # positions 6, 7, while disconnected
        await issue_tokens(client, "org-a", 1)  # position 8

        headers = {"Last-Event-ID": last_event_id}
        # `after` in the URL is what a browser would resend; Last-Event-ID wins over it.
        async with http.stream("GET", "/ledger/stream", params={"after": 0},
                               headers=headers) as response:
            sse = SseReader(response)
            resumed = await sse.events(3)
            assert positions(resumed) == [6, 7, 8]
            await issue_tokens(client, "org-b", 1)  # position 9: the next one, nothing else
            resumed += await sse.events(1)
    received += resumed

    assert positions(received) == list(range(1, 10))
    listing, _ = await all_pages(client, "/ledger/events", limit=1000)
    assert [m.data for m in received] == listing
    assert [m.event for m in received] == [e["event_type"] for e in listing]


async def test_stream_starts_after_the_after_parameter(
    client: httpx.AsyncClient, server: str
) -> None:
    await register_org(client, "org-a")
    await issue_tokens(client, "org-a", 2)  # positions 1..4
    async with stream_client(server, ADMIN_TOKEN) as http, \
            http.stream("GET", "/ledger/stream", params={"after": 2}) as response:
        got = await SseReader(response).events(2)
    assert positions(got) == [3, 4]


async def test_stream_reads_in_batches_without_losing_or_repeating_entries(
    client: httpx.AsyncClient, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "BATCH", 2)
    for org in ("org-a", "org-b", "org-c"):
        await register_org(client, org)  # positions 1..6, tokens at 2, 4, 6
    async with stream_client(server, ADMIN_TOKEN) as http:
        async with http.stream("GET", "/ledger/stream") as response:
            everything = await SseReader(response).events(6)
        async with http.stream("GET", "/ledger/stream", params={"asset_kind": "token"}) as r:
            sse = SseReader(r)
            tokens = await sse.events(3)
            await issue_tokens(client, "org-b", 3)
            tokens += await sse.events(3)
    assert positions(everything) == [1, 2, 3, 4, 5, 6]
    assert positions(tokens) == [2, 4, 6, 7, 8, 9]


async def test_stream_filters_by_org_asset_kind_and_event_type(
    client: httpx.AsyncClient, server: str
) -> None:
    await register_org(client, "org-a")
    await register_org(client, "org-b")
    params = {"org": ["org-b", "org-c"], "event_type": "TokenIssued", "asset_kind": "token"}
    async with stream_client(server, ADMIN_TOKEN) as http, \
            http.stream("GET", "/ledger/stream", params=params) as response:
        sse = SseReader(response)
        got = await sse.events(1)  # org-b's first token; org-a's entries are left out
        await issue_tokens(client, "org-a", 3)
        await register_org(client, "org-c")
        await issue_tokens(client, "org-b", 1)
        got += await sse.events(2)
    assert [(m.data["org"], m.event) for m in got if m.data] == [
        ("org-b", "TokenIssued"), ("org-c", "TokenIssued"), ("org-b", "TokenIssued")
    ]
    expected = (await client.get("/ledger/events", params=params)).json()["items"]
    assert [m.data for m in got] == expected


async def test_stream_for_an_org_token_carries_only_its_own_ledger(
    client: httpx.AsyncClient, server: str
) -> None:
    token_a = await register_org(client, "org-a")
    await register_org(client, "org-b")
    async with stream_client(server, token_a) as http:
        async with http.stream("GET", "/ledger/stream") as response:
            sse = SseReader(response)
            got = await sse.events(2)
            await issue_tokens(client, "org-b", 2)
            await issue_tokens(client, "org-a", 1)
            got += await sse.events(1)
        assert [(m.data["org"], m.data["sequence"]) for m in got if m.data] == [
            ("org-a", 1), ("org-a", 2), ("org-a", 3)
        ]
        forbidden = await http.get("/ledger/stream", params={"org": "org-b"})
        assert_problem(forbidden, 403, "forbidden")


async def test_stream_refuses_a_bad_last_event_id_or_a_missing_token(
    client: httpx.AsyncClient, server: str
) -> None:
    async with stream_client(server, ADMIN_TOKEN) as http:
        for bad in ("abc", "-3", "1.5"):
            r = await http.get("/ledger/stream", headers={"Last-Event-ID": bad})
            assert_problem(r, 400, "invalid_last_event_id")
        r = await http.get("/ledger/stream", headers={"Authorization": ""})
        assert_problem(r, 401, "missing_token")


async def test_stream_sends_keepalive_comments_when_quiet(
    client: httpx.AsyncClient, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "KEEPALIVE_SECONDS", 0.2)
    await register_org(client, "org-a")
    async with stream_client(server, ADMIN_TOKEN) as http, \
            http.stream("GET", "/ledger/stream", params={"org": "org-z"}) as response:
        sse = SseReader(response)
        async with asyncio.timeout(5):
            first = await sse.next()
            second = await sse.next()
    assert first.comment == "keep-alive" and second.comment == "keep-alive"


async def test_stream_stops_when_the_client_disconnects(
    client: httpx.AsyncClient, server: str, runtime: Runtime
) -> None:
    def listeners() -> int:
        return len(runtime.notifications._events[POSITIONS_CHANNEL])

    await register_org(client, "org-a")
    before = listeners()
    async with stream_client(server, ADMIN_TOKEN) as http:
        async with http.stream("GET", "/ledger/stream") as response:
            await SseReader(response).events(2)
            assert listeners() == before + 1
        for _ in range(100):  # the server notices the disconnect and ends the stream
            if listeners() == before:
                break
            await asyncio.sleep(0.05)
        assert listeners() == before
