"""Runners inside `consort serve`: one per organization, for the embedded default.

A new user's first plan must run with nothing but `consort serve`, so the server runs a
runner for every organization (`CONSORT_LOCAL_RUNNERS=all`, the default), for the ones
listed (`org-a,org-b`), or for none (`none`: each organization runs `consort runner`
next to its data). Each local runner gets its own API token, issued once by the system
and kept under `$CONSORT_HOME/runners/<org>.token` (mode 0600), so it acts through the
API with exactly its organization's rights, like an external one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from pathlib import Path

import asyncpg

from app.domain import organizations as rules
from app.domain.organizations import Principal
from app.events.background import stop_task
from app.runtime import Runtime, hash_token, new_token
from runner.contract import Backend
from runner.worker import Runner, RunnerConfig

log = logging.getLogger(__name__)


def wanted_orgs(setting: str, orgs: list[str]) -> list[str]:
    """Which organizations get a local runner, from CONSORT_LOCAL_RUNNERS."""
    setting = setting.strip()
    if setting in ("", "all"):
        return orgs
    if setting == "none":
        return []
    listed = {name.strip() for name in setting.split(",") if name.strip()}
    return [org for org in orgs if org in listed]


class LocalRunners:
    """Starts a runner for each wanted organization, as organizations appear."""

    def __init__(self, runtime: Runtime, api_url: str, nats_url: str, home: Path,
                 backend: Backend, *, setting: str = "all", every_s: float = 2.0,
                 concurrency: int = 2, housekeeping_s: float = 30.0,
                 max_images: int = 20) -> None:
        self.runtime = runtime
        self.api_url = api_url
        self.nats_url = nats_url
        self.home = home
        self.setting = setting
        self.every_s = every_s
        self.backend = backend
        self.concurrency = concurrency
        self.housekeeping_s = housekeeping_s
        self.max_images = max_images
        self.runners: dict[str, Runner] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="local-runners")

    async def stop(self, drain_s: float = 10.0) -> None:
        await stop_task(self._task)
        await asyncio.gather(*(r.stop(drain_s=drain_s) for r in self.runners.values()))
        self.runners.clear()
        await self.backend.close()

    async def _watch(self) -> None:
        while True:
            try:
                await self.sync()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("local runners: %s", exc)
            await asyncio.sleep(self.every_s)

    async def sync(self) -> None:
        async with self.runtime.pool.acquire() as conn:
            orgs = [r["id"] for r in await conn.fetch("SELECT id FROM organizations ORDER BY id")]
        for org in wanted_orgs(self.setting, orgs):
            if org not in self.runners:
                await self._start_runner(org)

    async def _start_runner(self, org: str) -> None:
        config = RunnerConfig(
            api_url=self.api_url, token=await self._token(org), org=org,
            nats_url=self.nats_url, home=self.home / "runners" / org,
            dispatch=self.runtime.dispatch_config, concurrency=self.concurrency,
            housekeeping_s=self.housekeeping_s, max_images=self.max_images)
        runner = Runner(config, _Shared(self.backend))
        await runner.start()
        self.runners[org] = runner

    async def _token(self, org: str) -> str:
        path = self.home / "runners" / f"{org}.token"
        with contextlib.suppress(FileNotFoundError):
            token = path.read_text().strip()
            async with self.runtime.pool.acquire() as conn:
                valid = await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM api_tokens WHERE token_sha256 = $1 "
                    "AND org = $2 AND revoked_at IS NULL)", hash_token(token), org)
            if valid:
                return token
        token, token_id = new_token(), str(uuid.uuid4())
        system = Principal(kind="system")
        event = rules.issue_token(system, "org", org, True, "local runner", token_id,
                                  hash_token(token))
        await self.runtime.record(system, org, [event], reason="token for the local runner")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        return token


class _Shared:
    """One backend shared by every local runner: closing a runner must not close it."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self.name = backend.name
        self.prepare_image = backend.prepare_image
        self.run = backend.run
        self.leftovers = backend.leftovers
        self.remove_leftover = backend.remove_leftover
        self.prune_images = backend.prune_images

    async def close(self) -> None:
        return None
