"""A whole Consort for end-to-end tests: the API under a real uvicorn on a free port (so
the lease sweeper runs as in production), dispatching over the real NATS on a stream of
its own, and helpers to register what a scenario needs through HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import uvicorn

from app.api.app import create_app
from app.execution.dispatcher import DispatchConfig
from app.runtime import Runtime
from runner.contract import Backend
from runner.worker import Runner, RunnerConfig
from tests.conftest import ADMIN_TOKEN, NATS_URL, service_missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Stack:
    url: str
    runtime: Runtime
    http: httpx.AsyncClient
    home: Path
    tokens: dict[str, str] = field(default_factory=dict)
    runners: list[Runner] = field(default_factory=list)

    def headers(self, org: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[org]}"}

    async def post(self, org: str, url: str, **kw: Any) -> httpx.Response:
        return await self.http.post(url, headers=self.headers(org), **kw)

    async def get(self, org: str, url: str, **kw: Any) -> httpx.Response:
        return await self.http.get(url, headers=self.headers(org), **kw)

    async def org(self, org: str, **fields: Any) -> None:
        r = await self.http.post("/organizations", json={"id": org, "name": org, **fields},
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 201, r.text
        self.tokens[org] = r.json()["token"]["token"]

    async def upload(self, org: str, data: bytes) -> str:
        r = await self.post(org, "/files", content=data)
        assert r.status_code == 201, r.text
        return str(r.json()["checksum"])

    async def function(self, org: str, name: str, command: list[str], *,
                       inputs: dict[str, Any] | None = None,
                       outputs: dict[str, Any] | None = None, image: str = "",
                       image_source: str = "IMAGE_REFERENCE", **fields: Any) -> str:
        r = await self.post(org, "/functions", json={
            "name": name, "permissions": {"process": {"public": True, "authorized_ids": []}},
            "inputs": inputs or {}, "outputs": outputs or {}, "image_source": image_source,
            "image": image, "command": command, **fields})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    async def data(self, org: str, samples: dict[str, bytes], share: list[str]) -> tuple[
        str, list[str]
    ]:
        """A data manager of `org` with samples stored as files under the stack's home."""
        opener = await self.upload(org, f"# opener of {org}\n".encode())
        r = await self.post(org, "/data_managers", json={
            "name": f"data of {org}", "opener_checksum": opener,
            "permissions": {"process": {"public": False, "authorized_ids": share}}})
        assert r.status_code == 201, r.text
        manager = str(r.json()["key"])
        keys = []
        for name, content in samples.items():
            path = self.home / "data" / org / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            r = await self.post(org, "/data_samples", json={
                "data_manager_keys": [manager], "location": str(path),
                "checksum": hashlib.sha256(content).hexdigest()})
            assert r.status_code == 201, r.text
            keys.append(str(r.json()["key"]))
        return manager, keys

    async def plan(self, org: str, tasks: list[dict[str, Any]]) -> str:
        r = await self.post(org, "/compute_plans", json={"name": "plan", "tasks": tasks})
        assert r.status_code == 201, r.text
        return str(r.json()["plan"]["key"])

    async def task(self, org: str, key: str) -> dict[str, Any]:
        r = await self.get(org, f"/tasks/{key}")
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    async def wait_status(self, org: str, key: str, *statuses: str,
                          timeout: float = 60) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            task = await self.task(org, key)
            if task["status"] in statuses:
                return task
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"task {key} is {task['status']}, not {statuses}")
            await asyncio.sleep(0.1)

    async def logs(self, org: str, key: str) -> str:
        r = await self.get(org, f"/tasks/{key}/logs")
        assert r.status_code == 200, r.text
        return r.text

    def runner_config(self, org: str, **overrides: Any) -> RunnerConfig:
        fields: dict[str, Any] = {
            "api_url": self.url, "token": self.tokens[org], "org": org, "nats_url": NATS_URL,
            "home": self.home / f"runner-{org}-{len(self.runners)}",
            "dispatch": self.runtime.dispatch_config, "heartbeat_s": 0.5,
            "task_timeout_s": 60.0}
        return RunnerConfig(**(fields | overrides))

    async def runner(self, org: str, backend: Backend, **overrides: Any) -> Runner:
        runner = Runner(self.runner_config(org, **overrides), backend)
        await runner.start()
        self.runners.append(runner)
        return runner


@contextlib.asynccontextmanager
async def running_stack(database_url: str, home: Path) -> AsyncIterator[Stack]:
    try:
        probe = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
        await probe.close()
    except Exception as exc:  # noqa: BLE001 - any connection failure means no NATS
        service_missing(f"NATS at {NATS_URL} ({exc})")
    tag = uuid.uuid4().hex[:8]
    config = DispatchConfig(stream=f"TEST_TASKS_{tag}", subject_prefix=f"test.{tag}.tasks")
    runtime = Runtime(database_url, NATS_URL, admin_token=ADMIN_TOKEN,
                      artifacts_dir=home / "artifacts", dispatch_config=config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    stack = Stack(url, runtime, httpx.AsyncClient(base_url=url, timeout=30), home)
    try:
        yield stack
    finally:
        for runner in stack.runners:
            with contextlib.suppress(Exception):
                await runner.stop(drain_s=0)
        await stack.http.aclose()
        server.should_exit = True
        await serving
        with contextlib.suppress(Exception):
            nc = await nats.connect(NATS_URL)
            await nc.jetstream().delete_stream(config.stream)
            await nc.close()
