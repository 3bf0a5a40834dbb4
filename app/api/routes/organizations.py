"""Organizations and API tokens."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from app.api.deps import PrincipalDep, RuntimeDep
from app.api.pagination import MAX_LIMIT, Page, decode_cursor, encode_cursor
from app.api.problems import ApiProblem
from app.api.schemas import (
    IssuedToken,
    Me,
    Organization,
    OrganizationCreated,
    OrganizationIn,
    TokenIn,
    TokenInfo,
)
from app.domain import organizations as rules
from app.domain.errors import NotFound
from app.events.entries import LedgerEntry
from app.runtime import Runtime, hash_token, new_token

router = APIRouter(tags=["organizations"])

_TOKEN_COLUMNS = "id, org, role, name, issued_at, issued_by, revoked_at"


async def _organization(runtime: Runtime, org_id: str) -> Organization | None:
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT id, name, model_export_enabled, created_at FROM organizations WHERE id = $1",
            org_id,
        )
    return Organization(**dict(row)) if row else None


async def _token(runtime: Runtime, token_id: str) -> TokenInfo | None:
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens WHERE id = $1",
                                  token_id)
    return TokenInfo(**dict(row)) if row else None


def _issued(entry: LedgerEntry) -> TokenInfo:
    """The view's row for a token just issued, read off its ledger entry: the same fields
    the organizations projection stores, without a query back."""
    data = entry.data
    return TokenInfo(
        id=data["token_id"], org=data["org"], role=data["role"], name=data["name"],
        issued_at=entry.recorded_at, issued_by=entry.actor, revoked_at=None,
    )


@router.post("/organizations", status_code=status.HTTP_201_CREATED)
async def register_organization(
    body: OrganizationIn, actor: PrincipalDep, runtime: RuntimeDep
) -> OrganizationCreated:
    """Register an organization (administrator only); returns its first API token."""
    actor.require_admin()
    token, token_id = new_token(), str(uuid.uuid4())
    exists = await _organization(runtime, body.id) is not None
    events = rules.register_organization(
        actor, body.id, body.name, body.model_export_enabled, exists, token_id, hash_token(token)
    )
    entries = await runtime.record(
        actor, rules.ledger_of(actor, body.id), events,
        expected_versions={f"organization/{body.id}": 0},
    )
    [issued] = [e for e in entries if e.event_type == "TokenIssued"]
    org = await _organization(runtime, body.id)
    assert org is not None
    token_out = IssuedToken(token=token, info=_issued(issued))
    return OrganizationCreated(organization=org, token=token_out)


@router.get("/organizations")
async def list_organizations(
    _: PrincipalDep,
    runtime: RuntimeDep,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> Page[Organization]:
    after = decode_cursor(cursor, 1)
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, name, model_export_enabled, created_at FROM organizations "
            "WHERE $1::text IS NULL OR id > $1 ORDER BY id LIMIT $2",
            after[0] if after else None, limit + 1,
        )
    items = [Organization(**dict(r)) for r in rows[:limit]]
    next_cursor = encode_cursor([items[-1].id]) if len(rows) > limit else None
    return Page[Organization](items=items, next_cursor=next_cursor)


@router.get("/organizations/{org_id}")
async def get_organization(org_id: str, _: PrincipalDep, runtime: RuntimeDep) -> Organization:
    org = await _organization(runtime, org_id)
    if org is None:
        raise NotFound(f"no organization {org_id!r}")
    return org


@router.post("/tokens", status_code=status.HTTP_201_CREATED, tags=["tokens"])
async def issue_token(body: TokenIn, actor: PrincipalDep, runtime: RuntimeDep) -> IssuedToken:
    """Issue a token: the administrator for anyone, an organization for itself."""
    org = body.org if body.role == "org" else None
    if body.role == "org" and org is None and actor.kind == "org":
        org = actor.org
    org_exists = org is not None and await _organization(runtime, org) is not None
    token, token_id = new_token(), str(uuid.uuid4())
    event = rules.issue_token(
        actor, body.role, org if body.role == "org" else body.org, org_exists, body.name,
        token_id, hash_token(token),
    )
    [entry] = await runtime.record(actor, rules.ledger_of(actor, event.org), [event])
    return IssuedToken(token=token, info=_issued(entry))


@router.get("/tokens", tags=["tokens"])
async def list_tokens(
    actor: PrincipalDep,
    runtime: RuntimeDep,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> Page[TokenInfo]:
    """Tokens' metadata: all of them for the administrator, an org's own otherwise."""
    actor.require_writer()
    after = decode_cursor(cursor, 2)
    only_org = None if actor.kind == "admin" else actor.org
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT {_TOKEN_COLUMNS} FROM api_tokens "
            "WHERE ($1::text IS NULL OR org = $1) "
            "AND ($2::timestamptz IS NULL OR (issued_at, id) > ($2, $3)) "
            "ORDER BY issued_at, id LIMIT $4",
            only_org,
            None if after is None else _parse_time(after[0]),
            None if after is None else after[1],
            limit + 1,
        )
    items = [TokenInfo(**dict(r)) for r in rows[:limit]]
    next_cursor = (
        encode_cursor([items[-1].issued_at.isoformat(), items[-1].id])
        if len(rows) > limit else None
    )
    return Page[TokenInfo](items=items, next_cursor=next_cursor)


@router.delete("/tokens/{token_id}", tags=["tokens"])
async def revoke_token(token_id: str, actor: PrincipalDep, runtime: RuntimeDep) -> TokenInfo:
    info = await _token(runtime, token_id)
    if info is None or (actor.kind == "org" and info.org != actor.org):
        raise NotFound(f"no token {token_id!r}")
    event = rules.revoke_token(actor, token_id, info.org, info.revoked_at is not None)
    await runtime.record(
        actor, rules.ledger_of(actor, info.org), [event],
        expected_versions={f"token/{token_id}": 1},
    )
    revoked = await _token(runtime, token_id)
    assert revoked is not None
    return revoked


@router.get("/me", tags=["tokens"])
async def me(actor: PrincipalDep) -> Me:
    """Who the presented token acts as."""
    return Me(kind=actor.kind, org=actor.org, token_id=actor.token_id)


def _parse_time(value: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ApiProblem(
            400, "invalid_cursor", "the pagination cursor is not one we issued"
        ) from None
