"""Errors as RFC 9457 `application/problem+json`, each with a stable `code`.

Clients branch on `code`; `detail` is for people. Nothing half-done is ever left behind a
4xx: rules run before anything is appended, and an append is atomic.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.domain.errors import Conflict, DomainError, Forbidden, InvalidCommand, NotFound
from app.projections.waiter import ViewsBehind
from app.storage.archives import UnsafeArchive
from app.storage.artifacts import (
    ArtifactNotFound,
    ChecksumMismatch,
    InvalidChecksum,
    StorageError,
    TooLarge,
)

log = logging.getLogger(__name__)

# PostgreSQL cannot be reached or is going down. The same request may succeed in a moment,
# as the pool reconnects by itself; a retried registration is safe (idempotent by key).
DATABASE_UNAVAILABLE = (
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
)

PROBLEM_JSON = "application/problem+json"

_STATUS = {InvalidCommand: 400, Forbidden: 403, NotFound: 404, Conflict: 409}
_TITLES = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
    422: "Unprocessable Content", 500: "Internal Server Error", 503: "Service Unavailable",
}


class ApiProblem(Exception):
    """An error raised by the HTTP layer itself (auth, pagination cursors...)."""

    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers


def problem(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {
        "type": f"https://consort.dev/problems/{code}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 400)
        extra: dict[str, Any] = {}
        if isinstance(exc, Conflict) and exc.key is not None:
            extra["key"] = exc.key
        return problem(status, exc.code, exc.message, **extra)

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        status, code = {
            TooLarge: (413, "too_large"), ChecksumMismatch: (400, "checksum_mismatch"),
            InvalidChecksum: (400, "invalid_checksum"), ArtifactNotFound: (404, "unknown_file"),
            UnsafeArchive: (400, "unsafe_archive"),
        }.get(type(exc), (500, "storage_error"))
        return problem(status, code, str(exc))

    @app.exception_handler(ApiProblem)
    async def _api(_: Request, exc: ApiProblem) -> JSONResponse:
        return problem(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        if any(e["type"] == "json_invalid" for e in errors):
            return problem(400, "malformed_json", "the request body is not valid JSON",
                           errors=errors)
        summary = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5]
        )
        return problem(422, "validation_error", summary, errors=errors)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return problem(exc.status_code, code, str(exc.detail))

    @app.exception_handler(ViewsBehind)
    async def _views_behind(_: Request, exc: ViewsBehind) -> JSONResponse:
        log.warning("views behind: %s", exc)
        recorded = [{"org": org, "sequence": seq} for org, seq in sorted(exc.recorded.items())]
        return problem(503, "views_behind", str(exc), {"Retry-After": "1"}, recorded=recorded)

    for unavailable in DATABASE_UNAVAILABLE:
        @app.exception_handler(unavailable)
        async def _database_unavailable(_: Request, exc: Exception) -> JSONResponse:
            log.warning("database unavailable: %r", exc)
            return problem(503, "database_unavailable",
                           "the database cannot be reached right now; retry in a moment",
                           {"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return problem(500, "internal_error", "an internal error occurred; it has been logged")
