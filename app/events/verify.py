"""Recompute an organization's hash chain and name the first entry that does not fit."""

from __future__ import annotations

import dataclasses

import asyncpg

from app.events.canonical import GENESIS_HASH
from app.events.reader import read_org


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    org: str
    ok: bool
    entries_checked: int
    head_hash: str | None
    first_bad_sequence: int | None = None
    first_bad_entry_id: str | None = None
    problem: str | None = None

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


async def verify_org(conn: asyncpg.Connection, org: str, page: int = 5000) -> VerifyResult:
    expected_prev = GENESIS_HASH
    expected_sequence = 1
    checked = 0
    after = 0
    while True:
        entries = await read_org(conn, org, after, page)
        if not entries:
            break
        for entry in entries:
            problem = None
            if entry.sequence != expected_sequence:
                problem = f"sequence gap: expected {expected_sequence}, found {entry.sequence}"
            elif entry.prev_hash != expected_prev:
                problem = "prev_hash does not match the previous entry's hash"
            elif entry.computed_hash() != entry.hash:
                problem = "hash does not match the entry's contents"
            if problem is not None:
                return VerifyResult(
                    org=org, ok=False, entries_checked=checked,
                    head_hash=expected_prev.hex() if checked else None,
                    first_bad_sequence=entry.sequence, first_bad_entry_id=entry.id,
                    problem=problem,
                )
            checked += 1
            expected_prev = entry.hash
            expected_sequence += 1
        after = entries[-1].sequence
    head = await conn.fetchrow(
        "SELECT last_sequence, last_hash FROM ledger_heads WHERE org = $1", org
    )
    if head is not None and (
        head["last_sequence"] != checked or (checked and bytes(head["last_hash"]) != expected_prev)
    ):
        return VerifyResult(
            org=org, ok=False, entries_checked=checked, head_hash=expected_prev.hex(),
            first_bad_sequence=checked + 1, problem="entries missing after the last one read "
            f"(head says {head['last_sequence']})",
        )
    return VerifyResult(
        org=org, ok=True, entries_checked=checked,
        head_hash=expected_prev.hex() if checked else None,
    )
