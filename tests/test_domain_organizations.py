"""Rules about organizations and tokens (pure)."""

from __future__ import annotations

import pytest

from app.domain.errors import Conflict, Forbidden, InvalidCommand
from app.domain.organizations import (
    SYSTEM_LEDGER,
    OrganizationRegistered,
    Principal,
    TokenIssued,
    issue_token,
    ledger_of,
    register_organization,
    revoke_token,
)

ADMIN = Principal(kind="admin")
ORG_A = Principal(kind="org", org="org-a", token_id="t1")
AUDITOR = Principal(kind="auditor", token_id="t2")


def test_registering_an_org_records_the_org_and_its_first_token() -> None:
    events = register_organization(ADMIN, "org-a", "A", True, False, "tok", "digest")
    assert isinstance(events[0], OrganizationRegistered)
    assert isinstance(events[1], TokenIssued) and events[1].org == "org-a"


@pytest.mark.parametrize("bad", ["", "Org", "a_b", "-a", "a-", "x" * 41, "admin"])
def test_org_id_must_be_a_slug_and_not_reserved(bad: str) -> None:
    with pytest.raises(InvalidCommand):
        register_organization(ADMIN, bad, "A", False, False, "tok", "digest")


def test_only_the_admin_registers_orgs() -> None:
    with pytest.raises(Forbidden):
        register_organization(ORG_A, "org-b", "B", False, False, "tok", "digest")


def test_registering_an_existing_org_conflicts() -> None:
    with pytest.raises(Conflict):
        register_organization(ADMIN, "org-a", "A", False, True, "tok", "digest")


def test_an_org_issues_tokens_only_for_itself() -> None:
    assert issue_token(ORG_A, "org", "org-a", True, "ci", "t", "d").org == "org-a"
    with pytest.raises(Forbidden):
        issue_token(ORG_A, "org", "org-b", True, "ci", "t", "d")
    with pytest.raises(Forbidden):
        issue_token(ORG_A, "auditor", None, False, "x", "t", "d")


def test_auditors_change_nothing() -> None:
    with pytest.raises(Forbidden):
        issue_token(AUDITOR, "org", "org-a", True, "x", "t", "d")
    with pytest.raises(Forbidden):
        revoke_token(AUDITOR, "t", "org-a", False)


def test_revoking_twice_conflicts_and_others_tokens_are_forbidden() -> None:
    with pytest.raises(Conflict):
        revoke_token(ADMIN, "t", "org-a", True)
    with pytest.raises(Forbidden):
        revoke_token(ORG_A, "t", "org-b", False)


def test_acts_go_on_the_acting_orgs_ledger_admin_acts_on_the_concerned_one() -> None:
    assert ledger_of(ORG_A, "org-b") == "org-a"
    assert ledger_of(ADMIN, "org-b") == "org-b"
    assert ledger_of(ADMIN, None) == SYSTEM_LEDGER
