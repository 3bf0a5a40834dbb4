"""The live ledger as Server-Sent Events: follow global positions, resume from an id.

Each event is sent as `id: <position>`, `event: <event_type>`, `data: <entry JSON>`. A
client that reconnects with `Last-Event-ID: <position>` gets every matching entry placed
after that position, in position order: positions are only given to committed entries,
by one sequencer transaction at a time, so following them never skips an entry and never
repeats one. The stream waits on the `consort_positions` NOTIFY channel between reads and
polls as well, because a NOTIFY can be lost while the listener reconnects.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from app.events.background import wake_or_poll
from app.events.entries import LedgerEntry
from app.events.reader import last_position, read_positions
from app.events.sequencer import POSITIONS_CHANNEL
from app.runtime import Runtime

# Entries read per query; a full batch is followed at once by the next one.
BATCH = 500
# Longest wait for a NOTIFY before the stream reads again anyway.
POLL_SECONDS = 1.0
# A comment line is sent when nothing else was sent for this long, so that proxies and
# clients do not take a quiet stream for a dead one.
KEEPALIVE_SECONDS = 15.0

KEEPALIVE = ": keep-alive\n\n"


@dataclasses.dataclass(frozen=True)
class StreamFilter:
    """Which entries a stream carries; None means no restriction on that field."""

    orgs: Sequence[str] | None = None
    asset_kinds: Sequence[str] | None = None
    event_types: Sequence[str] | None = None


def format_event(entry: LedgerEntry) -> str:
    """One SSE message; the JSON has no newline, so it fits on one `data:` line."""
    data = json.dumps(entry.to_json(), separators=(",", ":"), ensure_ascii=False)
    return f"id: {entry.position}\nevent: {entry.event_type}\ndata: {data}\n\n"


async def follow(
    runtime: Runtime,
    after: int,
    selection: StreamFilter,
    is_disconnected: Callable[[], Awaitable[bool]],
    *,
    poll_seconds: float | None = None,
    keepalive_seconds: float | None = None,
) -> AsyncIterator[str]:
    """Yield SSE messages for the matching entries after `after`, then live ones, forever.

    Ends when `is_disconnected()` says the client has gone (the server also cancels the
    generator when it sees the disconnect first).
    """
    poll = POLL_SECONDS if poll_seconds is None else poll_seconds
    keepalive = KEEPALIVE_SECONDS if keepalive_seconds is None else keepalive_seconds
    wake = runtime.notifications.subscribe(POSITIONS_CHANNEL)
    # Every matching entry at or below `scanned` has been sent; with filters it can run
    # ahead of the last id sent, so a quiet filter does not rescan the same positions.
    scanned = after
    last_write = time.monotonic()
    try:
        while True:
            wake.clear()  # cleared before reading: a NOTIFY during the read wakes us again
            async with runtime.pool.acquire() as conn:
                top = await last_position(conn)
                entries = await read_positions(
                    conn, scanned, BATCH,
                    orgs=selection.orgs,
                    asset_kinds=selection.asset_kinds,
                    event_types=selection.event_types,
                )
            if entries:
                yield "".join(format_event(entry) for entry in entries)  # one write per read
                last_write = time.monotonic()
                last = entries[-1].position
                assert last is not None
                if len(entries) == BATCH:
                    scanned = last
                    continue
                scanned = max(top, last)
            else:
                # Positions up to `top` were all visible when it was read (sequencer
                # transactions never overlap), and none of them matched.
                scanned = max(top, scanned)
            if await is_disconnected():
                return
            quiet = time.monotonic() - last_write
            await wake_or_poll(wake, max(0.0, min(poll, keepalive - quiet)))
            if time.monotonic() - last_write >= keepalive:
                yield KEEPALIVE
                last_write = time.monotonic()
    finally:
        runtime.notifications.unsubscribe(POSITIONS_CHANNEL, wake)
