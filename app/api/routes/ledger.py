"""The audit side of the ledger: reading entries, following them live, verifying a chain.

Who may read what: an organization reads its own ledger; auditors and the administrator
read every ledger (the system ledger included). Listings page with `after` (a sequence
for one organization's ledger, a global position across ledgers) and return
`next_after`, the value to pass as `after` for the next page, or null when the page
reached the end. The live stream is Server-Sent Events (see app/api/stream.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from app.api import schemas_out as out
from app.api.deps import PrincipalDep, RuntimeDep
from app.api.pagination import MAX_LIMIT
from app.api.problems import ApiProblem
from app.api.stream import StreamFilter, follow
from app.domain.errors import Forbidden, NotFound
from app.domain.organizations import Principal
from app.events.entries import LedgerEntry
from app.events.reader import read_org, read_positions
from app.events.verify import verify_org

router = APIRouter(prefix="/ledger", tags=["ledger"])

DEFAULT_LIMIT = 100


class LedgerEvent(BaseModel):
    """A ledger entry as recorded; `position` is null until the sequencer placed it."""

    id: str
    org: str
    sequence: int
    position: int | None
    time: str = Field(description="When it was recorded, ISO 8601 in UTC")
    actor: str
    asset_kind: str
    asset_key: str
    version: int
    event_type: str
    data: dict[str, Any]
    reason: str
    prev_hash: str = Field(description="Hex SHA-256 of the org's previous entry")
    hash: str = Field(description="Hex SHA-256 over this entry's canonical encoding + prev_hash")


class EventPage(BaseModel):
    items: list[LedgerEvent]
    next_after: int | None = Field(
        description="Pass as `after` to get the next page; null when there is no more yet"
    )


AfterQuery = Annotated[int, Query(ge=0, description="Return entries strictly after this")]
LimitQuery = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
OrgsQuery = Annotated[list[str] | None, Query(alias="org", description="Repeatable")]
KindsQuery = Annotated[list[str] | None, Query(alias="asset_kind", description="Repeatable")]
TypesQuery = Annotated[list[str] | None, Query(alias="event_type", description="Repeatable")]


def require_ledger_reader(actor: PrincipalDep, org: str) -> None:
    if not actor.can_read_ledger(org):
        raise Forbidden(f"only {org}, an auditor or the administrator may read {org}'s ledger")


def readable_orgs(actor: Principal, requested: list[str] | None) -> list[str] | None:
    """The org filter to apply for `actor`: None means every ledger."""
    if actor.kind in ("admin", "auditor"):
        return requested or None
    assert actor.org is not None
    for org in requested or []:
        require_ledger_reader(actor, org)
    return [actor.org]


def _page(entries: list[LedgerEntry], limit: int, cursor_of: str) -> EventPage:
    items = entries[:limit]
    more = len(entries) > limit
    next_after = getattr(items[-1], cursor_of) if more else None
    return EventPage(items=[LedgerEvent(**e.to_json()) for e in items], next_after=next_after)


@router.get("/events")
async def list_events(
    actor: PrincipalDep,
    runtime: RuntimeDep,
    after: AfterQuery = 0,
    limit: LimitQuery = DEFAULT_LIMIT,
    org: OrgsQuery = None,
    asset_kind: KindsQuery = None,
    event_type: TypesQuery = None,
) -> EventPage:
    """Entries of every ledger the caller may read, by global position (`after` = position).

    An organization's token sees its own ledger only. Filters are repeatable; entries not
    yet placed by the sequencer (a few milliseconds after commit) appear once placed.
    """
    orgs = readable_orgs(actor, org)
    async with runtime.pool.acquire() as conn:
        entries = await read_positions(
            conn, after, limit + 1, orgs=orgs,
            asset_kinds=asset_kind or None, event_types=event_type or None,
        )
    return _page(entries, limit, "position")


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "`id:` global position, `event:` event type, "
                                    "`data:` the entry as JSON"}},
)
async def stream_events(
    request: Request,
    actor: PrincipalDep,
    runtime: RuntimeDep,
    after: AfterQuery = 0,
    org: OrgsQuery = None,
    asset_kind: KindsQuery = None,
    event_type: TypesQuery = None,
    last_event_id: Annotated[
        str | None, Header(description="Resume after this position (wins over `after`)")
    ] = None,
) -> StreamingResponse:
    """Follow the ledgers the caller may read, live, as Server-Sent Events.

    Starts after `Last-Event-ID` (or `after`), so a reconnecting client gets exactly the
    entries it missed: no gap, no duplicate. A comment line is sent every 15 s of quiet.
    """
    start = after
    if last_event_id is not None and last_event_id.strip():
        try:
            start = int(last_event_id.strip())
        except ValueError:
            start = -1
        if start < 0:
            raise ApiProblem(400, "invalid_last_event_id",
                             "Last-Event-ID must be a ledger position (a non-negative integer)")
    selection = StreamFilter(
        orgs=readable_orgs(actor, org),
        asset_kinds=asset_kind or None,
        event_types=event_type or None,
    )
    return StreamingResponse(
        follow(runtime, start, selection, request.is_disconnected),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/{org}/events")
async def list_org_events(
    org: str,
    actor: PrincipalDep,
    runtime: RuntimeDep,
    after: AfterQuery = 0,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> EventPage:
    """One organization's entries with sequence > `after`, in sequence order."""
    require_ledger_reader(actor, org)
    async with runtime.pool.acquire() as conn:
        exists = await conn.fetchval("SELECT 1 FROM ledger_heads WHERE org = $1", org)
        if not exists:
            raise NotFound(f"no ledger for {org!r}")
        entries = await read_org(conn, org, after, limit + 1)
    return _page(entries, limit, "sequence")


@router.get("/{org}/verify", response_model=out.VerifyResult)
async def verify(org: str, actor: PrincipalDep, runtime: RuntimeDep) -> dict[str, object]:
    """Recompute the org's hash chain; names the first entry that does not fit."""
    require_ledger_reader(actor, org)
    async with runtime.pool.acquire() as conn:
        exists = await conn.fetchval("SELECT 1 FROM ledger_heads WHERE org = $1", org)
        if not exists:
            raise NotFound(f"no ledger for {org!r}")
        result = await verify_org(conn, org)
    return result.to_json()
