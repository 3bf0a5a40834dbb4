"""What a task produces: models, performances, output datasets, failure reports."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from app.domain.errors import InvalidCommand
from app.domain.events import DomainEvent


@dataclasses.dataclass(frozen=True)
class ModelRegistered(DomainEvent):
    asset_kind: ClassVar[str] = "model"

    key: str
    compute_task_key: str
    identifier: str
    owner: str
    permissions: dict[str, Any]
    checksum: str
    size: int
    transient: bool


@dataclasses.dataclass(frozen=True)
class ModelDisabled(DomainEvent):
    """A transient model whose consumers are all final: its file is deleted."""

    asset_kind: ClassVar[str] = "model"

    key: str
    compute_task_key: str
    identifier: str


@dataclasses.dataclass(frozen=True)
class PerformanceRegistered(DomainEvent):
    asset_kind: ClassVar[str] = "performance"

    key: str
    compute_task_key: str
    compute_plan_key: str
    identifier: str
    value: float


@dataclasses.dataclass(frozen=True)
class FailureReportRegistered(DomainEvent):
    asset_kind: ClassVar[str] = "failure_report"

    key: str  # the failed task's key
    error_type: str
    logs_checksum: str | None
    message: str


def check_performance_value(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidCommand("a performance is one finite number", code="invalid_performance")
    return float(value)
