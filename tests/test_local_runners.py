"""`consort serve` runs a runner for each organization (CONSORT_LOCAL_RUNNERS)."""

from __future__ import annotations

import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runner.contract import BackendOptions, choose_backend
from runner.local import LocalRunners, wanted_orgs
from tests.conftest import NATS_URL
from tests.stack import Stack, running_stack


@pytest.fixture
async def stack(database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(database_url, tmp_path) as s:
        yield s


def local_runners(stack: Stack, setting: str = "all") -> LocalRunners:
    backend = choose_backend(BackendOptions(prefer="subprocess",
                                            cache_dir=stack.home / "backend")).backend
    return LocalRunners(stack.runtime, stack.url, NATS_URL, stack.home, backend,
                        setting=setting, every_s=0.2)


def test_local_runner_setting_selects_organizations() -> None:
    orgs = ["org-a", "org-b", "org-c"]
    assert wanted_orgs("all", orgs) == orgs
    assert wanted_orgs("", orgs) == orgs
    assert wanted_orgs("none", orgs) == []
    assert wanted_orgs("org-c, org-a", orgs) == ["org-a", "org-c"]


async def test_a_new_organization_gets_a_local_runner_that_runs_its_tasks(stack: Stack) -> None:
    local = local_runners(stack)
    local.start()
    try:
        await stack.org("org-a")
        function = await stack.function("org-a", "f", ["sh", "-c", "echo 1 > output/model"],
                                        outputs={"model": {"kind": "MODEL"}}, image="host")
        key = str(uuid.uuid4())
        await stack.plan("org-a", [{"key": key, "function_key": function, "worker": "org-a"}])
        task = await stack.wait_status("org-a", key, "DONE", "FAILED", timeout=30)
        assert task["status"] == "DONE"
        assert list(local.runners) == ["org-a"]
        token_file = stack.home / "runners" / "org-a.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
    finally:
        await local.stop(drain_s=0)

    # A restart reuses the stored token instead of issuing a new one each time.
    again = local_runners(stack)
    await again.sync()
    try:
        assert again.runners["org-a"].config.token == token
    finally:
        await again.stop(drain_s=0)


async def test_no_local_runner_with_none(stack: Stack) -> None:
    local = local_runners(stack, "none")
    await stack.org("org-a")
    await local.sync()
    assert local.runners == {}
    await local.stop()
