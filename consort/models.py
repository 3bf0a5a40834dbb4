"""What the client returns: the API's own pydantic schemas where the server declares them,
and models of the asset rows it returns as plain JSON.

Request bodies are validated on the client with the server's input schemas (re-exported
here), so a malformed registration fails before it is sent. The response models accept
fields they do not know, so a newer server does not break an older client.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.api.routes.assets import DataManagerIn, DataSampleIn, FunctionIn
from app.api.routes.datasets import DatasetFileIn, DatasetIn, DatasetOutputIn
from app.api.routes.ledger import EventPage, LedgerEvent
from app.api.schemas import IssuedToken, Me, Organization, OrganizationCreated, TokenInfo
from app.api.schemas_assets import (
    ComputePlanIn,
    InputSpecIn,
    OutputSpecIn,
    PermissionIn,
    PermissionsIn,
    TaskIn,
    TaskInputIn,
    TaskOutputIn,
)

__all__ = [
    "ComputePlan", "ComputePlanIn", "DataManager", "DataManagerIn", "DataSample",
    "DataSampleIn", "Dataset", "DatasetFileIn", "DatasetIn", "DatasetOutputIn", "EventPage",
    "FileRef", "Function", "FunctionIn", "InputSpecIn", "IssuedToken", "LedgerEvent",
    "LogBytes", "Me", "Model", "Organization", "OrganizationCreated", "OutputSpecIn", "Page",
    "PermissionIn",
    "PermissionsIn", "Performance", "PlanGraph", "PlanRegistered", "Task", "TaskIn",
    "TaskInputIn", "TaskOutputIn", "TokenInfo", "VerifyResult", "FINAL_TASK_STATUSES",
    "FINAL_PLAN_STATUSES",
]

FINAL_TASK_STATUSES = frozenset({"DONE", "FAILED", "CANCELED"})
# A FAILED plan can no longer finish (children of a failed task never run).
FINAL_PLAN_STATUSES = frozenset({"DONE", "FAILED", "CANCELED"})


class Row(BaseModel):
    """A row of a view as the API returns it; unknown fields are kept."""

    model_config = ConfigDict(extra="allow")


class Asset(Row):
    key: str
    owner: str
    created_at: dt.datetime
    metadata: dict[str, str] = Field(default_factory=dict)


class FileRef(Row):
    """An uploaded file, by its SHA-256."""

    checksum: str
    size: int


class DataManager(Asset):
    name: str
    description: str = ""
    opener_checksum: str
    permissions: dict[str, Any]
    logs_permission: dict[str, Any]


class DataSample(Asset):
    data_manager_keys: list[str]
    checksum: str
    location: str


class Function(Asset):
    name: str
    description: str = ""
    permissions: dict[str, Any]
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    image_source: str
    image: str
    command: list[str] = Field(default_factory=list)
    entrypoint: list[str] | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    gpu: bool = False


class Dataset(Asset):
    name: str
    files: list[dict[str, Any]]
    total_size: int
    permissions: dict[str, Any]
    compute_task_key: str | None = None
    identifier: str | None = None


class ComputePlan(Asset):
    name: str
    tag: str = ""
    status: str
    task_count: int
    status_counts: dict[str, int]
    start_date: dt.datetime | None = None
    end_date: dt.datetime | None = None
    cancelation_date: dt.datetime | None = None
    failure_date: dt.datetime | None = None


class PlanRegistered(Row):
    plan: ComputePlan
    task_keys: list[str]


class Task(Asset):
    compute_plan_key: str
    function_key: str
    worker: str
    rank: int
    status: str
    category: str
    inputs: list[dict[str, Any]]
    outputs: dict[str, Any]
    parent_task_keys: list[str] = Field(default_factory=list)
    logs_permission: dict[str, Any]
    start_date: dt.datetime | None = None
    end_date: dt.datetime | None = None
    error_type: str | None = None


class Model(Row):
    key: str
    compute_task_key: str
    identifier: str
    owner: str
    permissions: dict[str, Any]
    checksum: str
    size: int
    transient: bool
    disabled: bool
    created_at: dt.datetime


class LogBytes(BaseModel):
    """Bytes of a task's log from `offset` on, as the task wrote them (they may start or
    end inside a multibyte UTF-8 character), and the log's whole size when read."""

    offset: int
    data: bytes
    size: int

    @property
    def next_offset(self) -> int:
        """Where the next read starts to get what comes after these bytes."""
        return self.offset + len(self.data)


class Performance(Row):
    key: str
    compute_task_key: str
    identifier: str
    value: float
    created_at: dt.datetime | None = None
    rank: int | None = None
    worker: str | None = None


class GraphNode(Row):
    key: str
    rank: int
    status: str
    worker: str
    category: str
    function_key: str


class GraphEdge(Row):
    source: str
    target: str
    output: str
    input: str


class PlanGraph(Row):
    nodes: list[GraphNode]
    edges: list[GraphEdge]


class VerifyResult(Row):
    org: str
    ok: bool
    entries_checked: int
    head_hash: str | None
    first_bad_sequence: int | None = None
    first_bad_entry_id: str | None = None
    problem: str | None = None


class Page(Row):
    """One page of a cursor-paginated listing (items still raw JSON)."""

    items: list[dict[str, Any]]
    next_cursor: str | None = None
