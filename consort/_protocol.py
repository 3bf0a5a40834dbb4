"""The request-description layer shared by `Client` and `AsyncClient` (sans I/O).

Every client method is written once, as an *operation*: a generator that yields
instructions and receives their results. It never touches the network or the clock's
sleep itself, so the same operation runs under the blocking driver (`Client`) and the
asyncio driver (`AsyncClient`):

- `Call`: send one request; the driver sends back the `httpx.Response` (a 2xx), or
  throws the matching `ConsortError` into the operation, which may catch it (a 409 on a
  retried registration is how an operation recognises its own earlier success);
- `Sleep`: wait; `Emit`: hand a value to the caller of an iterator method;
- `OpenStream` / `NEXT_LINE` / `CLOSE_STREAM`: read a streaming response line by line
  (Server-Sent Events); `NEXT_LINE` answers None when the stream ended or broke.

Drivers also own the retry loop; which failures may be retried is decided here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import secrets
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeAlias, TypeVar

import httpx

T = TypeVar("T")
Params: TypeAlias = Sequence[tuple[str, str | int | float | bool]]
Progress: TypeAlias = Callable[[int, int | None], None]
CHUNK = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Upload:
    """A request body read from a file (or bytes) in chunks, reporting progress."""

    source: Path | bytes
    progress: Progress | None = None

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self._read():
            digest.update(chunk)
        return digest.hexdigest()

    def chunks(self) -> Iterator[bytes]:
        """The body, chunk by chunk; progress is reported as chunks are consumed."""
        done, total = 0, self.size
        for chunk in self._read():
            yield chunk
            done += len(chunk)
            if self.progress is not None:
                self.progress(done, total)

    def _read(self) -> Iterator[bytes]:
        handle = (io.BytesIO(self.source) if isinstance(self.source, bytes)
                  else self.source.open("rb"))
        with handle:
            while chunk := handle.read(CHUNK):
                yield chunk


@dataclasses.dataclass(frozen=True)
class Call:
    """One HTTP request and how to send it."""

    method: str
    path: str
    params: Params = ()
    json: Any = None
    content: bytes | None = None
    upload: Upload | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # True when sending it twice has the effect of sending it once (reads, content-addressed
    # uploads, registrations under a client-chosen key): then the driver may re-send it
    # after the connection broke mid-request. Other requests are re-sent only when the
    # connection could not be opened at all, so they never reached the server.
    idempotent: bool = True
    download: Path | None = None
    download_progress: Progress | None = None
    # The SHA-256 the caller expects of a download (besides the one the server announces).
    download_sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclasses.dataclass(frozen=True)
class Emit(Generic[T]):
    value: T


@dataclasses.dataclass(frozen=True)
class OpenStream:
    call: Call


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEXT_LINE = _Marker("NEXT_LINE")
CLOSE_STREAM = _Marker("CLOSE_STREAM")

Instruction: TypeAlias = Call | Sleep | Emit[Any] | OpenStream | _Marker
# An operation: yields instructions, receives their results, returns the method's value.
Op: TypeAlias = Generator[Instruction, Any, T]


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff on connection errors: base, base*factor, ... capped."""

    attempts: int = 5
    base: float = 0.25
    factor: float = 2.0
    max_delay: float = 8.0

    def delay(self, attempt: int) -> float:
        """The wait before attempt number `attempt + 1` (attempt counts from 1)."""
        return float(min(self.max_delay, self.base * self.factor ** (attempt - 1)))


