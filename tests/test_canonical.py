"""Canonical encoding and the hash chain (pure unit tests)."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest

from app.events.canonical import GENESIS_HASH, canonical_json, chain_hash
from app.events.entries import (
    LedgerEntry,
    canonical_entry,
    encode_data,
    format_time,
    hashed_fields,
)


def test_canonical_json_sorts_keys_and_has_no_whitespace() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": "é"}]}) == (
        '{"a":[1,{"c":"é","d":2}],"b":1}'.encode()
    )


def test_canonical_json_is_independent_of_insertion_order() -> None:
    assert canonical_json({"x": 1, "y": 2}) == canonical_json({"y": 2, "x": 1})


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"v": float("nan")})


def test_chain_hash_is_sha256_of_prev_hash_and_canonical_entry() -> None:
    fields = {"a": 1}
    assert chain_hash(GENESIS_HASH, fields) == hashlib.sha256(bytes(32) + b'{"a":1}').digest()


def _entry(prev: bytes, sequence: int, data: dict[str, object]) -> LedgerEntry:
    when = dt.datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=dt.UTC)
    fields = hashed_fields(
        id=f"00000000-0000-0000-0000-{sequence:012d}", org="org-a", sequence=sequence,
        recorded_at=when, actor="org-a", asset_kind="token", asset_key="k", version=sequence,
        event_type="TokenIssued", data=data, reason="",
    )
    return LedgerEntry(
        id=fields["id"], org="org-a", sequence=sequence, recorded_at=when, actor="org-a",
        asset_kind="token", asset_key="k", version=sequence, event_type="TokenIssued",
        data_json=encode_data(data), reason="", prev_hash=prev, hash=chain_hash(prev, fields),
    )


def test_each_entry_hash_covers_the_previous_hash() -> None:
    first = _entry(GENESIS_HASH, 1, {"n": 1})
    second = _entry(first.hash, 2, {"n": 2})
    assert second.computed_hash() == second.hash
    forged = _entry(bytes(32), 2, {"n": 2})
    assert forged.hash != second.hash


def test_changing_any_protected_field_changes_the_hash() -> None:
    entry = _entry(GENESIS_HASH, 1, {"n": 1})
    tampered = LedgerEntry(**{**entry.__dict__, "data_json": encode_data({"n": 2})})
    assert tampered.computed_hash() != entry.hash
    tampered = LedgerEntry(**{**entry.__dict__, "actor": "org-b"})
    assert tampered.computed_hash() != entry.hash


@pytest.mark.parametrize("data", [{}, {"n": 1}, {"é": "\u2028\"\\\n", "b": [1.5, None, True]}])
def test_canonical_entry_is_canonical_json_of_the_hashed_fields(data: dict[str, object]) -> None:
    when = dt.datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=dt.UTC)
    fields = dict(id="00000000-0000-0000-0000-000000000001", org="org-é", sequence=7,
                  actor='a"\\b', asset_kind="token", asset_key="k\x01", version=3,
                  event_type="TokenIssued", reason="why\t")
    expected = canonical_json(hashed_fields(recorded_at=when, data=data, **fields))  # type: ignore[arg-type]
    assert canonical_entry(time=format_time(when), data_json=encode_data(data),
                           **fields) == expected  # type: ignore[arg-type]
