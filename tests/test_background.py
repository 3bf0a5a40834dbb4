"""Background tasks stop when asked, even when a cancellation gets lost on the way."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app import runtime as runtime_module
from app.events import background
from app.events.background import stop_task, wake_or_poll
from app.runtime import Runtime


async def test_stop_task_stops_a_loop_that_swallowed_the_first_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What asyncio.wait_for does on Python 3.11 when the cancel and the wake-up race:
    # the CancelledError never reaches the loop, which goes round again.
    swallowed = 0

    async def loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    monkeypatch.setattr(background, "RECANCEL_S", 0.05)
    task = asyncio.create_task(loop())
    await asyncio.sleep(0.02)
    async with asyncio.timeout(5):
        await stop_task(task)
    assert task.cancelled() and swallowed == 1


async def test_wake_or_poll_returns_on_a_wake_or_after_the_poll() -> None:
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await wake_or_poll(wake, 0.05)
    assert loop.time() - started >= 0.04
    loop.call_later(0.01, wake.set)
    started = loop.time()
    await wake_or_poll(wake, 5)
    assert loop.time() - started < 1


async def test_runtime_stop_cuts_connections_still_held_after_a_while(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime_module, "POOL_CLOSE_TIMEOUT_S", 0.2)
    rt = Runtime(database_url, admin_token="t", artifacts_dir=tmp_path / "artifacts")
    await rt.start()
    await rt.pool.acquire()  # a holder that never gives it back
    async with asyncio.timeout(10):  # without the cut, close() waits for it for ever
        await rt.stop()
    assert rt.pool.is_closing()
