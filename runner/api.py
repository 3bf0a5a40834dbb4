"""What a runner asks of the Consort API, with its organization's token.

A runner never touches the database: it starts tasks, renews leases, fetches inputs
(checksum-verified), appends logs and registers outputs through the same HTTP API as
everyone else, so its organization's permissions apply to it too.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx


class ApiError(Exception):
    """The API refused a request; `code` is the problem's machine-readable code."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


class ChecksumMismatch(Exception):
    pass


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
        code, detail = str(body.get("code", "error")), str(body.get("detail", ""))
    except ValueError:
        code, detail = "error", response.text[:500]
    raise ApiError(response.status_code, code, detail)


class RunnerApi:
    def __init__(self, url: str, token: str, *, transport: httpx.AsyncBaseTransport | None = None
                 ) -> None:
        # Idle connections are dropped before the server's keep-alive timeout (uvicorn: 5 s)
        # could close one under a request being sent on it.
        self._http = httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(60.0, connect=5.0), transport=transport,
            limits=httpx.Limits(keepalive_expiry=2.0))

    async def close(self) -> None:
        await self._http.aclose()

    async def _json(self, method: str, url: str, **kw: Any) -> Any:
        for attempt in range(3):
            try:
                response = await self._http.request(method, url, **kw)
                break
            except httpx.TransportError:
                # Reads are safe to send again; a command may have arrived, so the caller
                # decides (its next step sees the task's state either way).
                if method != "GET" or attempt == 2:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        _raise_for(response)
        return response.json() if response.content else None

    # -- tasks ---------------------------------------------------------------------------

    async def me(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("GET", "/me")
        return result

    async def task(self, key: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("GET", f"/tasks/{key}")
        return result

    async def todo_tasks(self, worker: str) -> list[str]:
        """Keys of the worker's TODO tasks (a runner's safety net beside NATS)."""
        keys: list[str] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"worker": worker, "status": "TODO", "limit": 500}
            if cursor:
                params["cursor"] = cursor
            page = await self._json("GET", "/tasks", params=params)
            keys += [t["key"] for t in page["items"]]
            cursor = page.get("next_cursor")
            if not cursor:
                return keys

    async def act(self, key: str, action: str, runner_id: str, **fields: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self._json(
            "POST", f"/tasks/{key}/actions",
            json={"action": action, "runner_id": runner_id, **fields})
        return result

    async def renew(self, key: str, runner_id: str, lease_s: float) -> str:
        """Renew the lease; returns the task's status (raises ApiError lease_lost)."""
        body = await self._json("POST", f"/tasks/{key}/lease",
                                json={"runner_id": runner_id, "lease_seconds": lease_s})
        return str(body["status"])

    async def release(self, key: str, runner_id: str) -> None:
        """Give the task back at once (the runner is shutting down): it is TODO again
        within a second, for another runner, without counting as an attempt."""
        await self._json("POST", f"/tasks/{key}/lease",
                         json={"runner_id": runner_id, "release": True})

    async def append_logs(self, key: str, data: bytes) -> None:
        await self._json("POST", f"/tasks/{key}/logs", content=data)

    async def read_logs(self, key: str) -> bytes:
        response = await self._http.get(f"/tasks/{key}/logs")
        _raise_for(response)
        return response.content

    # -- assets --------------------------------------------------------------------------

    async def asset(self, kind: str, key: str) -> dict[str, Any]:
        """kind: functions, data_managers, data_samples, models, datasets."""
        result: dict[str, Any] = await self._json("GET", f"/{kind}/{key}")
        return result

    async def outputs_of(self, kind: str, task_key: str, identifier: str) -> list[dict[str, Any]]:
        """The models or datasets a task produced under one output identifier."""
        page = await self._json("GET", f"/{kind}",
                                params={"compute_task_key": task_key, "limit": 1000})
        return [item for item in page["items"] if item.get("identifier") == identifier]

    async def download(self, url: str, dest: Path, checksum: str | None,
                       params: dict[str, str] | None = None) -> Path:
        """Stream `url` into `dest` (atomically), verifying its SHA-256 when known."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + f".part{os.getpid()}")
        digest = hashlib.sha256()
        try:
            async with self._http.stream("GET", url, params=params) as response:
                if not response.is_success:
                    await response.aread()
                    _raise_for(response)
                with partial.open("wb") as out:
                    async for chunk in response.aiter_bytes(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            if checksum is not None and digest.hexdigest() != checksum.lower():
                raise ChecksumMismatch(f"{url}: got sha256 {digest.hexdigest()}, "
                                       f"expected {checksum}")
            partial.replace(dest)
        finally:
            partial.unlink(missing_ok=True)
        return dest

    async def upload(self, path: Path) -> str:
        """Stream a file to POST /files; returns its SHA-256 (verified by the server)."""
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)

        async def body() -> AsyncIterator[bytes]:
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    yield block

        result = await self._json("POST", "/files", content=body(),
                                  headers={"X-Content-SHA256": digest.hexdigest()})
        return str(result["checksum"])

    async def register_model(self, task_key: str, identifier: str, checksum: str) -> None:
        await self._json("POST", f"/tasks/{task_key}/outputs/{identifier}/model",
                         json={"checksum": checksum})

    async def register_performance(self, task_key: str, identifier: str, value: float) -> None:
        await self._json("POST", f"/tasks/{task_key}/outputs/{identifier}/performance",
                         json={"value": value})

    async def register_dataset(self, task_key: str, identifier: str,
                               files: list[dict[str, str]]) -> None:
        await self._json("POST", f"/tasks/{task_key}/outputs/{identifier}/dataset",
                         json={"files": files})
