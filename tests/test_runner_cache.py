"""The runner's file cache: fetched once per checksum, bounded, least recently used out."""

from __future__ import annotations

import asyncio
import functools
import hashlib
from pathlib import Path

from runner.cache import FileCache


def content(n: int) -> bytes:
    return bytes([n]) * 100


async def fetcher(calls: list[str], data: bytes, dest: Path) -> None:
    calls.append(hashlib.sha256(data).hexdigest())
    await asyncio.sleep(0.01)
    await asyncio.to_thread(dest.write_bytes, data)


async def test_same_checksum_is_fetched_once_even_concurrently(tmp_path: Path) -> None:
    cache = FileCache(tmp_path, max_bytes=10_000)
    calls: list[str] = []
    data = content(1)
    key = hashlib.sha256(data).hexdigest()
    paths = await asyncio.gather(*(cache.get(key, lambda d: fetcher(calls, data, d))
                                   for _ in range(5)))
    assert calls == [key] and len(set(paths)) == 1 and paths[0].read_bytes() == data


async def test_least_recently_used_entry_is_evicted_past_the_budget(tmp_path: Path) -> None:
    cache = FileCache(tmp_path, max_bytes=250)  # room for two 100-byte entries
    calls: list[str] = []
    keys = []
    for n in range(3):
        data = content(n)
        keys.append(hashlib.sha256(data).hexdigest())
        await cache.get(keys[-1], functools.partial(fetcher, calls, data))
        if n == 1:
            await cache.get(keys[0], lambda d: fetcher(calls, content(0), d))  # 0 used again
    assert not cache.path(keys[1]).exists()  # the least recently used went
    assert cache.path(keys[0]).exists() and cache.path(keys[2]).exists()
    assert cache.size <= 250


async def test_cache_survives_a_restart(tmp_path: Path) -> None:
    data = content(7)
    key = hashlib.sha256(data).hexdigest()
    calls: list[str] = []
    await FileCache(tmp_path).get(key, lambda d: fetcher(calls, data, d))
    await FileCache(tmp_path).get(key, lambda d: fetcher(calls, data, d))
    assert len(calls) == 1
