"""What the API answers about assets, plans and tasks: the rows of the views, as documented
in the OpenAPI schema and returned by the Python client.

Fields the server adds later pass through (`extra="allow"`), so an older client keeps
working against a newer server; a test checks that every answer carries exactly the
documented fields, so the documentation cannot drift from the views.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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


class TaskKeys(Row):
    task_keys: list[str]


class Lease(Row):
    """A runner's hold on a task it runs; renewed before `expires_at`."""

    runner_id: str
    attempt: int
    expires_at: dt.datetime


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
    lease: Lease | None = Field(default=None, description=(
        "Only in the answer to a runner's start: the lease it now holds"))


class LeaseRenewed(Row):
    task_key: str
    status: str
    lease: Lease


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


class Performance(Row):
    key: str
    compute_task_key: str
    identifier: str
    value: float
    created_at: dt.datetime | None = None
    rank: int | None = None
    worker: str | None = None
    metadata: dict[str, str] | None = Field(default=None, description="The task's metadata")


class Performances(Row):
    items: list[Performance]


class FailureReport(Row):
    compute_task_key: str
    error_type: str
    message: str
    logs_checksum: str | None = None
    created_at: dt.datetime


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
