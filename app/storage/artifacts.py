"""Content-addressed artifact storage: bytes stored and found by their SHA-256.

Owns the `ArtifactStore` interface (what the service needs from a blob store: streamed
put with a size limit and checksum verification, streamed read, exists/size/delete/verify)
and `FilesystemArtifactStore`, which keeps each artifact at `<root>/<sha[0:2]>/<sha>`.
An S3-compatible store can implement the same interface later; the `address` it returns
(`<sha[0:2]>/<sha>`) is meant to double as its object key.

Uploads are streamed to a temporary file under `<root>/tmp` while being hashed (at most
about one chunk is held in memory), then renamed into place atomically, so a reader never
sees a partial artifact and storing the same content twice is harmless. All file I/O runs
in worker threads (`asyncio.to_thread`), never on the event loop.

Content addressing means two assets with identical bytes share one file: whoever calls
`delete` must first make sure no other live asset refers to the same checksum.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import errno
import hashlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

CHUNK_SIZE = 1024 * 1024
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class StorageError(Exception):
    """Base class of the storage errors; `code` is stable and machine-readable."""

    code = "storage_error"


class TooLarge(StorageError):
    """The content is larger than the allowed limit (HTTP 413)."""

    code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the content exceeds the limit of {limit} bytes")
        self.limit = limit


class ChecksumMismatch(StorageError):
    """The content's SHA-256 is not the one announced (HTTP 400)."""

    code = "checksum_mismatch"

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"the content's sha256 is {actual}, not the expected {expected}")
        self.expected = expected
        self.actual = actual


class InvalidChecksum(StorageError, ValueError):
    """A string that is not a SHA-256 hex digest was given as one (HTTP 400)."""

    code = "invalid_checksum"

    def __init__(self, value: str) -> None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        super().__init__(f"{shown!r} is not a sha256 hex digest (64 hex characters)")
        self.value = value


class ArtifactNotFound(StorageError):
    """No artifact with this checksum is stored (HTTP 404)."""

    code = "not_found"

    def __init__(self, sha256: str) -> None:
        super().__init__(f"no artifact with sha256 {sha256} is stored")
        self.sha256 = sha256


def normalize_sha256(value: str) -> str:
    """The lowercase form of a SHA-256 hex digest; InvalidChecksum for anything else."""
    lowered = value.strip().lower()
    if not _SHA256_HEX.fullmatch(lowered):
        raise InvalidChecksum(value)
    return lowered


def artifact_key(sha256: str) -> str:
    """The store-relative key of an artifact: `<sha[0:2]>/<sha>`."""
    digest = normalize_sha256(sha256)
    return f"{digest[:2]}/{digest}"


@dataclasses.dataclass(frozen=True)
class StoredArtifact:
    sha256: str
    size: int
    # Store-relative key (`<sha[0:2]>/<sha>`); what an event records as the storage address.
    address: str


