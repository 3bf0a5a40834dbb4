"""Pydantic models of the HTTP edge for assets, plans and tasks."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.domain.functions import InputKind, OutputKind
from app.domain.permissions import Permission, Permissions
from app.domain.tasks import TaskCategory

Metadata = dict[str, str]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PermissionIn(Strict):
    public: bool = False
    authorized_ids: list[str] = Field(default_factory=list)

    def domain(self) -> Permission:
        return Permission(self.public, tuple(self.authorized_ids))


class PermissionsIn(Strict):
    process: PermissionIn = Field(default_factory=PermissionIn)
    download: PermissionIn | None = Field(
        default=None, description="Defaults to the process permission"
    )

    def domain(self) -> Permissions:
        process = self.process.domain()
        return Permissions(process, self.download.domain() if self.download else process)


class TaskInputIn(Strict):
    identifier: str
    asset_key: str | None = None
    parent_task_key: str | None = None
    parent_output: str | None = None


class TaskOutputIn(Strict):
    permissions: PermissionsIn | None = None
    transient: bool = False


class TaskIn(Strict):
    key: uuid.UUID | None = Field(default=None, description="Client-chosen key (retry-safe)")
    function_key: str
    worker: str | None = None
    inputs: list[TaskInputIn] = Field(default_factory=list)
    outputs: dict[str, TaskOutputIn] = Field(default_factory=dict)
    category: TaskCategory | None = None
    logs_permission: PermissionIn | None = None
    metadata: Metadata = Field(default_factory=dict)


class ComputePlanIn(Strict):
    key: uuid.UUID | None = None
    name: str = Field(min_length=1, max_length=200)
    tag: str = Field(default="", max_length=100)
    metadata: Metadata = Field(default_factory=dict)
    tasks: list[TaskIn] = Field(default_factory=list, max_length=100_000)


class TaskBatchIn(Strict):
    tasks: list[TaskIn] = Field(min_length=1, max_length=100_000)


class TaskActionIn(Strict):
    action: Literal["start", "done", "fail", "cancel"]
    error_type: Literal["BUILD", "EXECUTION", "INTERNAL"] | None = None
    message: str = Field(default="", max_length=10_000)
    logs_checksum: str | None = None
    runner_id: str | None = Field(default=None, min_length=1, max_length=200, description=(
        "A runner starting the task takes a lease on it (renewed with POST "
        "/tasks/{key}/lease); done/fail with a runner_id are refused once it lost the lease"))
    lease_seconds: float = Field(default=30.0, ge=1, le=3600)


class LeaseIn(Strict):
    runner_id: str = Field(min_length=1, max_length=200)
    lease_seconds: float = Field(default=30.0, ge=1, le=3600)
    release: bool = Field(default=False, description=(
        "Give the task back now (runner shutting down): it returns to TODO for another "
        "runner without counting as an attempt"))


class PerformanceIn(Strict):
    value: float


class ModelOutputIn(Strict):
    checksum: str = Field(description="SHA-256 of a file uploaded with POST /files")


class InputSpecIn(Strict):
    kind: InputKind
    multiple: bool = False
    optional: bool = False


class OutputSpecIn(Strict):
    kind: OutputKind
    multiple: bool = False


def plan_json(row: Any) -> dict[str, Any]:
    from app.projections.compute import STATUS_COLUMNS

    d = dict(row)
    counts = {s.value: d.pop(c) for s, c in STATUS_COLUMNS.items()}
    d["task_count"] = sum(counts.values())
    d["status_counts"] = counts
    d.pop("position", None)
    d.pop("version", None)
    return d
