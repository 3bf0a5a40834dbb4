"""A bounded, content-addressed cache of the files a runner fetches (openers, function
archives, models, dataset files), evicting the least recently used past its budget.

Files are named by SHA-256, so an entry is valid forever and two tasks asking for the
same bytes at once fetch them once. A task gets its inputs as hard links to cache
entries (a copy across filesystems): evicting an entry never breaks a running task.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

Fetch = Callable[[Path], Awaitable[object]]


class FileCache:
    def __init__(self, root: Path, max_bytes: int = 10 * 1024**3) -> None:
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)
        # checksum → size, least recently used first; rebuilt from disk at start.
        self._entries: collections.OrderedDict[str, int] = collections.OrderedDict()
        existing = sorted(
            (p for p in root.iterdir() if p.is_file() and len(p.name) == 64),
            key=lambda p: p.stat().st_atime,
        )
        for path in existing:
            self._entries[path.name] = path.stat().st_size
        self._locks: dict[str, asyncio.Lock] = {}
        self.hits = 0
        self.misses = 0

    @property
    def size(self) -> int:
        return sum(self._entries.values())

    def path(self, checksum: str) -> Path:
        return self.root / checksum.lower()

    async def get(self, checksum: str, fetch: Fetch) -> Path:
        """The cached file with this SHA-256, fetched with `fetch(dest)` on a miss
        (`fetch` must write `dest` and verify the checksum)."""
        checksum = checksum.lower()
        lock = self._locks.setdefault(checksum, asyncio.Lock())
        async with lock:
            path = self.path(checksum)
            if checksum in self._entries and path.exists():
                self.hits += 1
                self._entries.move_to_end(checksum)
                return path
            self.misses += 1
            await fetch(path)
            self._entries[checksum] = path.stat().st_size
            self._evict(keep=checksum)
            return path

    def _evict(self, keep: str) -> None:
        total = self.size
        for checksum in list(self._entries):
            if total <= self.max_bytes:
                break
            if checksum == keep:
                continue
            total -= self._entries.pop(checksum)
            self.path(checksum).unlink(missing_ok=True)


def place(source: Path, dest: Path) -> None:
    """Put a cached file at `dest`: a hard link when possible, else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
