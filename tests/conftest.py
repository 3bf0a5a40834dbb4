"""Shared fixtures: a fresh PostgreSQL database per test, a started runtime, an HTTP client.

Tests talk to the real services of the machine (PostgreSQL at CONSORT_TEST_PG, default
postgresql://postgres@127.0.0.1:5432/test). With CI=true a missing service fails the test
instead of skipping it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.api.app import create_app
from app.runtime import Runtime

ADMIN_TOKEN = "test-admin-token"
PG_ADMIN_URL = os.environ.get("CONSORT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("CONSORT_TEST_NATS", "nats://127.0.0.1:4222")


def service_missing(what: str) -> None:
    """Skip for lack of a service, or fail when CI=true (CI must run every test)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is required in CI but is not reachable")
    pytest.skip(f"{what} is not reachable")


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    try:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        service_missing(f"PostgreSQL at {PG_ADMIN_URL} ({exc})")
    name = f"consort_t_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(PG_ADMIN_URL, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def runtime(database_url: str, tmp_path: Path) -> AsyncIterator[Runtime]:
    rt = Runtime(database_url, admin_token=ADMIN_TOKEN, artifacts_dir=tmp_path / "artifacts")
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(runtime, manage_runtime=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://consort.test",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def register_org(
    client: httpx.AsyncClient, org_id: str, **fields: Any
) -> str:
    """Register an organization as the administrator; returns its first token."""
    response = await client.post(
        "/organizations", json={"id": org_id, "name": org_id.upper(), **fields}
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]["token"]
    return token
