"""The lease rule, pure: a silent runner's task is retried once, then FAILED (INTERNAL)."""

from __future__ import annotations

from app.domain.leases import MAX_ATTEMPTS, lease_expired
from app.domain.outputs import FailureReportRegistered
from app.domain.tasks import StoredTask, TaskStatus, TaskStatusChanged


def task(status: TaskStatus) -> StoredTask:
    return StoredTask(key="t", owner="org-a", worker="org-b", rank=0, status=status,
                      compute_plan_key="p", outputs={})


def test_first_expired_lease_puts_the_task_back_to_todo() -> None:
    [event] = lease_expired(task(TaskStatus.DOING), attempt=1, runner_id="r1")
    assert isinstance(event, TaskStatusChanged)
    assert (event.previous, event.status) == ("DOING", "TODO")


def test_last_attempt_expired_fails_the_task_internal_with_a_report() -> None:
    change, report = lease_expired(task(TaskStatus.DOING), attempt=MAX_ATTEMPTS, runner_id="r2")
    assert isinstance(change, TaskStatusChanged) and isinstance(report, FailureReportRegistered)
    assert change.status == "FAILED" and change.error_type == "INTERNAL"
    assert report.error_type == "INTERNAL" and "r2" in report.message


def test_released_lease_does_not_count_as_an_attempt() -> None:
    # A runner handing a task back on shutdown leaves attempt - 1 (possibly 0).
    [event] = lease_expired(task(TaskStatus.DOING), attempt=0, runner_id="r1")
    assert isinstance(event, TaskStatusChanged) and event.status == "TODO"


def test_expired_lease_of_a_task_no_longer_doing_changes_nothing() -> None:
    for status in (TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELED, TaskStatus.TODO):
        assert lease_expired(task(status), attempt=1, runner_id="r1") == []
