"""The `consort` command against the test database: `verify` and `replay`.

Each test runs the real command in a subprocess with CONSORT_DATABASE_URL set to a fresh
database, the way an operator would.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from app.api.app import create_app
from app.projections.framework import Projector, dump_views
from app.runtime import Runtime, all_projections
from tests.conftest import ADMIN_TOKEN, bearer, register_org


def consort_command() -> list[str]:
    """The installed `consort` script next to this Python (as the README runs it)."""
    script = Path(sys.executable).parent / "consort"
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


async def consort(database_url: str, home: Path, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSORT_")}
    env.update(
        CONSORT_DATABASE_URL=database_url, CONSORT_ADMIN_TOKEN=ADMIN_TOKEN,
        CONSORT_HOME=str(home), NO_COLOR="1", COLUMNS="200",
    )
    process = await asyncio.create_subprocess_exec(
        *consort_command(), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class Live:
    """A runtime of our own (not the fixture's) so a test can stop it before the CLI runs."""

    def __init__(self, database_url: str) -> None:
        self.runtime = Runtime(database_url, admin_token=ADMIN_TOKEN)
        self.client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> httpx.AsyncClient:
        await self.runtime.start()
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(self.runtime, manage_runtime=False)),
            base_url="http://consort.test", headers=bearer(ADMIN_TOKEN),
        )
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        assert self.client is not None
        await self.client.aclose()
        await self.runtime.stop()


async def populate(client: httpx.AsyncClient) -> None:
    """Several orgs, extra tokens, a revocation: every kind of row the views hold today."""
    tokens = {org: await register_org(client, org) for org in ("org-a", "org-b", "org-c")}
    for org, token in tokens.items():
        issued = await client.post("/tokens", json={"name": f"{org}-ci"}, headers=bearer(token))
        assert issued.status_code == 201, issued.text
        if org == "org-b":
            revoked = await client.delete(f"/tokens/{issued.json()['info']['id']}",
                                          headers=bearer(token))
            assert revoked.status_code == 200, revoked.text
    auditor = await client.post("/tokens", json={"role": "auditor", "name": "auditor"})
    assert auditor.status_code == 201, auditor.text


async def views(database_url: str) -> dict[str, object]:
    conn = await asyncpg.connect(database_url)
    try:
        return await dump_views(conn, all_projections())
    finally:
        await conn.close()


@pytest.fixture
async def populated(database_url: str) -> AsyncIterator[dict[str, object]]:
    """A database with some history; yields the views as the live projector built them."""
    async with Live(database_url) as client:
        await populate(client)
    live = await views(database_url)
    assert live["organizations"] and live["api_tokens"]
    yield live


async def test_verify_exits_0_and_lists_every_org_when_the_ledgers_are_intact(
    database_url: str, populated: dict[str, object], tmp_path: Path
) -> None:
    code, out, err = await consort(database_url, tmp_path, "verify")
    assert code == 0, out + err
    for org in ("org-a", "org-b", "org-c"):
        assert any(line.startswith(org) and " ok " in line for line in out.splitlines()), out
    code, out, err = await consort(database_url, tmp_path, "verify", "--org", "org-b")
    assert code == 0, out + err
    assert "org-b" in out and "org-a" not in out
    code, out, err = await consort(database_url, tmp_path, "verify", "--org", "nobody")
    assert code == 2, out + err


async def test_verify_exits_1_naming_the_entry_when_a_ledger_row_was_tampered(
    database_url: str, populated: dict[str, object], tmp_path: Path
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        victim = await conn.fetchrow(
            "SELECT id, sequence FROM ledger WHERE org = 'org-a' AND sequence = 2"
        )
        assert victim is not None
        # Replica mode skips the immutability trigger: what a superuser with psql could do.
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(
            "UPDATE ledger SET data = $3 WHERE org = $1 AND sequence = $2",
            "org-a", 2, '{"name": "forged"}',
        )
    finally:
        await conn.close()

    code, out, err = await consort(database_url, tmp_path, "verify")
    assert code == 1, out + err
    bad = [line for line in out.splitlines() if line.startswith("org-a")]
    assert len(bad) == 1 and "BROKEN" in bad[0], out
    assert "sequence 2" in bad[0] and str(victim["id"]) in bad[0], out
    assert any(line.startswith("org-b") and " ok " in line for line in out.splitlines()), out

    code, out, _ = await consort(database_url, tmp_path, "verify", "--org", "org-a")
    assert code == 1 and str(victim["id"]) in out
    code, _, _ = await consort(database_url, tmp_path, "verify", "--org", "org-c")
    assert code == 0


async def test_replay_rebuilds_views_equal_to_the_live_ones_row_for_row(
    database_url: str, populated: dict[str, object], tmp_path: Path
) -> None:
    # Damage the views so an equal result can only come from a real rebuild.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE organizations SET name = 'damaged'")
        await conn.execute("DELETE FROM api_tokens WHERE org = 'org-c'")
        entries = await conn.fetchval("SELECT count(*) FROM ledger_positions")
    finally:
        await conn.close()
    assert await views(database_url) != populated

    code, out, err = await consort(database_url, tmp_path, "replay")
    assert code == 0, out + err
    assert f"Replayed {entries} entries" in out, out
    assert await views(database_url) == populated


async def test_replay_resume_finishes_a_replay_that_stopped_midway(
    database_url: str, populated: dict[str, object], tmp_path: Path
) -> None:
    # A replay that crashed after its first batch: views dropped, one entry folded in.
    runtime = Runtime(database_url, admin_token=ADMIN_TOKEN, run_projector=False)
    await runtime.start()
    try:
        await runtime.projector.reset()
        partial = Projector(runtime.pool, all_projections(), batch_size=1)
        assert await partial.run_once() == 1
        async with runtime.pool.acquire() as conn:
            entries = await conn.fetchval("SELECT count(*) FROM ledger_positions")
    finally:
        await runtime.stop()
    assert await views(database_url) != populated

    code, out, err = await consort(database_url, tmp_path, "replay", "--resume")
    assert code == 0, out + err
    assert f"Replayed {entries - 1} entries" in out, out
    assert await views(database_url) == populated

    code, out, err = await consort(database_url, tmp_path, "replay", "--resume")
    assert code == 0 and "Replayed 0 entries" in out, out + err
    assert await views(database_url) == populated
