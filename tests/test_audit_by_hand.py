"""An auditor verifies a ledger from the audit API's JSON alone, with the stand-alone
script of examples/audit (no Consort code): the documented hash rule is the real one."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx

from app.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, register_org
from tests.test_audit_api import server

__all__ = ["server"]

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "audit" / "verify_chain.py"


async def _run(url: str, org: str) -> subprocess.CompletedProcess[str]:
    # Run it as an auditor would, in a bare interpreter: `-I` keeps this checkout (and
    # with it Consort's code) off the path; only the installed httpx is there.
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-I", str(SCRIPT), org, "--url", url,
                         "--token", ADMIN_TOKEN],
        capture_output=True, text=True, timeout=60, check=False)


async def test_the_stand_alone_script_verifies_a_ledger_and_names_a_tampered_entry(
    runtime: Runtime, server: str,
) -> None:
    async with httpx.AsyncClient(base_url=server,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
        token = await register_org(c, "org-a")
        for name in ("ci", "nightly", "ünïcode ✓"):  # non-ASCII: canonical JSON is UTF-8
            r = await c.post("/tokens", json={"name": name},
                             headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 201
    good = await _run(server, "org-a")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "5 entries, chain intact" in good.stdout

    async with runtime.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute("UPDATE ledger SET reason = 'rewritten' "
                           "WHERE org = 'org-a' AND sequence = 4")
    bad = await _run(server, "org-a")
    assert bad.returncode == 1
    assert "BROKEN after 3 good entries" in bad.stdout and "(sequence 4)" in bad.stdout
