"""The examples of `consort example` run for real: a whole stack, a local runner per
organization on the subprocess backend (as `consort serve` on a machine without Docker),
and the same functions the commands call."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from consort.cli import examples
from consort.cli.examples import FL_ORGS, organizations, run_fl, run_oasis
from runner.contract import BackendOptions, choose_backend
from runner.local import LocalRunners
from tests.conftest import ADMIN_TOKEN, NATS_URL, service_missing
from tests.stack import Stack, running_stack


@pytest.fixture
async def stack(database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(database_url, tmp_path) as s:
        backend = choose_backend(BackendOptions(prefer="subprocess",
                                                cache_dir=s.home / "backend")).backend
        local = LocalRunners(s.runtime, s.url, NATS_URL, s.home, backend, every_s=0.2)
        local.start()
        try:
            yield s
        finally:
            await local.stop(drain_s=0)


async def test_federated_example_learns_over_five_rounds(stack: Stack) -> None:
    if importlib.util.find_spec("sklearn") is None:
        service_missing("scikit-learn (pip install -e '.[examples]')")
    home = stack.home / "user"
    result = await asyncio.to_thread(run_fl, stack.url, ADMIN_TOKEN, home, timeout=120)
    assert result.plan.status == "DONE"
    assert result.plan.task_count == 5 * 7
    assert sorted(result.accuracy) == [1, 2, 3, 4, 5]
    assert all(sorted(per_org) == list(FL_ORGS) for per_org in result.accuracy.values())
    assert all(value > 0.9 for value in result.accuracy[5].values()), result.accuracy
    # The samples are files under the data dir, split the same way on every run.
    assert sorted(p.name for p in (home / "examples/fl/data/org-2").iterdir()) == [
        "test.csv", "train-1.csv", "train-2.csv"]

    # A second run reuses the organizations' tokens and the assets: only a new plan.
    store = home / "examples" / "tokens.json"
    saved = json.loads(store.read_text())[stack.url]
    again = await asyncio.to_thread(organizations, stack.url, ADMIN_TOKEN, FL_ORGS, home)
    assert again == saved and sorted(saved) == list(FL_ORGS)
    # Tokens lost: the organizations exist, so the administrator issues new ones.
    store.unlink()
    fresh = await asyncio.to_thread(organizations, stack.url, ADMIN_TOKEN, FL_ORGS, home)
    assert sorted(fresh) == list(FL_ORGS) and set(fresh.values()).isdisjoint(saved.values())
    me = await stack.http.get("/me", headers={"Authorization": f"Bearer {fresh['org-2']}"})
    assert me.json()["org"] == "org-2"

async def test_oasis_example_turns_a_dataset_into_a_dataset_and_a_log(stack: Stack) -> None:
    home = stack.home / "user"
    result = await asyncio.to_thread(run_oasis, stack.url, ADMIN_TOKEN, home, timeout=60)
    assert result.plan.status == "DONE"
    assert result.files == {
        "federated.txt.upper": b"EACH ORGANIZATION KEEPS ITS DATA.\nONLY MODELS AND NUMBERS "
                               b"TRAVEL.\n",
        "ledger.txt.upper": b"THE LEDGER RECORDS WHO DID WHAT AND WHEN\n",
        "notes/algorithm.txt.upper": b"AN ALGORITHM READS INPUT AND WRITES OUTPUT\n",
        "word-counts.txt": b"federated.txt 10\nledger.txt 8\nnotes/algorithm.txt 7\n",
    }
    assert (result.output_dir / "notes" / "algorithm.txt.upper").is_file()
    assert "ledger.txt: 8 words" in result.log
    assert "converted 3 files" in result.log


async def test_a_failed_example_reports_the_failed_task_and_its_log(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(examples, "OASIS_SCRIPT", "echo no such corpus >&2; exit 3")
    with pytest.raises(examples.ExampleFailed) as failed:
        await asyncio.to_thread(run_oasis, stack.url, ADMIN_TOKEN, stack.home, timeout=60)
    message = str(failed.value)
    assert "ended FAILED" in message and "EXECUTION" in message
    assert "no such corpus" in message


def test_example_fl_help_through_the_entry_point() -> None:
    consort = Path(sys.executable).parent / "consort"
    done = subprocess.run([str(consort), "example", "fl", "--help"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "FedAvg" in done.stdout and "--admin-token" in done.stdout