class ArtifactReader(abc.ABC):
    """An opened artifact: an async iterator of chunks that knows its size.

    Close it (`aclose`, or `async with`) when not reading it to the end; reading to the
    end closes it.
    """

    size: int

    def __aiter__(self) -> ArtifactReader:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> bytes: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> ArtifactReader:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class ArtifactStore(abc.ABC):
    """What the service needs from a blob store. Every checksum argument is a SHA-256 hex
    digest (InvalidChecksum otherwise); reads of a missing artifact raise ArtifactNotFound."""

    @abc.abstractmethod
    async def put_stream(
        self,
        chunks: AsyncIterable[bytes],
        *,
        max_bytes: int,
        expected_sha256: str | None = None,
    ) -> StoredArtifact:
        """Store the streamed content. TooLarge as soon as more than `max_bytes` arrive,
        ChecksumMismatch if `expected_sha256` is given and differs; in both cases nothing
        is stored. Storing content that is already stored succeeds and changes nothing."""

    async def put_bytes(
        self,
        data: bytes,
        *,
        max_bytes: int | None = None,
        expected_sha256: str | None = None,
    ) -> StoredArtifact:
        """Store a small in-memory value (same rules as `put_stream`)."""

        async def single() -> AsyncIterator[bytes]:
            yield data

        limit = len(data) if max_bytes is None else max_bytes
        return await self.put_stream(single(), max_bytes=limit, expected_sha256=expected_sha256)

    @abc.abstractmethod
    async def open(self, sha256: str, *, chunk_size: int = CHUNK_SIZE) -> ArtifactReader:
        """Open the artifact for streaming (ArtifactNotFound now, not at the first read)."""

    async def iter_chunks(
        self, sha256: str, *, chunk_size: int = CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        """The artifact's bytes in chunks (ArtifactNotFound at the first iteration)."""
        async with await self.open(sha256, chunk_size=chunk_size) as reader:
            async for chunk in reader:
                yield chunk

    async def read_bytes(self, sha256: str, *, max_bytes: int) -> bytes:
        """The whole artifact in memory, for small ones (TooLarge above `max_bytes`)."""
        async with await self.open(sha256) as reader:
            if reader.size > max_bytes:
                raise TooLarge(max_bytes)
            return b"".join([chunk async for chunk in reader])

    @abc.abstractmethod
    async def exists(self, sha256: str) -> bool: ...

    @abc.abstractmethod
    async def size(self, sha256: str) -> int: ...

    @abc.abstractmethod
    async def delete(self, sha256: str) -> bool:
        """Remove the artifact; False if it was not stored."""

    @abc.abstractmethod
    async def verify(self, sha256: str) -> bool:
        """Recompute the stored content's SHA-256: True if it still matches its name."""


class _FileReader(ArtifactReader):
    def __init__(self, file: BinaryIO, size: int, chunk_size: int) -> None:
        self._file: BinaryIO | None = file
        self.size = size
        self._chunk_size = chunk_size

    async def __anext__(self) -> bytes:
        file = self._file
        if file is None:
            raise StopAsyncIteration
        data = await asyncio.to_thread(file.read, self._chunk_size)
        if not data:
            await self.aclose()
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            await asyncio.to_thread(file.close)


def _write_and_hash(file: BinaryIO, hasher: hashlib._Hash, data: bytes | bytearray) -> None:
    hasher.update(data)
    file.write(data)


def _hash_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            hasher.update(chunk)
    return hasher.hexdigest()


class FilesystemArtifactStore(ArtifactStore):
    """Artifacts as files under `root` (the app uses `$CONSORT_HOME/artifacts`).

    `durable=True` fsyncs each new artifact and its directory before the put returns, so
    an artifact recorded in the ledger survives a crash.
    """

    def __init__(self, root: Path | str, *, durable: bool = True) -> None:
        self.root = Path(root)
        self.durable = durable
        self._tmp = self.root / "tmp"

    # -- locations -------------------------------------------------------------------

    def path(self, sha256: str) -> Path:
        """Where the artifact's file is (or would be); no I/O. For streaming responses."""
        return self.root / artifact_key(sha256)

    # -- writing ---------------------------------------------------------------------

    async def put_stream(
        self,
        chunks: AsyncIterable[bytes],
        *,
        max_bytes: int,
        expected_sha256: str | None = None,
    ) -> StoredArtifact:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        expected = normalize_sha256(expected_sha256) if expected_sha256 is not None else None
        temp_path, file = await asyncio.to_thread(self._open_temp)
        hasher = hashlib.sha256()
        size = 0
        pending = bytearray()
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(max_bytes)
                if not pending and len(chunk) >= CHUNK_SIZE:
                    await asyncio.to_thread(_write_and_hash, file, hasher, chunk)
                    continue
                pending += chunk
                if len(pending) >= CHUNK_SIZE:
                    data, pending = pending, bytearray()
                    await asyncio.to_thread(_write_and_hash, file, hasher, data)
            if pending:
                await asyncio.to_thread(_write_and_hash, file, hasher, pending)
            await asyncio.to_thread(self._finish_temp, file)
            digest = hasher.hexdigest()
            if expected is not None and digest != expected:
                raise ChecksumMismatch(expected, digest)
            await asyncio.to_thread(self._install, temp_path, digest)
        except BaseException:
            # Synchronous on purpose: it must also run when the task is being cancelled.
            file.close()
            temp_path.unlink(missing_ok=True)
            raise
        return StoredArtifact(sha256=digest, size=size, address=artifact_key(digest))

    def _open_temp(self) -> tuple[Path, BinaryIO]:
        self._tmp.mkdir(parents=True, exist_ok=True)
        path = self._tmp / f"{uuid.uuid4().hex}.part"
        return path, path.open("xb")

    def _finish_temp(self, file: BinaryIO) -> None:
        file.flush()
        if self.durable:
            os.fsync(file.fileno())
        file.close()

    def _install(self, temp_path: Path, digest: str) -> None:
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(temp_path, 0o444)
        # Replacing an identical file is harmless; readers keep the inode they opened.
        os.replace(temp_path, final)
        if self.durable:
            _fsync_directory(final.parent)

    # -- reading ---------------------------------------------------------------------

    async def open(self, sha256: str, *, chunk_size: int = CHUNK_SIZE) -> ArtifactReader:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        path = self.path(sha256)
        try:
            file, size = await asyncio.to_thread(_open_with_size, path)
        except FileNotFoundError:
            raise ArtifactNotFound(normalize_sha256(sha256)) from None
        return _FileReader(file, size, chunk_size)

    async def exists(self, sha256: str) -> bool:
        return await asyncio.to_thread(self.path(sha256).is_file)

    async def size(self, sha256: str) -> int:
        path = self.path(sha256)
        try:
            stat = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            raise ArtifactNotFound(normalize_sha256(sha256)) from None
        return stat.st_size

    async def delete(self, sha256: str) -> bool:
        path = self.path(sha256)
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            return False
        return True

    async def verify(self, sha256: str) -> bool:
        digest = normalize_sha256(sha256)
        try:
            actual = await asyncio.to_thread(_hash_file, self.path(digest))
        except FileNotFoundError:
            raise ArtifactNotFound(digest) from None
        return actual == digest

    # -- housekeeping ----------------------------------------------------------------

    async def remove_stale_uploads(self, *, older_than_s: float = 3600.0) -> int:
        """Delete temporary files left by uploads interrupted by a crash; their count."""
        return await asyncio.to_thread(self._remove_stale_uploads, older_than_s)

    def _remove_stale_uploads(self, older_than_s: float) -> int:
        if not self._tmp.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in self._tmp.iterdir():
            try:
                if entry.name.endswith(".part") and entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def _open_with_size(path: Path) -> tuple[BinaryIO, int]:
    file = path.open("rb")
    return file, os.fstat(file.fileno()).st_size


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:  # pragma: no cover - platforms without directory fds
        if exc.errno in (errno.EACCES, errno.EINVAL):
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
