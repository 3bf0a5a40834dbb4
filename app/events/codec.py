"""Turning domain events into ledger events (the domain knows nothing of the ledger)."""

from __future__ import annotations

from collections.abc import Sequence

from app.domain.events import DomainEvent
from app.events.entries import NewEvent


def to_new_event(event: DomainEvent, reason: str = "") -> NewEvent:
    return NewEvent(
        asset_kind=event.asset_kind,
        asset_key=event.asset_key,
        event_type=event.event_type(),
        data=event.data(),
        reason=reason,
    )


def to_new_events(events: Sequence[DomainEvent], reason: str = "") -> list[NewEvent]:
    return [to_new_event(e, reason) for e in events]


def aggregate_of(event: DomainEvent) -> str:
    return f"{event.asset_kind}/{event.asset_key}"
