"""Small helpers for the long-running tasks of a process (appender, sequencer, views...)."""

from __future__ import annotations

import asyncio
import contextlib


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait until it has finished."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def wake_or_poll(wake: asyncio.Event, seconds: float) -> None:
    """Wait for a notification, at most `seconds`: a NOTIFY may be lost, a poll is not."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout=seconds)
