"""/metrics exposes commands, ledger, lag, tasks, queue depth and container durations."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runner.contract import BackendOptions, choose_backend
from tests.stack import Stack, running_stack


@pytest.fixture
async def stack(database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(database_url, tmp_path) as s:
        yield s


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text exposition."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.partition(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_after_a_plan_runs(stack: Stack) -> None:
    before = (await stack.http.get("/metrics")).text
    await stack.org("org-a")
    function = await stack.function("org-a", "f", ["sh", "-c", "echo 1 > output/model"],
                                    outputs={"model": {"kind": "MODEL"}}, image="host")
    keys = [str(uuid.uuid4()) for _ in range(3)]
    await stack.plan("org-a", [{"key": k, "function_key": function, "worker": "org-a"}
                               for k in keys])
    r = await stack.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert sample(r.text, "consort_tasks", status="TODO") == 3
    assert sample(r.text, "consort_runner_queue_depth", worker="org-a") == 3

    backend = choose_backend(BackendOptions(prefer="subprocess",
                                            cache_dir=stack.home / "b")).backend
    await stack.runner("org-a", backend)
    for key in keys:
        await stack.wait_status("org-a", key, "DONE")
    text = (await stack.http.get("/metrics")).text
    assert sample(text, "consort_tasks", status="DONE") == 3
    assert sample(text, "consort_runner_queue_depth", worker="org-a") == 0
    assert sample(text, "consort_ledger_entries", org="org-a") > 0
    assert sample(text, "consort_projection_lag_entries", projection="compute") == 0
    started = sample(text, "consort_commands_total", method="POST",
                     route="/tasks/{key}/actions", outcome="accepted") - sample(
        before, "consort_commands_total", method="POST", route="/tasks/{key}/actions",
        outcome="accepted")
    assert started == 6  # start and done of each task
    ran = sample(text, "consort_container_duration_seconds_count", backend="subprocess",
                 outcome="ok") - sample(before, "consort_container_duration_seconds_count",
                                        backend="subprocess", outcome="ok")
    assert ran == 3
