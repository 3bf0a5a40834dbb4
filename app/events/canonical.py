"""Canonical encoding of ledger entries and the hash chain over them.

The hash of an entry is SHA-256(previous hash || canonical JSON of the entry). Canonical
JSON: keys sorted, no insignificant white space, UTF-8, no NaN/Infinity. Anyone holding
the entries can recompute the chain with a few lines in any language.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

GENESIS_HASH = bytes(32)


# One encoder for the process: json.dumps with these options would build a new one per call.
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_text(value: Any) -> str:
    return _ENCODER.encode(value)


def canonical_json(value: Any) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


def chain_hash(prev_hash: bytes, hashed_fields: dict[str, Any]) -> bytes:
    return chain_hash_of(prev_hash, canonical_json(hashed_fields))


def chain_hash_of(prev_hash: bytes, canonical_entry: bytes) -> bytes:
    """The hash of an entry whose canonical JSON is already encoded."""
    return hashlib.sha256(prev_hash + canonical_entry).digest()
