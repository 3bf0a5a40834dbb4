"""What every domain event has in common.

A domain event is a past-tense fact about one asset. Rules return events; they never
write them anywhere. `data()` is everything replay needs to rebuild the asset, in plain
JSON types, so the ledger can hash it canonically.

Events change shape over the years while the ledger is never rewritten, so each event
class has a `class_version` (the `eventsourcing` library's convention). A class at
version n > 1 records `class_version` in its data and defines `upcast_v1_v2`, ...,
`upcast_v{n-1}_v{n}`: static methods that turn a recorded older shape, in place, into
the next one. `upcast` applies them when an entry is read, so views and replay only ever
see the current shape.
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
    # The shape of `data()`; see the module docstring before changing a field.
    class_version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.class_version > 1:
            missing = [name for v in range(1, cls.class_version)
                       if not callable(getattr(cls, name := f"upcast_v{v}_v{v + 1}", None))]
            if missing:
                raise TypeError(f"{cls.__name__} is at version {cls.class_version} but has no "
                                f"{', '.join(missing)}: recorded entries could not be read")
            _VERSIONED[cls.__name__] = cls

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
        data = {name: getattr(self, name) for name in _field_names(type(self))}
        if self.class_version > 1:
            data["class_version"] = self.class_version
        return data


# Event classes past version 1, by event type: the only ones whose recorded data may
# need upcasting (every other entry is read exactly as recorded).
_VERSIONED: dict[str, type[DomainEvent]] = {}


def is_versioned(event_type: str) -> bool:
    return event_type in _VERSIONED


def upcast(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """Recorded `data` of an `event_type` event, in its class's current shape (in place)."""
    cls = _VERSIONED.get(event_type)
    if cls is None:
        return data
    version = data.pop("class_version", 1)
    if version > cls.class_version:
        raise ValueError(f"{event_type} entry at version {version} is newer than this code "
                         f"({cls.class_version}): upgrade before reading this ledger")
    while version < cls.class_version:
        getattr(cls, f"upcast_v{version}_v{version + 1}")(data)
        version += 1
    return data


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names