def may_resend(call: Call, exc: httpx.TransportError) -> bool:
    """Whether a request that failed with `exc` may be sent again."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True  # the request never left
    return call.idempotent and isinstance(
        exc, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError | httpx.ReadTimeout
        | httpx.WriteTimeout
    )


def backoff(attempt: int, base: float = 0.2, cap: float = 2.0) -> float:
    """Polling interval after `attempt` polls with no change (0.2 s growing to `cap`)."""
    return float(min(cap, base * 1.5 ** max(0, attempt)))


@dataclasses.dataclass
class SseParser:
    """Server-Sent Events, one line at a time: returns a message when one is complete."""

    fields: dict[str, str] = dataclasses.field(default_factory=dict)

    def feed(self, line: str) -> dict[str, str] | None:
        if line == "":
            message, self.fields = self.fields, {}
            return message or None
        if line.startswith(":"):
            return None  # a comment: keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        self.fields[name] = self.fields[name] + "\n" + value if name == "data" and \
            name in self.fields else value
        return None


def drive_step(op: Op[T], value: Any, error: BaseException | None) -> Instruction:
    """Advance an operation with the last result (or throw the last error into it)."""
    return op.throw(error) if error is not None else op.send(value)


def request_kwargs(call: Call) -> dict[str, Any]:
    """httpx keyword arguments for a call (the body of an `upload` is added by the driver)."""
    kwargs: dict[str, Any] = {"params": list(call.params) or None,
                              "headers": dict(call.headers)}
    if call.json is not None:
        kwargs["json"] = call.json
    if call.content is not None:
        kwargs["content"] = call.content
    return kwargs


RETRY_STATUSES = frozenset({502, 503, 504})


class Retry(Exception):
    """A response that asks for the request to be sent again (a 502/503/504)."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.status_code} {response.reason_phrase}")
        self.response = response


def check(call: Call, response: httpx.Response, retried: bool) -> httpx.Response:
    """The response if it is a success; else Retry or the ConsortError to raise."""
    from consort.errors import error_from_response

    if response.is_success:
        return response
    if response.status_code in RETRY_STATUSES and call.idempotent:
        raise Retry(response)
    raise error_from_response(response, retried=retried)


class Attempts:
    """Counts the sends of one call and decides whether a failure is retried."""

    def __init__(self, policy: RetryPolicy, call: Call) -> None:
        self.policy = policy
        self.call = call
        self.count = 0

    @property
    def retried(self) -> bool:
        return self.count > 1

    def next(self) -> None:
        self.count += 1

    def delay_after(self, exc: httpx.TransportError | Retry) -> float:
        """How long to wait before sending again; raises when giving up."""
        from consort.errors import ConnectionFailed, error_from_response

        retryable = isinstance(exc, Retry) or (
            isinstance(exc, httpx.TransportError) and may_resend(self.call, exc))
        if retryable and self.count < self.policy.attempts:
            return self.policy.delay(self.count)
        if isinstance(exc, Retry):
            raise error_from_response(exc.response, retried=self.retried) from None
        raise ConnectionFailed(
            f"{self.call.method} {self.call.path}: {type(exc).__name__}: {exc} "
            f"(after {self.count} attempt{'s' if self.count > 1 else ''})",
            code="connection_failed", retried=self.retried,
        ) from exc


class DownloadFile:
    """Writes a download next to its destination and renames it into place when complete."""

    def __init__(self, call: Call, response: httpx.Response) -> None:
        assert call.download is not None
        self.call = call
        self.target = call.download
        # Unique, so two downloads to one place never write into each other's file.
        self.partial = self.target.with_name(
            f"{self.target.name}.part-{secrets.token_hex(4)}")
        self.progress = call.download_progress
        length = response.headers.get("Content-Length")
        self.total = int(length) if length and length.isdigit() else None
        # The server names the stored file's SHA-256: what arrives is checked against it,
        # and against the caller's own expectation when it has one.
        self.expected = {s.lower() for s in (response.headers.get("X-Content-SHA256"),
                                             call.download_sha256) if s}
        self.digest = hashlib.sha256()
        self.done = 0
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.partial.open("wb")

    def write(self, chunk: bytes) -> None:
        self.handle.write(chunk)
        self.digest.update(chunk)
        self.done += len(chunk)
        if self.progress is not None:
            self.progress(self.done, self.total)

    def finish(self, ok: bool) -> None:
        """Rename into place when complete and intact; otherwise leave nothing behind."""
        self.handle.close()
        got = self.digest.hexdigest()
        intact = all(expected == got for expected in self.expected)
        if ok and intact:
            self.partial.replace(self.target)
            return
        self.partial.unlink(missing_ok=True)
        if ok:
            from consort.errors import ChecksumMismatch  # errors imports this module

            raise ChecksumMismatch(
                f"GET {self.call.path}: received bytes with SHA-256 {got}, expected "
                f"{' and '.join(sorted(self.expected))}", code="checksum_mismatch")
