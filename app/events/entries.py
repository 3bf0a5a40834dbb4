"""The shapes that go into and come out of the ledger."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

from app.domain.events import is_versioned, upcast
from app.events.canonical import canonical_text, chain_hash


@dataclasses.dataclass(frozen=True)
class NewEvent:
    """An event about to be appended: what the caller decides."""

    asset_kind: str
    asset_key: str
    event_type: str
    data: dict[str, Any]
    reason: str = ""

    @property
    def aggregate(self) -> str:
        return f"{self.asset_kind}/{self.asset_key}"


@dataclasses.dataclass(frozen=True)
class AppendRequest:
    """One command's events, appended atomically to the acting organization's ledger.

    `expected_versions` maps an aggregate ("kind/key") to the version the command saw
    when it decided: 0 means "must not exist yet". An aggregate left out is not checked.
    """

    org: str
    actor: str
    events: list[NewEvent]
    expected_versions: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """An event as recorded: immutable, chained to the org's previous entry."""

    id: str
    org: str
    sequence: int
    recorded_at: dt.datetime
    actor: str
    asset_kind: str
    asset_key: str
    version: int
    event_type: str
    data_json: str
    reason: str
    prev_hash: bytes
    hash: bytes
    # Global replay order; None until the sequencer has placed the entry.
    position: int | None = None

    @property
    def data(self) -> dict[str, Any]:
        """The event's data in its class's current shape (older entries upcast)."""
        return upcast(self.event_type, self.recorded_data())

    @property
    def current_json(self) -> str:
        """`data` as JSON: the recorded text itself unless the entry needs upcasting."""
        if not is_versioned(self.event_type):
            return self.data_json
        return json.dumps(self.data, separators=(",", ":"))

    def recorded_data(self) -> dict[str, Any]:
        """The data exactly as recorded and hashed, whatever its version."""
        value: dict[str, Any] = json.loads(self.data_json)
        return value

    def hashed_fields(self) -> dict[str, Any]:
        return hashed_fields(
            id=self.id,
            org=self.org,
            sequence=self.sequence,
            recorded_at=self.recorded_at,
            actor=self.actor,
            asset_kind=self.asset_kind,
            asset_key=self.asset_key,
            version=self.version,
            event_type=self.event_type,
            data=self.recorded_data(),
            reason=self.reason,
        )

    def computed_hash(self) -> bytes:
        return chain_hash(self.prev_hash, self.hashed_fields())

    def to_json(self) -> dict[str, Any]:
        """The entry as recorded, for auditors: they recompute its hash from these fields,
        so the data is never upcast here."""
        return {
            "id": self.id,
            "org": self.org,
            "sequence": self.sequence,
            "position": self.position,
            "time": format_time(self.recorded_at),
            "actor": self.actor,
            "asset_kind": self.asset_kind,
            "asset_key": self.asset_key,
            "version": self.version,
            "event_type": self.event_type,
            "data": self.recorded_data(),
            "reason": self.reason,
            "prev_hash": self.prev_hash.hex(),
            "hash": self.hash.hex(),
        }


def format_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def hashed_fields(
    *,
    id: str,
    org: str,
    sequence: int,
    recorded_at: dt.datetime,
    actor: str,
    asset_kind: str,
    asset_key: str,
    version: int,
    event_type: str,
    data: dict[str, Any],
    reason: str,
) -> dict[str, Any]:
    """Every field of an entry that the chain protects (all but position and the hashes)."""
    return {
        "id": id,
        "org": org,
        "sequence": sequence,
        "time": format_time(recorded_at),
        "actor": actor,
        "asset_kind": asset_kind,
        "asset_key": asset_key,
        "version": version,
        "event_type": event_type,
        "data": data,
        "reason": reason,
    }


def encode_data(data: dict[str, Any]) -> str:
    return canonical_text(data)


def canonical_entry(
    *,
    id: str,
    org: str,
    sequence: int,
    time: str,
    actor: str,
    asset_kind: str,
    asset_key: str,
    version: int,
    event_type: str,
    data_json: str,
    reason: str,
) -> bytes:
    """`canonical_json(hashed_fields(...))`, byte for byte, without encoding the data again.

    The appender already holds the data's canonical JSON (it is what the ledger stores)
    and the batch's formatted time: splicing them in halves the cost of hashing an entry.
    Keys are written in sorted order; strings go through the same encoder.
    """
    s = canonical_text
    return (
        f'{{"actor":{s(actor)},"asset_key":{s(asset_key)},"asset_kind":{s(asset_kind)},'
        f'"data":{data_json},"event_type":{s(event_type)},"id":{s(id)},"org":{s(org)},'
        f'"reason":{s(reason)},"sequence":{int(sequence)},"time":{s(time)},'
        f'"version":{int(version)}}}'
    ).encode()
