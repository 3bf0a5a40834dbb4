"""The composition root: wires the pool, ledger, sequencer, views and outbox together.

One `Runtime` per process. The API, the CLI and the tests all start the same one, so
there is a single storage code path whatever the deployment.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from app.config import default_home
from app.domain.events import DomainEvent
from app.domain.organizations import Principal
from app.events.appender import Appender
from app.events.codec import to_new_events
from app.events.entries import AppendRequest, LedgerEntry
from app.events.leases import TaskLeases
from app.events.logs import TaskLogs
from app.events.notifications import Notifications
from app.events.outbox import Outbox, OutboxConfig
from app.events.pool import create_pool
from app.events.schema import create_schema
from app.events.sequencer import Sequencer
from app.execution.dispatcher import DispatchConfig, Dispatcher
from app.projections.assets import AssetsView
from app.projections.compute import ComputeView
from app.projections.framework import Projection, Projector
from app.projections.organizations import OrganizationsView
from app.projections.waiter import ProjectionWaiter
from app.storage.artifacts import ArtifactStore, FilesystemArtifactStore

log = logging.getLogger(__name__)

# How long stop() lets connections in use finish before it cuts them.
POOL_CLOSE_TIMEOUT_S = 10.0


def all_projections() -> list[Projection]:
    return [OrganizationsView(), AssetsView(), ComputeView()]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return "cst_" + secrets.token_urlsafe(32)


class Runtime:
    def __init__(
        self,
        database_url: str,
        nats_url: str | None = None,
        admin_token: str | None = None,
        *,
        run_projector: bool = True,
        pool_size: int = 10,
        artifacts_dir: Path | None = None,
        max_upload_bytes: int = 5 * 1024**3,
        outbox_config: OutboxConfig | None = None,
        dispatch: bool = True,
        dispatch_config: DispatchConfig | None = None,
        view_wait_s: float = 30.0,
    ) -> None:
        self.database_url = database_url
        self.nats_url = nats_url
        self._admin_token = admin_token
        self._run_projector = run_projector
        self._pool_size = pool_size
        self.admin_token_sha256: str | None = None
        # Set when this start generated the admin token: shown once, never stored in clear.
        self.generated_admin_token: str | None = None
        self._outbox_config = outbox_config
        self.outbox: Outbox | None = None
        # Hands TODO tasks to runners over NATS (only with a NATS URL).
        self._dispatch = dispatch
        self.dispatcher: Dispatcher | None = None
        self.dispatch_config = dispatch_config or DispatchConfig()
        self.artifacts: ArtifactStore = FilesystemArtifactStore(
            artifacts_dir if artifacts_dir is not None else default_home() / "artifacts"
        )
        self.max_upload_bytes = max_upload_bytes
        # How long a command waits for the views to show it before answering 503.
        self.view_wait_s = view_wait_s

    async def start(self) -> None:
        self.pool = await create_pool(self.database_url, self._pool_size)
        async with self.pool.acquire() as conn:
            await create_schema(conn)
        self.notifications = Notifications(self.database_url)
        await self.notifications.start()
        self.appender = Appender(self.pool)
        self.appender.start()
        self.sequencer = Sequencer(self.pool, self.notifications)
        self.sequencer.start()
        self.projector = Projector(self.pool, all_projections(), self.notifications)
        await self.projector.ensure_schema()
        if self._run_projector:
            self.projector.start()
        self.waiter = ProjectionWaiter(self.pool, self.notifications)
        self.waiter.start()
        if self.nats_url is not None:
            # Connects in the background: an unreachable NATS never fails the start.
            self.outbox = Outbox(
                self.pool, self.notifications, self.nats_url, self._outbox_config
            )
            await self.outbox.start()
        self.logs = TaskLogs(self.pool)
        await self.logs.ensure_schema()
        self.leases = TaskLeases(self.pool)
        await self.leases.ensure_schema()
        if self.nats_url is not None and self._dispatch:
            self.dispatcher = Dispatcher(self.pool, self.notifications, self.nats_url,
                                         self.dispatch_config)
            await self.dispatcher.start()
        await self._load_admin_credentials()

    async def stop(self) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self.outbox is not None:
            await self.outbox.stop()
        for component in (self.waiter, self.projector, self.sequencer, self.appender):
            await component.stop()
        await self.notifications.stop()
        try:
            # close() waits for every connection to be released: a stuck holder must not
            # hang the shutdown, so after a while the rest are cut.
            async with asyncio.timeout(POOL_CLOSE_TIMEOUT_S):
                await self.pool.close()
        except TimeoutError:
            log.warning("connections still in use after %ss; closing them",
                        POOL_CLOSE_TIMEOUT_S)
            self.pool.terminate()

    async def _load_admin_credentials(self) -> None:
        if self._admin_token:
            self.admin_token_sha256 = hash_token(self._admin_token)
            return
        async with self.pool.acquire() as conn:
            stored = await conn.fetchval("SELECT token_sha256 FROM admin_credentials WHERE id = 1")
            if stored is None:
                token = new_token()
                inserted = await conn.fetchval(
                    "INSERT INTO admin_credentials (id, token_sha256) VALUES (1, $1) "
                    "ON CONFLICT DO NOTHING RETURNING token_sha256",
                    hash_token(token),
                )
                if inserted is not None:
                    self.generated_admin_token = token
                stored = await conn.fetchval(
                    "SELECT token_sha256 FROM admin_credentials WHERE id = 1"
                )
        self.admin_token_sha256 = stored

    async def record(
        self,
        actor: Principal,
        ledger: str,
        events: Sequence[DomainEvent],
        expected_versions: dict[str, int] | None = None,
        reason: str = "",
    ) -> list[LedgerEntry]:
        """Append a command's events to `ledger` and return once every view shows them."""
        request = AppendRequest(
            org=ledger,
            actor=actor.actor,
            events=to_new_events(events, reason),
            expected_versions=expected_versions or {},
        )
        entries = await self.appender.append(request)
        await self.waiter.wait(entries, self.view_wait_s)
        return entries

    async def readiness(self) -> dict[str, bool]:
        checks: dict[str, bool] = {}
        try:
            async with self.pool.acquire(timeout=2) as conn:
                checks["postgres"] = await conn.fetchval("SELECT 1") == 1
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            checks["postgres"] = False
        if self.nats_url is not None:
            checks["nats"] = self.nats_connected()
        return checks

    def nats_connected(self) -> bool:
        """The outbox is connected to NATS and its stream is in place."""
        return self.outbox is not None and self.outbox.connected

    async def principal_for(self, token: str) -> Principal | None:
        digest = hash_token(token)
        if self.admin_token_sha256 is not None and secrets.compare_digest(
            digest, self.admin_token_sha256
        ):
            return Principal(kind="admin")
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT id, org, role FROM api_tokens "
                "WHERE token_sha256 = $1 AND revoked_at IS NULL",
                digest,
            )
        if row is None:
            return None
        if row["role"] == "auditor":
            return Principal(kind="auditor", token_id=row["id"])
        return Principal(kind="org", org=row["org"], token_id=row["id"])
