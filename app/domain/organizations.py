"""Organizations and their API tokens: who may act, and as whom.

An organization is identified by a short slug. Tokens are credentials for one
organization (role "org") or for an auditor (role "auditor", reads every ledger and
changes nothing). Only a token's SHA-256 digest is ever recorded.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Literal

from app.domain.errors import Conflict, Forbidden, InvalidCommand
from app.domain.events import DomainEvent

ORG_ID_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
# Ledger that records acts of the deployment's administrator that concern no single
# organization (auditor tokens). Not a valid organization id, so it cannot clash.
SYSTEM_LEDGER = "_system"
RESERVED_ORG_IDS = frozenset({"admin", "system", "consort", "public"})

Role = Literal["org", "auditor"]


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is acting: the administrator, an organization, an auditor, or the system itself
    (e.g. the lease sweeper failing a task whose runner died; it never holds a token)."""

    kind: Literal["admin", "org", "auditor", "system"]
    org: str | None = None
    token_id: str | None = None

    @property
    def actor(self) -> str:
        """The name recorded on the ledger entries this principal causes."""
        if self.kind == "org":
            assert self.org is not None
            return self.org
        return self.kind

    def can_read_ledger(self, org: str) -> bool:
        return self.kind in ("admin", "auditor") or self.org == org

    def require_writer(self) -> None:
        if self.kind == "auditor":
            raise Forbidden("auditor tokens may read, never change anything", code="read_only")

    def require_admin(self) -> None:
        if self.kind != "admin":
            raise Forbidden("this action needs the administrator token", code="admin_only")


@dataclasses.dataclass(frozen=True)
class OrganizationRegistered(DomainEvent):
    asset_kind: ClassVar[str] = "organization"
    key_field: ClassVar[str] = "org_id"

    org_id: str
    name: str
    model_export_enabled: bool


@dataclasses.dataclass(frozen=True)
class TokenIssued(DomainEvent):
    asset_kind: ClassVar[str] = "token"
    key_field: ClassVar[str] = "token_id"

    token_id: str
    org: str | None
    role: Role
    name: str
    token_sha256: str


@dataclasses.dataclass(frozen=True)
class TokenRevoked(DomainEvent):
    asset_kind: ClassVar[str] = "token"
    key_field: ClassVar[str] = "token_id"

    token_id: str


def validate_org_id(org_id: str) -> None:
    if not ORG_ID_PATTERN.fullmatch(org_id):
        raise InvalidCommand(
            f"organization id {org_id!r} must be a slug: 1-40 lowercase letters, digits or "
            "hyphens, starting and ending with a letter or digit",
            code="invalid_org_id",
        )
    if org_id in RESERVED_ORG_IDS:
        raise InvalidCommand(f"organization id {org_id!r} is reserved", code="reserved_org_id")


def register_organization(
    actor: Principal,
    org_id: str,
    name: str,
    model_export_enabled: bool,
    exists: bool,
    first_token_id: str,
    first_token_sha256: str,
) -> list[DomainEvent]:
    """Admin registers a new organization together with its first token."""
    actor.require_admin()
    validate_org_id(org_id)
    if not name.strip():
        raise InvalidCommand("organization name must not be empty", code="invalid_name")
    if exists:
        raise Conflict(f"organization {org_id!r} already exists", code="already_exists", key=org_id)
    return [
        OrganizationRegistered(org_id=org_id, name=name, model_export_enabled=model_export_enabled),
        TokenIssued(
            token_id=first_token_id,
            org=org_id,
            role="org",
            name="initial",
            token_sha256=first_token_sha256,
        ),
    ]


def issue_token(
    actor: Principal,
    role: Role,
    org: str | None,
    org_exists: bool,
    name: str,
    token_id: str,
    token_sha256: str,
) -> TokenIssued:
    """Admin issues any token; an organization may issue more tokens for itself; the
    system issues the tokens of the runners `consort serve` runs for organizations."""
    actor.require_writer()
    if role == "auditor":
        actor.require_admin()
        if org is not None:
            raise InvalidCommand(
                "an auditor token belongs to no organization", code="invalid_token"
            )
    else:
        if org is None:
            raise InvalidCommand("an organization token needs an org", code="invalid_token")
        if actor.kind not in ("admin", "system") and actor.org != org:
            raise Forbidden("an organization may issue tokens only for itself")
        if not org_exists:
            raise InvalidCommand(f"unknown organization {org!r}", code="unknown_org")
    return TokenIssued(
        token_id=token_id, org=org, role=role, name=name, token_sha256=token_sha256
    )


def revoke_token(
    actor: Principal, token_id: str, token_org: str | None, already_revoked: bool
) -> TokenRevoked:
    actor.require_writer()
    if actor.kind != "admin" and (token_org is None or actor.org != token_org):
        raise Forbidden("an organization may revoke only its own tokens")
    if already_revoked:
        raise Conflict(f"token {token_id} is already revoked", code="already_revoked", key=token_id)
    return TokenRevoked(token_id=token_id)


def ledger_of(actor: Principal, concerned_org: str | None) -> str:
    """Which organization's ledger records an act of `actor`.

    An organization's own acts go on its ledger. The administrator's acts go on the ledger
    of the organization they concern, or on the system ledger when they concern none.
    """
    if actor.kind == "org":
        assert actor.org is not None
        return actor.org
    return concerned_org if concerned_org is not None else SYSTEM_LEDGER
