"""Errors a rule can raise; each carries a stable machine-readable code.

The HTTP layer maps the error class to a status (400, 403, 404, 409); the code and the
message reach the client unchanged.
"""

from __future__ import annotations


class DomainError(Exception):
    """A command was refused by a rule."""

    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidCommand(DomainError):
    """The command is malformed or breaks a rule (HTTP 400)."""


class Forbidden(DomainError):
    """The acting organization may not do this (HTTP 403)."""

    code = "forbidden"


class NotFound(DomainError):
    """The asset does not exist, or the caller may not know it does (HTTP 404)."""

    code = "not_found"


class Conflict(DomainError):
    """The command clashes with the current state (HTTP 409)."""

    code = "conflict"

    def __init__(self, message: str, *, code: str | None = None, key: str | None = None) -> None:
        super().__init__(message, code=code)
        self.key = key
