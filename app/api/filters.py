"""The metadata filter every asset list takes: `?metadata=key:value` (that exact value)
or `?metadata=key` (the key is present), repeated to require all of them."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

from fastapi import Depends, Query

from app.api.problems import ApiProblem


@dataclasses.dataclass(frozen=True)
class MetadataFilter:
    """As two SQL parameters: a JSON object the column must contain (`@>`) and keys it
    must have (`?&`); None for either means no condition."""

    contains: str | None = None
    keys: list[str] | None = None

    # The condition on a `metadata` jsonb column, with its two parameters at $n and $n+1.
    @staticmethod
    def sql(n: int) -> str:
        return (f"AND (${n}::jsonb IS NULL OR metadata @> ${n}::jsonb) "
                f"AND (${n + 1}::text[] IS NULL OR metadata ?& ${n + 1}::text[])")

    @property
    def args(self) -> tuple[str | None, list[str] | None]:
        return self.contains, self.keys


def parse_metadata(raw: list[str] | None) -> MetadataFilter:
    """`key:value` splits at the first colon: a key may not contain one, a value may."""
    if not raw:
        return MetadataFilter()
    equals: dict[str, str] = {}
    present: list[str] = []
    for item in raw:
        key, colon, value = item.partition(":")
        if not key:
            raise ApiProblem(400, "invalid_filter",
                             f"metadata filter {item!r}: give key:value or key")
        if colon:
            if equals.get(key, value) != value:
                raise ApiProblem(400, "invalid_filter",
                                 f"metadata filter asks {key!r} to be two values at once")
            equals[key] = value
        else:
            present.append(key)
    return MetadataFilter(json.dumps(equals) if equals else None, present or None)


async def _metadata(
    metadata: Annotated[list[str] | None, Query(
        description="`key:value` (exactly that value) or `key` (present); repeat to require "
                    "all", examples=["site:lyon"])] = None,
) -> MetadataFilter:
    return parse_metadata(metadata)


MetadataQuery = Annotated[MetadataFilter, Depends(_metadata)]
