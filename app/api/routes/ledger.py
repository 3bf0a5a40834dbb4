"""The audit side of the ledger: verification of an organization's chain."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import PrincipalDep, RuntimeDep
from app.domain.errors import Forbidden, NotFound
from app.events.verify import verify_org

router = APIRouter(prefix="/ledger", tags=["ledger"])


def require_ledger_reader(actor: PrincipalDep, org: str) -> None:
    if not actor.can_read_ledger(org):
        raise Forbidden(f"only {org}, an auditor or the administrator may read {org}'s ledger")


@router.get("/{org}/verify")
async def verify(org: str, actor: PrincipalDep, runtime: RuntimeDep) -> dict[str, object]:
    """Recompute the org's hash chain; names the first entry that does not fit."""
    require_ledger_reader(actor, org)
    async with runtime.pool.acquire() as conn:
        exists = await conn.fetchval("SELECT 1 FROM ledger_heads WHERE org = $1", org)
        if not exists:
            raise NotFound(f"no ledger for {org!r}")
        result = await verify_org(conn, org)
    return result.to_json()
