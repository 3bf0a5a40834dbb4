"""Compute plans: a group of tasks, its derived status, and cancellation."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import ClassVar

from app.domain.errors import Forbidden, InvalidCommand
from app.domain.events import DomainEvent
from app.domain.tasks import StoredTask, TaskStatus, TaskStatusChanged


class PlanStatus(enum.StrEnum):
    EMPTY = "EMPTY"
    CREATED = "CREATED"
    DOING = "DOING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


@dataclasses.dataclass(frozen=True)
class ComputePlanRegistered(DomainEvent):
    asset_kind: ClassVar[str] = "compute_plan"

    key: str
    owner: str
    name: str
    tag: str
    metadata: dict[str, str]


@dataclasses.dataclass(frozen=True)
class ComputePlanCanceled(DomainEvent):
    asset_kind: ClassVar[str] = "compute_plan"

    key: str


def plan_status(counts: Mapping[TaskStatus, int], canceled: bool) -> PlanStatus:
    """CANCELED if cancelled; EMPTY without tasks; FAILED if any failed; DONE if all done;
    CREATED while no task has started; DOING otherwise."""
    if canceled:
        return PlanStatus.CANCELED
    total = sum(counts.values())
    if total == 0:
        return PlanStatus.EMPTY
    if counts.get(TaskStatus.FAILED, 0):
        return PlanStatus.FAILED
    if counts.get(TaskStatus.DONE, 0) == total:
        return PlanStatus.DONE
    started = sum(counts.get(s, 0) for s in (TaskStatus.DOING, TaskStatus.DONE))
    if started == 0 and counts.get(TaskStatus.CANCELED, 0) == 0:
        return PlanStatus.CREATED
    return PlanStatus.DOING


def cancel_plan(
    plan_key: str, plan_owner: str, sender: str, canceled: bool, tasks: Iterable[StoredTask]
) -> list[DomainEvent]:
    """The owner cancels a plan: the plan, then every task not yet final, is CANCELED."""
    if sender != plan_owner:
        raise Forbidden(f"only {plan_owner} may cancel plan {plan_key}", code="wrong_sender")
    if canceled:
        raise InvalidCommand(f"plan {plan_key} is already canceled", code="plan_canceled")
    events: list[DomainEvent] = [ComputePlanCanceled(key=plan_key)]
    for task in tasks:
        if not task.status.final:
            events.append(TaskStatusChanged(
                key=task.key, compute_plan_key=plan_key, previous=task.status.value,
                status=TaskStatus.CANCELED.value,
            ))
    return events
