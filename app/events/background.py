"""Small helpers for the long-running tasks of a process (appender, sequencer, views...)."""

from __future__ import annotations

import asyncio
import contextlib

# How long stop_task waits before it cancels again (see there).
RECANCEL_S = 1.0


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait until it has finished.

    A cancellation can be lost: on Python 3.11 `asyncio.wait_for` swallows one that
    arrives as its inner wait completes (CPython gh-86296), and a `while True` loop then
    goes on for ever. So the cancel is repeated until the task is done, instead of one
    cancel and an unbounded wait that hangs a shutdown."""
    if task is None:
        return
    task.cancel()
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=RECANCEL_S)
        if not done:
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def wake_or_poll(wake: asyncio.Event, seconds: float) -> None:
    """Wait for a notification, at most `seconds`: a NOTIFY may be lost, a poll is not.

    `asyncio.timeout`, not `asyncio.wait_for`, which can lose a cancellation on 3.11."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await wake.wait()
