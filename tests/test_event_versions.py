"""Event versions: old ledger entries are read in the current shape, never rewritten."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import httpx
import pytest

from app.domain.events import DomainEvent, upcast
from app.events.entries import AppendRequest, NewEvent
from app.events.reader import read_org
from app.events.verify import verify_org
from app.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class ProbeLabelled(DomainEvent):
    """A test event at version 3: v1 had `name`, v2 renamed it `label`, v3 added `tags`."""

    asset_kind: ClassVar[str] = "probe"
    class_version: ClassVar[int] = 3

    key: str
    label: str
    tags: list[str]

    @staticmethod
    def upcast_v1_v2(data: dict[str, Any]) -> None:
        data["label"] = data.pop("name")

    @staticmethod
    def upcast_v2_v3(data: dict[str, Any]) -> None:
        data["tags"] = []


def _v1_event(key: str) -> NewEvent:
    """An entry as code at version 1 recorded it: no class_version, the old field name."""
    return NewEvent(asset_kind="probe", asset_key=key, event_type="ProbeLabelled",
                    data={"key": key, "name": "first"})


def test_an_entry_of_an_older_version_is_upcast_step_by_step() -> None:
    assert upcast("ProbeLabelled", {"key": "p", "name": "n"}) == {
        "key": "p", "label": "n", "tags": []}
    assert upcast("ProbeLabelled", {"key": "p", "label": "n", "class_version": 2}) == {
        "key": "p", "label": "n", "tags": []}


def test_a_new_event_records_its_class_version_and_reads_back_unchanged() -> None:
    data = ProbeLabelled(key="p", label="n", tags=["x"]).data()
    assert data["class_version"] == 3
    assert upcast("ProbeLabelled", dict(data)) == {"key": "p", "label": "n", "tags": ["x"]}


def test_an_event_at_version_1_records_no_version_and_is_read_as_recorded() -> None:
    data = {"key": "t", "anything": 1}
    assert upcast("TaskRegistered", data) is data


def test_an_entry_newer_than_the_code_is_refused() -> None:
    with pytest.raises(ValueError, match="newer than this code"):
        upcast("ProbeLabelled", {"key": "p", "label": "n", "tags": [], "class_version": 4})


def test_a_version_without_its_upcaster_is_refused_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError, match="upcast_v1_v2"):
        @dataclasses.dataclass(frozen=True)
        class Forgetful(DomainEvent):
            asset_kind: ClassVar[str] = "probe"
            class_version: ClassVar[int] = 2
            key: str


async def test_old_entries_read_in_the_current_shape_while_the_chain_keeps_what_was_hashed(
    runtime: Runtime, client: httpx.AsyncClient,
) -> None:
    await runtime.appender.append(AppendRequest("org-a", "org-a", [_v1_event("p1")]))
    async with runtime.pool.acquire() as conn:
        [entry] = await read_org(conn, "org-a", 0, 10)
        assert entry.data == {"key": "p1", "label": "first", "tags": []}
        assert entry.recorded_data() == {"key": "p1", "name": "first"}
        # Views fed with JSON (PostgreSQL parses a plan's tasks itself) get the same shape.
        assert json.loads(entry.current_json) == entry.data
        assert (await verify_org(conn, "org-a")).ok
    # Auditors get the entry as recorded, so they can recompute its hash themselves.
    listed = await client.get("/ledger/org-a/events", params={"after": 0})
    assert listed.json()["items"][0]["data"] == {"key": "p1", "name": "first"}


async def test_an_unversioned_entry_is_handed_to_views_as_the_recorded_text(
    runtime: Runtime,
) -> None:
    note = NewEvent(asset_kind="note", asset_key="n", event_type="NoteWritten", data={"n": 1})
    await runtime.appender.append(AppendRequest("org-a", "org-a", [note]))
    async with runtime.pool.acquire() as conn:
        [entry] = await read_org(conn, "org-a", 0, 10)
    assert entry.current_json is entry.data_json
