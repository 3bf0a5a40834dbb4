"""What a runner asks of the Consort API, with its organization's token.

A runner never touches the database: it starts tasks, renews leases, fetches inputs
(checksum-verified), appends logs and registers outputs through the same HTTP API as
everyone else, so its organization's permissions apply to it too. The requests are the
Python client's (`consort.AsyncClient`, on `RunnerApi.client`); this adapter hands the
worker plain dicts and the few shapes it works with.

Retries are the client's, with the runner's pace: reads and idempotent commands (a start
sent again by the same runner, done/fail, a renewal, outputs, content-addressed uploads)
are sent up to three times, 0.2 s then 0.4 s apart; log appends and lease releases are
sent again only when they never reached the server. Errors are `ConsortError`s
(`ApiError`), a server out of reach after the retries `ConnectionFailed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel

from consort import (
    AsyncClient,
    ChecksumMismatch,
    ConnectionFailed,
    ConsortError,
    RetryPolicy,
)

__all__ = ["Action", "ApiError", "ChecksumMismatch", "ConnectionFailed", "ErrorType", "RunnerApi"]

# The API refused a request: `.status`, `.code` (the problem's machine-readable code) and
# `.detail`; `ConnectionFailed`, a subclass, when it could not be reached.
ApiError = ConsortError

RETRY = RetryPolicy(attempts=3, base=0.2, factor=2.0)
Action = Literal["start", "done", "fail"]
ErrorType = Literal["BUILD", "EXECUTION", "INTERNAL"]


def _dict(row: BaseModel) -> dict[str, Any]:
    return row.model_dump(mode="json")


class RunnerApi:
    def __init__(self, url: str, token: str, *, transport: httpx.AsyncBaseTransport | None = None
                 ) -> None:
        self.client = AsyncClient(
            url, token, timeout=httpx.Timeout(60.0, connect=5.0), retry=RETRY,
            transport=transport, limits=httpx.Limits(keepalive_expiry=2.0))

    async def close(self) -> None:
        await self.client.aclose()

    # -- tasks ---------------------------------------------------------------------------

    async def task(self, key: str) -> dict[str, Any]:
        return _dict(await self.client.get_task(key))

    async def act(self, key: str, action: Action, runner_id: str, *,
                  lease_seconds: float | None = None, error_type: ErrorType | None = None,
                  message: str = "", logs_checksum: str | None = None) -> dict[str, Any]:
        """start (taking a lease for `lease_seconds`) / done / fail, as runner `runner_id`."""
        return _dict(await self.client.task_action(
            key, action, runner_id=runner_id, lease_seconds=lease_seconds,
            error_type=error_type, message=message, logs_checksum=logs_checksum))

    async def renew(self, key: str, runner_id: str, lease_s: float) -> str:
        """Renew the lease; returns the task's status (raises ApiError lease_lost)."""
        return (await self.client.renew_lease(key, runner_id, lease_seconds=lease_s)).status

    async def release(self, key: str, runner_id: str) -> None:
        """Give the task back at once (the runner is shutting down)."""
        await self.client.release_lease(key, runner_id)

    async def append_logs(self, key: str, data: bytes) -> None:
        await self.client.append_logs(key, data)

    # -- assets --------------------------------------------------------------------------

    async def asset(self, kind: str, key: str) -> dict[str, Any]:
        """kind: functions, data_managers, data_samples, models, datasets."""
        get = {"functions": self.client.get_function,
               "data_managers": self.client.get_data_manager,
               "data_samples": self.client.get_data_sample, "models": self.client.get_model,
               "datasets": self.client.get_dataset}[kind]
        return _dict(await get(key))

    async def outputs_of(self, kind: str, task_key: str, identifier: str) -> list[dict[str, Any]]:
        """The models or datasets a task produced under one output identifier."""
        listing = (self.client.iter_models(compute_task_key=task_key, page_size=1000)
                   if kind == "models" else
                   self.client.iter_datasets(compute_task_key=task_key, page_size=1000))
        return [_dict(item) async for item in listing if item.identifier == identifier]

    async def upload(self, path: Path) -> str:
        """Stream a file to POST /files; returns its SHA-256 (verified by the server)."""
        return (await self.client.upload_file(path)).checksum

    async def register_model(self, task_key: str, identifier: str, checksum: str) -> None:
        await self.client.register_model_output(task_key, identifier, checksum=checksum)

    async def register_performance(self, task_key: str, identifier: str, value: float) -> None:
        await self.client.register_performance_output(task_key, identifier, value)

    async def register_dataset(self, task_key: str, identifier: str,
                               files: list[dict[str, str]]) -> None:
        await self.client.register_dataset_output(
            task_key, identifier, [(f["path"], f["checksum"]) for f in files])
