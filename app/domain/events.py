"""What every domain event has in common.

A domain event is a past-tense fact about one asset. Rules return events; they never
write them anywhere. `data()` is everything replay needs to rebuild the asset, in plain
JSON types, so the ledger can hash it canonically.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class DomainEvent:
    """Base of all events: subclasses are frozen dataclasses of JSON-friendly fields."""

    asset_kind: ClassVar[str]
    # The key field of the asset the event is about (e.g. "key", "org_id").
    key_field: ClassVar[str] = "key"

    @classmethod
    def event_type(cls) -> str:
        return cls.__name__

    @property
    def asset_key(self) -> str:
        return str(getattr(self, self.key_field))

    def data(self) -> dict[str, Any]:
        """The fields as a dict. Fields are JSON values by contract (no nested dataclass),
        so this is `dataclasses.asdict` without its deep copy, which cost a 10,000-task
        plan about a second: nested lists and dicts are the event's own, read only."""
        return {name: getattr(self, name) for name in _field_names(type(self))}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names
