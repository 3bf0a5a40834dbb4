"""When PostgreSQL goes away, or the views fall behind: a clear 503, and back to normal after."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from app.api.app import create_app
from app.projections.framework import Projector
from app.runtime import Runtime, all_projections
from tests.conftest import ADMIN_TOKEN, bearer, register_org
from tests.netproxy import CuttableProxy


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}@127.0.0.1:{port}" if parts.username else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[CuttableProxy]:
    parts = urlsplit(database_url)
    proxy = CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    yield proxy
    await proxy.cut()


def _client(runtime: Runtime) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(runtime, manage_runtime=False)),
        base_url="http://consort.test", headers=bearer(ADMIN_TOKEN),
    )


async def test_database_unreachable_is_a_503_and_commands_work_again_once_it_is_back(
    database_url: str, proxy: CuttableProxy, tmp_path: Path,
) -> None:
    runtime = Runtime(_through(database_url, proxy.port), admin_token=ADMIN_TOKEN,
                      artifacts_dir=tmp_path / "artifacts")
    await runtime.start()
    try:
        async with _client(runtime) as client:
            token = await register_org(client, "org-a")
            await proxy.cut()
            for _ in range(3):  # whichever pooled connection the request gets
                down = await client.post("/tokens", json={"name": "ci"}, headers=bearer(token))
                assert down.status_code == 503
                assert down.headers["content-type"].startswith("application/problem+json")
                assert down.json()["code"] == "database_unavailable"
                assert down.headers["retry-after"] == "2"
            ready = await client.get("/ready")
            assert ready.status_code == 503
            await proxy.restore()
            for _ in range(100):
                back = await client.post("/tokens", json={"name": "ci"}, headers=bearer(token))
                if back.status_code != 503:
                    break
                await asyncio.sleep(0.1)
            assert back.status_code == 201
            listed = await client.get("/tokens", headers=bearer(token))
            # The first token and exactly one "ci" token: the refused commands left nothing.
            assert sorted(t["name"] for t in listed.json()["items"]).count("ci") == 1
    finally:
        await runtime.stop()


async def test_a_command_the_views_do_not_show_in_time_is_a_503_saying_it_was_recorded(
    database_url: str, tmp_path: Path,
) -> None:
    # An API replica whose projector runs elsewhere, and that elsewhere is stuck.
    runtime = Runtime(database_url, admin_token=ADMIN_TOKEN, run_projector=False,
                      artifacts_dir=tmp_path / "artifacts", view_wait_s=0.3)
    await runtime.start()
    try:
        async with _client(runtime) as client:
            r = await client.post("/organizations", json={"id": "org-a", "name": "A"})
            assert r.status_code == 503
            assert r.json()["code"] == "views_behind"
            assert r.json()["recorded"] == [{"org": "org-a", "sequence": 2}]
            assert "recorded on the ledger" in r.json()["detail"]
            # The projector catches up: the organization was there all along, and a
            # client retrying the registration is told it exists.
            await Projector(runtime.pool, all_projections(), runtime.notifications).catch_up()
            assert (await client.get("/organizations/org-a")).status_code == 200
            again = await client.post("/organizations", json={"id": "org-a", "name": "A"})
            assert again.status_code == 409 and again.json()["key"] == "org-a"
    finally:
        await runtime.stop()
