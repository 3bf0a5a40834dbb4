"""Errors raised by the client: one class per kind of problem the API reports.

The API answers every error as `application/problem+json` with a stable `code` and a human
`detail`; a `ConsortError` carries both, the HTTP status and, for a 409, the `key` of the
asset that already exists. `retried` tells whether the client had to send the request more
than once (after a connection error), which is how an idempotent registration recognises
its own earlier success in a 409.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class ConsortError(Exception):
    """An error reported by the API (or a transport failure the client gave up on)."""

    def __init__(
        self, detail: str, *, status: int = 0, code: str = "error",
        problem: dict[str, Any] | None = None, retried: bool = False,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}" if status else detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = problem or {}
        self.retried = retried

    @property
    def key(self) -> str | None:
        """The key the API names in the problem (a 409 names the asset that exists)."""
        key = self.problem.get("key")
        return key if isinstance(key, str) else None


class InvalidRequest(ConsortError):
    """400 or 422: the request breaks a rule or is malformed."""


class Unauthorized(ConsortError):
    """401: the token is missing, unknown or revoked."""


class Forbidden(ConsortError):
    """403: the acting organization may not do this."""


class NotFound(ConsortError):
    """404: no such asset (or the caller may not know it exists)."""


class Conflict(ConsortError):
    """409: the asset already exists, or the state forbids the change."""


class Gone(ConsortError):
    """410: the asset's file was deleted (a transient model)."""


class TooLarge(ConsortError):
    """413: the upload is larger than the server accepts."""


class ServerError(ConsortError):
    """5xx: the server failed; the request may be retried later."""


class ConnectionFailed(ConsortError):
    """The server could not be reached, even after the retries."""


class ChecksumMismatch(ConsortError):
    """A download's bytes do not have the SHA-256 the server announced (nothing is kept)."""


class WaitTimeout(ConsortError):
    """`wait_task` / `wait_compute_plan` gave up before the asset reached a final status."""


_BY_STATUS: dict[int, type[ConsortError]] = {
    400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    410: Gone, 413: TooLarge, 422: InvalidRequest,
}


def error_from_response(response: httpx.Response, *, retried: bool = False) -> ConsortError:
    """The `ConsortError` subclass for an error response, from its problem+json body."""
    try:
        body = json.loads(response.content) if response.content else {}
    except ValueError:
        body = {}
    problem: dict[str, Any] = body if isinstance(body, dict) else {}
    status = response.status_code
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ConsortError)
    detail = str(problem.get("detail") or response.reason_phrase or "error")
    code = str(problem.get("code") or f"http_{status}")
    return cls(detail, status=status, code=code, problem=problem, retried=retried)
