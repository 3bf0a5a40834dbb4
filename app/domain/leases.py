"""Leases: a runner holds a DOING task only while it keeps renewing its lease.

A runner that dies mid-task stops renewing. Once its lease has expired the task must not
stay DOING for ever: it goes back to TODO for another runner of the worker organization
(a retry), or, when its attempts are used up, it is FAILED with an INTERNAL error (the
failure is ours, not the function's).
"""

from __future__ import annotations

from app.domain.events import DomainEvent
from app.domain.outputs import FailureReportRegistered
from app.domain.tasks import ErrorType, StoredTask, TaskStatus, TaskStatusChanged

# One run, plus one retry on another runner.
MAX_ATTEMPTS = 2


def lease_expired(
    task: StoredTask, attempt: int, runner_id: str, max_attempts: int = MAX_ATTEMPTS
) -> list[DomainEvent]:
    """What happens to `task` when the lease of its `attempt`-th run (1-based) expired.

    Nothing if the task is no longer DOING (it ended, or was canceled, meanwhile).
    """
    if task.status is not TaskStatus.DOING:
        return []
    if attempt < max_attempts:
        return [TaskStatusChanged(key=task.key, compute_plan_key=task.compute_plan_key,
                                  previous=TaskStatus.DOING.value, status=TaskStatus.TODO.value)]
    message = (f"runner {runner_id} stopped renewing its lease (attempt {attempt} of "
               f"{max_attempts}); the task was not retried again")
    return [
        TaskStatusChanged(key=task.key, compute_plan_key=task.compute_plan_key,
                          previous=TaskStatus.DOING.value, status=TaskStatus.FAILED.value,
                          error_type=ErrorType.INTERNAL.value),
        FailureReportRegistered(key=task.key, error_type=ErrorType.INTERNAL.value,
                                logs_checksum=None, message=message),
    ]
