"""Consort's Python client: `Client` (blocking) and `AsyncClient` (asyncio).

    from consort import Client
    with Client("http://127.0.0.1:8000", token) as client:
        print(client.me())

Errors are `ConsortError` subclasses carrying the API's problem `code` and `detail`.
"""

from consort._protocol import RetryPolicy
from consort.client import AsyncClient, Client
from consort.errors import (
    ChecksumMismatch,
    Conflict,
    ConnectionFailed,
    ConsortError,
    Forbidden,
    Gone,
    InvalidRequest,
    NotFound,
    ServerError,
    TooLarge,
    Unauthorized,
    WaitTimeout,
)

__all__ = [
    "AsyncClient", "ChecksumMismatch", "Client", "ConnectionFailed", "Conflict",
    "ConsortError", "Forbidden", "Gone", "InvalidRequest", "NotFound", "RetryPolicy",
    "ServerError", "TooLarge", "Unauthorized", "WaitTimeout",
]
