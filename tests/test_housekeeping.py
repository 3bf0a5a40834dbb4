"""Runner housekeeping against the machine's Docker engine and a whole stack: what a
killed runner left is removed, what a live run uses is kept (runner/housekeeping.py).

The leftovers are made by hand, labelled as the Docker backend labels its containers, so
that a test needs no runner to be killed."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
from docker.models.containers import Container

from runner.backends.docker_backend import LABEL_ORG, LABEL_RUNNER, LABEL_TASK
from runner.contract import BackendOptions, choose_backend
from runner.images import engine_time
from runner.worker import Runner
from tests import images
from tests.stack import Stack, running_stack

docker_engine = images.docker_engine
busybox_image = images.busybox_image


@pytest.fixture
async def stack(database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(database_url, tmp_path) as s:
        yield s


@pytest.fixture
def made(docker_engine: docker.DockerClient) -> Iterator[list[Container]]:
    """Containers a test made, removed afterwards whatever the sweep did."""
    containers: list[Container] = []
    yield containers
    for container in containers:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


def leftover(client: docker.DockerClient, made: list[Container], task_key: str, org: str,
             image: str) -> Container:
    """A running container as a runner killed mid-task leaves it."""
    container = client.containers.run(
        image, ["sleep", "300"], detach=True, network_mode="none",
        labels={LABEL_TASK: task_key, LABEL_ORG: org, LABEL_RUNNER: "killed-runner"})
    made.append(container)
    return container


def exists(client: docker.DockerClient, container: Container) -> bool:
    try:
        client.containers.get(container.id)
    except docker.errors.NotFound:
        return False
    return True


async def task_of(stack: Stack, org: str, image: str, *, then: str | None = None,
                  script: str = "true") -> str:
    """A task of `org` run by `org`; `then`: "cancel" it, or "start" it as another runner."""
    function = await stack.function(org, "script", ["sh", "-c", script],
                                    outputs={"model": {"kind": "MODEL"}}, image=image)
    key = str(uuid.uuid4())
    await stack.plan(org, [{"key": key, "function_key": function, "worker": org}])
    if then == "cancel":
        r = await stack.post(org, f"/tasks/{key}/actions", json={"action": "cancel"})
        assert r.status_code == 200, r.text
    elif then == "start":
        await start_elsewhere(stack, org, key)
    return key


async def start_elsewhere(stack: Stack, org: str, key: str) -> None:
    r = await stack.post(org, f"/tasks/{key}/actions", json={
        "action": "start", "runner_id": "another-runner", "lease_seconds": 600})
    assert r.status_code == 200, r.text


async def docker_runner(stack: Stack, org: str, *, started: bool = False,
                        **config: object) -> Runner:
    """A runner of `org` with the Docker backend. Not started unless asked: a started one
    also takes the org's tasks from NATS, and a task it is handling (even one it will be
    refused) is "running here" for its sweep."""
    backend = choose_backend(BackendOptions(prefer="docker")).backend
    if started:
        return await stack.runner(org, backend, **config)
    runner = Runner(stack.runner_config(org, **config), backend)
    stack.runners.append(runner)  # stopped (its clients closed) with the stack
    return runner


async def aged(*containers: Container, seconds: float) -> None:
    """Wait until every container is older than `seconds` (the grace period)."""
    for container in containers:
        container.reload()
        created = engine_time(container.attrs["Created"])
        assert created is not None
        await asyncio.sleep(max(0.0, created + seconds - time.time()) + 0.05)


async def test_leftover_container_of_a_final_task_is_removed(
    stack: Stack, docker_engine: docker.DockerClient, busybox_image: str, made: list[Container]
) -> None:
    await stack.org("org-a")
    key = await task_of(stack, "org-a", busybox_image, then="cancel")
    container = leftover(docker_engine, made, key, "org-a", busybox_image)
    # The runner's periodic sweep finds it (its first one, at start, may find the task
    # still being handled: the runner was given it by NATS before the cancel).
    await docker_runner(stack, "org-a", started=True, leftover_grace_s=0.0, housekeeping_s=0.2)
    deadline = time.monotonic() + 15
    while await asyncio.to_thread(exists, docker_engine, container):
        assert time.monotonic() < deadline, "the leftover container is still there"
        await asyncio.sleep(0.1)


async def test_container_of_a_doing_task_is_kept(
    stack: Stack, docker_engine: docker.DockerClient, busybox_image: str, made: list[Container]
) -> None:
    await stack.org("org-a")
    # As a live runner does it: the container first, then the start recorded.
    key = await task_of(stack, "org-a", busybox_image)
    container = leftover(docker_engine, made, key, "org-a", busybox_image)
    await start_elsewhere(stack, "org-a", key)
    runner = await docker_runner(stack, "org-a", leftover_grace_s=1.0, housekeeping_s=0)
    await aged(container, seconds=1.0)
    swept = await runner.housekeeping.sweep()
    assert swept.containers == []
    assert exists(docker_engine, container)


async def test_container_of_a_task_started_again_since_is_removed(
    stack: Stack, docker_engine: docker.DockerClient, busybox_image: str, made: list[Container]
) -> None:
    # The killed runner's attempt left it; the task was retried, DOING again, elsewhere.
    await stack.org("org-a")
    key = await task_of(stack, "org-a", busybox_image)
    container = leftover(docker_engine, made, key, "org-a", busybox_image)
    await aged(container, seconds=1.0)
    await start_elsewhere(stack, "org-a", key)
    runner = await docker_runner(stack, "org-a", leftover_grace_s=1.0, housekeeping_s=0)
    swept = await runner.housekeeping.sweep()
    assert swept.containers == [container.id]
    assert not exists(docker_engine, container)


async def test_fresh_container_within_the_grace_period_is_kept(
    stack: Stack, docker_engine: docker.DockerClient, busybox_image: str, made: list[Container]
) -> None:
    await stack.org("org-a")
    key = await task_of(stack, "org-a", busybox_image, then="cancel")
    container = leftover(docker_engine, made, key, "org-a", busybox_image)
    runner = await docker_runner(stack, "org-a", leftover_grace_s=60.0, housekeeping_s=0)
    assert (await runner.housekeeping.sweep()).containers == []
    assert exists(docker_engine, container)
    # Only the grace period kept it.
    runner.housekeeping.grace_s = 0.0
    assert (await runner.housekeeping.sweep()).containers == [container.id]


async def test_another_orgs_container_is_kept(
    stack: Stack, docker_engine: docker.DockerClient, busybox_image: str, made: list[Container]
) -> None:
    await stack.org("org-a")
    await stack.org("org-b")
    theirs = await task_of(stack, "org-b", busybox_image, then="cancel")
    ours = await task_of(stack, "org-a", busybox_image, then="cancel")
    labelled_theirs = leftover(docker_engine, made, theirs, "org-b", busybox_image)
    # Labelled ours but the task is org-b's to run: not ours to judge either.
    mislabelled = leftover(docker_engine, made, theirs, "org-a", busybox_image)
    unknown = leftover(docker_engine, made, str(uuid.uuid4()), "org-a", busybox_image)
    abandoned = leftover(docker_engine, made, ours, "org-a", busybox_image)
    runner = await docker_runner(stack, "org-a", leftover_grace_s=0.0, housekeeping_s=0)
    swept = await runner.housekeeping.sweep()
    assert swept.containers == [abandoned.id]
    for kept in (labelled_theirs, mislabelled, unknown):
        assert exists(docker_engine, kept)


async def test_container_of_a_task_this_runner_runs_is_kept(
    stack: Stack, busybox_image: str
) -> None:
    await stack.org("org-a")
    key = await task_of(stack, "org-a", busybox_image,
                        script="echo started; sleep 2; echo 1 > output/model")
    # No grace at all, so only "this runner runs it" protects the container.
    runner = await docker_runner(stack, "org-a", started=True, leftover_grace_s=0.0,
                                 housekeeping_s=0)
    deadline = time.monotonic() + 30
    while "started" not in await stack.logs("org-a", key):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    swept = await runner.housekeeping.sweep()
    assert swept.containers == [] and swept.workdirs == []
    task = await stack.wait_status("org-a", key, "DONE", "FAILED")
    assert task["status"] == "DONE", await stack.logs("org-a", key)


async def test_leftover_working_dir_of_a_final_task_is_removed(
    stack: Stack, busybox_image: str
) -> None:
    await stack.org("org-a")
    final = await task_of(stack, "org-a", busybox_image, then="cancel")
    running = await task_of(stack, "org-a", busybox_image, then="start")
    runner = await docker_runner(stack, "org-a", leftover_grace_s=0.0, housekeeping_s=0)
    abandoned = runner.workdirs / f"{final}-0123abcd"
    kept = runner.workdirs / f"{running}-0123abcd"
    for workdir in (abandoned, kept):
        (workdir / "input" / "data").mkdir(parents=True)
        (workdir / "input" / "data" / "sample").write_text("1\n")
        # As the subprocess backend leaves input/ when its runner dies mid-task.
        (workdir / "input" / "data").chmod(0o555)
        (workdir / "input").chmod(0o555)
    swept = await runner.housekeeping.sweep()
    assert swept.workdirs == [abandoned]
    assert not abandoned.exists() and kept.is_dir()
