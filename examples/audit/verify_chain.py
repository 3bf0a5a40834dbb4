"""Verify an organization's ledger the way an outside auditor would: from the audit API's
JSON alone, with nothing of Consort's code (only httpx and the standard library).

    python examples/audit/verify_chain.py --url http://127.0.0.1:8000 --token $TOKEN org-a

Each entry's hash is SHA-256(previous entry's hash || canonical JSON of the entry without
its position and hashes), where canonical JSON means sorted keys, no white space, UTF-8.
The first entry's previous hash is 32 zero bytes. Exit status 0: every entry fits; 1: the
first one that does not is named.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx

NOT_HASHED = ("position", "prev_hash", "hash")


def entries(api: httpx.Client, org: str, page: int = 1000) -> Iterator[dict[str, Any]]:
    """Every entry of `org`'s ledger, in sequence order (the audit API, page by page)."""
    after = 0
    while True:
        response = api.get(f"/ledger/{org}/events", params={"after": after, "limit": page})
        response.raise_for_status()
        body = response.json()
        yield from body["items"]
        if body["next_after"] is None:
            return
        after = body["next_after"]


def entry_hash(prev_hash: bytes, entry: dict[str, Any]) -> bytes:
    protected = {k: v for k, v in entry.items() if k not in NOT_HASHED}
    canonical = json.dumps(protected, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False, allow_nan=False).encode("utf-8")
    return hashlib.sha256(prev_hash + canonical).digest()


def verify(api: httpx.Client, org: str) -> tuple[int, str | None]:
    """(entries checked, None) when the chain holds, else (checked, what is wrong)."""
    prev = bytes(32)
    checked = 0
    for entry in entries(api, org):
        where = f"entry {entry['id']} (sequence {entry['sequence']})"
        if entry["sequence"] != checked + 1:
            return checked, f"{where}: expected sequence {checked + 1}"
        if bytes.fromhex(entry["prev_hash"]) != prev:
            return checked, f"{where}: prev_hash is not the previous entry's hash"
        computed = entry_hash(prev, entry)
        if computed.hex() != entry["hash"]:
            return checked, f"{where}: its contents do not give its hash"
        prev = computed
        checked += 1
    return checked, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("org")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--token", required=True, help="an auditor's or the org's token")
    args = parser.parse_args(argv)
    with httpx.Client(base_url=args.url, timeout=30,
                      headers={"Authorization": f"Bearer {args.token}"}) as api:
        checked, problem = verify(api, args.org)
    if problem is not None:
        print(f"{args.org}: BROKEN after {checked} good entries: {problem}")
        return 1
    print(f"{args.org}: {checked} entries, chain intact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
