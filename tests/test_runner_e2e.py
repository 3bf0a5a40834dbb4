"""Runners end to end: plans registered over HTTP run in real containers (Docker engine)
or child processes, driven over NATS JetStream, and report back through the API."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import nats
import pytest

from consort.errors import ServerError
from runner.contract import Backend, BackendOptions, choose_backend
from tests.images import busybox_image, docker_engine  # noqa: F401  (fixtures)
from tests.stack import Stack, running_stack

__all__ = ["busybox_image", "docker_engine"]

DATA = {"opener": {"kind": "DATA_MANAGER"},
        "datasamples": {"kind": "DATA_SAMPLE", "multiple": True}}
ABC = {"process": {"public": False, "authorized_ids": ["org-a", "org-b", "org-c"]}}
AB = {"process": {"public": False, "authorized_ids": ["org-a", "org-b"]}}
ORGS_AB = ["org-a", "org-b"]


def new_backend(kind: str, home: Path) -> Backend:
    return choose_backend(BackendOptions(prefer=kind, cache_dir=home / "backend")).backend


@pytest.fixture
async def stack(database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(database_url, tmp_path) as s:
        yield s


@pytest.fixture(params=["docker", "subprocess"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        request.getfixturevalue("busybox_image")
    return str(request.param)


def image_for(kind: str) -> str:
    # Both run `sh`: the busybox test image in Docker, the host's shell in a subprocess.
    return "consort-test/busybox:1" if kind == "docker" else "host"


async def simple_task(stack: Stack, kind: str, script: str, image: str | None = None) -> str:
    """One task of org-a with no input and one model output, running `script`."""
    function = await stack.function("org-a", "script", ["sh", "-c", script],
                                    outputs={"model": {"kind": "MODEL"}},
                                    image=image or image_for(kind))
    key = str(uuid.uuid4())
    await stack.plan("org-a", [{"key": key, "function_key": function, "worker": "org-a"}])
    return key


async def test_substra_scenario_two_trainers_an_aggregator_and_two_tests(
    stack: Stack, backend_kind: str
) -> None:
    for org in ("org-a", "org-b", "org-c"):
        await stack.org(org)
    dm_a, samples_a = await stack.data("org-a", {"a1": b"1 2 3\n", "a2": b"4 5\n"}, ORGS_AB)
    dm_b, samples_b = await stack.data("org-b", {"b1": b"6 7 8 9\n"}, ORGS_AB)
    image = image_for(backend_kind)
    composite = await stack.function(
        "org-a", "composite train", ["sh", "-c",
                                     "cat input/datasamples/* > output/local && "
                                     "wc -c < output/local > output/shared && echo trained"],
        inputs=DATA, outputs={"local": {"kind": "MODEL"}, "shared": {"kind": "MODEL"}},
        image=image)
    aggregate = await stack.function(
        "org-a", "aggregate", ["sh", "-c", "cat input/models/* > output/model"],
        inputs={"models": {"kind": "MODEL", "multiple": True}},
        outputs={"model": {"kind": "MODEL"}}, image=image)
    test = await stack.function(
        "org-a", "test", ["sh", "-c", "cat input/model/* | wc -l > output/accuracy"],
        inputs=DATA | {"model": {"kind": "MODEL"}},
        outputs={"accuracy": {"kind": "PERFORMANCE"}}, image=image)
    k = {name: str(uuid.uuid4()) for name in ("ta", "tb", "agg", "ea", "eb")}

    def data_inputs(dm: str, samples: list[str]) -> list[dict[str, Any]]:
        return [{"identifier": "opener", "asset_key": dm}] + [
            {"identifier": "datasamples", "asset_key": s} for s in samples]

    plan = await stack.plan("org-a", [
        {"key": k["ta"], "function_key": composite, "category": "COMPOSITE",
         "inputs": data_inputs(dm_a, samples_a), "outputs": {"shared": {"permissions": ABC}}},
        {"key": k["tb"], "function_key": composite, "category": "COMPOSITE",
         "inputs": data_inputs(dm_b, samples_b), "outputs": {"shared": {"permissions": ABC}}},
        {"key": k["agg"], "function_key": aggregate, "worker": "org-c",
         "inputs": [{"identifier": "models", "parent_task_key": k[t], "parent_output": "shared"}
                    for t in ("ta", "tb")], "outputs": {"model": {"permissions": AB}}},
        {"key": k["ea"], "function_key": test, "inputs": data_inputs(dm_a, samples_a) + [
            {"identifier": "model", "parent_task_key": k["agg"], "parent_output": "model"}]},
        {"key": k["eb"], "function_key": test, "inputs": data_inputs(dm_b, samples_b) + [
            {"identifier": "model", "parent_task_key": k["agg"], "parent_output": "model"}]},
    ])
    for org in ("org-a", "org-b", "org-c"):
        await stack.runner(org, new_backend(backend_kind, stack.home / org))

    for name in k:
        task = await stack.wait_status("org-a", k[name], "DONE", "FAILED", timeout=90)
        assert task["status"] == "DONE", (name, await stack.logs("org-a", k[name]))
    assert (await stack.get("org-a", f"/compute_plans/{plan}")).json()["status"] == "DONE"

    # Performances are public: the aggregator's org reads both. The aggregated model holds
    # two lines (one per trainer's shared model: a byte count each).
    perfs = (await stack.get("org-c", f"/compute_plans/{plan}/performances")).json()["items"]
    assert sorted((p["compute_task_key"], p["value"]) for p in perfs) == sorted(
        [(k["ea"], 2.0), (k["eb"], 2.0)])
    assert "trained" in await stack.logs("org-a", k["ta"])
    # The composite head ("local") stays with its worker: org-b may not fetch org-a's.
    models = (await stack.get("org-a", "/models", params={"compute_task_key": k["ta"]})).json()
    local = next(m for m in models["items"] if m["identifier"] == "local")
    r = await stack.get("org-b", f"/models/{local['key']}/file")
    assert r.status_code == 403, r.text
    r = await stack.get("org-a", f"/models/{local['key']}/file")
    assert r.status_code == 200 and sorted(r.content.splitlines()) == [b"1 2 3", b"4 5"]


async def test_oasis_scenario_image_tarball_dataset_in_dataset_out(
    stack: Stack, docker_engine: docker.DockerClient, busybox_image: str
) -> None:
    await stack.org("org-a")
    tarball = b"".join(docker_engine.images.get(busybox_image).save(named=True))
    image = await stack.upload("org-a", tarball)
    files = {"notes/a.txt": b"hello world\n", "b.txt": b"consort\n"}
    described = [{"path": p, "checksum": await stack.upload("org-a", c)} for p, c in files.items()]
    r = await stack.post("org-a", "/datasets", json={"name": "texts", "files": described})
    assert r.status_code == 201, r.text
    dataset = r.json()["key"]
    # OASIS: an Algorithm = image + entrypoint + command + environment; its dataset is at
    # input/, its output dataset collected from output/.
    algorithm = await stack.function(
        "org-a", "upper", ["for f in $(find input -type f); do "
                           "tr a-z A-Z < $f > output/$(basename $f).$SUFFIX; done; "
                           "echo converted $(ls output | wc -l) files"],
        entrypoint=["sh", "-c"], environment={"SUFFIX": "up"},
        inputs={"texts": {"kind": "DATASET"}}, outputs={"result": {"kind": "DATASET"}},
        image_source="IMAGE_TARBALL", image=image)
    key = str(uuid.uuid4())
    await stack.plan("org-a", [{"key": key, "function_key": algorithm, "worker": "org-a",
                                "inputs": [{"identifier": "texts", "asset_key": dataset}]}])
    await stack.runner("org-a", new_backend("docker", stack.home))
    task = await stack.wait_status("org-a", key, "DONE", "FAILED", timeout=90)
    logs = await stack.logs("org-a", key)
    assert task["status"] == "DONE", logs
    assert "converted 2 files" in logs
    out = (await stack.get("org-a", "/datasets", params={"compute_task_key": key})).json()
    [produced] = out["items"]
    contents = {}
    for f in produced["files"]:
        r = await stack.get("org-a", f"/datasets/{produced['key']}/files/{f['path']}")
        contents[f["path"]] = r.content
    assert contents == {"a.txt.up": b"HELLO WORLD\n", "b.txt.up": b"CONSORT\n"}


@pytest.mark.parametrize("script, expected_log", [
    ("echo oops >&2; exit 1", "oops"),
    ("/no/such/command", "no/such/command"),
])
async def test_failing_function_is_failed_with_its_log_kept(
    stack: Stack, backend_kind: str, script: str, expected_log: str
) -> None:
    await stack.org("org-a")
    key = await simple_task(stack, backend_kind, script)
    await stack.runner("org-a", new_backend(backend_kind, stack.home))
    task = await stack.wait_status("org-a", key, "FAILED", "DONE")
    assert task["status"] == "FAILED" and task["error_type"] == "EXECUTION"
    assert expected_log in await stack.logs("org-a", key)
    async with stack.runtime.pool.acquire() as conn:
        report = await conn.fetchrow("SELECT * FROM failure_reports WHERE key = $1", key)
    assert report["error_type"] == "EXECUTION" and report["logs_checksum"]
    assert await stack.runtime.artifacts.exists(report["logs_checksum"])


async def test_missing_output_fails_the_task(stack: Stack) -> None:
    await stack.org("org-a")
    key = await simple_task(stack, "subprocess", "echo forgot to write the model")
    await stack.runner("org-a", new_backend("subprocess", stack.home))
    task = await stack.wait_status("org-a", key, "FAILED", "DONE")
    assert task["status"] == "FAILED" and task["error_type"] == "EXECUTION"
    assert "did not write the file output/model" in await stack.logs("org-a", key)


async def test_unbuildable_image_fails_with_build_error(
    stack: Stack, busybox_image: str
) -> None:
    await stack.org("org-a")
    key = await simple_task(stack, "docker", "true", image="consort-test/absent:0")
    await stack.runner("org-a", new_backend("docker", stack.home))
    task = await stack.wait_status("org-a", key, "FAILED", "DONE")
    assert task["status"] == "FAILED" and task["error_type"] == "BUILD"


async def test_timeout_fails_the_task(stack: Stack, backend_kind: str) -> None:
    await stack.org("org-a")
    key = await simple_task(stack, backend_kind, "sleep 30")
    runner = await stack.runner("org-a", new_backend(backend_kind, stack.home),
                                task_timeout_s=1.0)
    task = await stack.wait_status("org-a", key, "FAILED", "DONE", timeout=30)
    assert task["status"] == "FAILED" and task["error_type"] == "EXECUTION"
    assert runner.results[key].timed_out
    assert "timed out" in await stack.logs("org-a", key)


async def test_cancel_during_the_run_stops_it_within_5_s(stack: Stack, backend_kind: str) -> None:
    await stack.org("org-a")
    key = await simple_task(stack, backend_kind, "echo started; sleep 60")
    runner = await stack.runner("org-a", new_backend(backend_kind, stack.home))
    deadline = time.monotonic() + 30
    while "started" not in await stack.logs("org-a", key):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    r = await stack.post("org-a", f"/tasks/{key}/actions", json={"action": "cancel"})
    assert r.status_code == 200, r.text
    canceled_at = time.monotonic()
    while key not in runner.results:
        assert time.monotonic() - canceled_at < 5, "the run was not stopped within 5 s"
        await asyncio.sleep(0.05)
    assert runner.results[key].canceled
    assert (await stack.task("org-a", key))["status"] == "CANCELED"


async def test_a_failing_lease_renewal_does_not_stop_the_run(stack: Stack) -> None:
    await stack.org("org-a")
    key = await simple_task(stack, "subprocess", "echo started; sleep 2; echo x > output/model")
    runner = await stack.runner("org-a", new_backend("subprocess", stack.home))
    renew = runner.api.renew
    refused = 0

    async def unavailable_twice(*args: Any, **kwargs: Any) -> str:
        nonlocal refused
        if refused < 2:  # the API answers 503 for a moment (database restarting)
            refused += 1
            raise ServerError("database_unavailable", status=503, code="database_unavailable")
        return await renew(*args, **kwargs)

    runner.api.renew = unavailable_twice  # type: ignore[method-assign]
    task = await stack.wait_status("org-a", key, "DONE", "FAILED", "CANCELED", timeout=30)
    assert task["status"] == "DONE" and refused == 2
    assert not runner.results[key].canceled


async def test_runner_killed_mid_task_is_retried_on_another_runner(stack: Stack) -> None:
    await stack.org("org-a")
    key = await simple_task(stack, "subprocess",
                            "echo started; sleep 2; echo done > output/model")
    config = stack.runner_config("org-a")
    killed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "runner", "--org", "org-a", "--api-url", stack.url,
        "--token", stack.tokens["org-a"], "--nats-url", config.nats_url,
        "--backend", "subprocess", "--lease-seconds", "2",
        "--tasks-stream", config.dispatch.stream,
        "--tasks-subject-prefix", config.dispatch.subject_prefix,
        env=os.environ | {"CONSORT_HOME": str(stack.home / "killed")},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "started" not in await stack.logs("org-a", key):
            assert time.monotonic() < deadline and killed.returncode is None
            await asyncio.sleep(0.1)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the runner and the task it ran
        await killed.wait()
    assert (await stack.task("org-a", key))["status"] == "DOING"

    await stack.runner("org-a", new_backend("subprocess", stack.home))
    task = await stack.wait_status("org-a", key, "DONE", "FAILED", timeout=60)
    assert task["status"] == "DONE"
    lease = await stack.runtime.leases.holder(key)
    assert lease is not None and lease.attempt == 2
    async with stack.runtime.pool.acquire() as conn:
        moves = await conn.fetch(
            "SELECT actor, data FROM ledger WHERE asset_key = $1 "
            "AND event_type = 'TaskStatusChanged' ORDER BY sequence", key)
    assert [(m["actor"], '"status":"TODO"' in m["data"]) for m in moves].count(
        ("system", True)) == 1


async def test_redelivered_message_never_starts_a_running_task_twice(stack: Stack) -> None:
    await stack.org("org-a")
    key = await simple_task(stack, "subprocess", "sleep 1; echo x > output/model")
    runners = [await stack.runner("org-a", new_backend("subprocess", stack.home / str(i)))
               for i in range(2)]
    # Publish the task again, as a redelivery or a second API replica would.
    nc = await nats.connect(stack.runners[0].config.nats_url)
    config = stack.runtime.dispatch_config
    await nc.jetstream().publish(config.worker_subject("org-a"),
                                 f'{{"task_key": "{key}"}}'.encode(), stream=config.stream)
    await nc.close()
    await stack.wait_status("org-a", key, "DONE", timeout=30)
    await asyncio.sleep(0.5)
    assert sum(key in r.results for r in runners) == 1


async def test_stopping_runner_hands_its_running_task_back_to_another(stack: Stack) -> None:
    await stack.org("org-a")
    key = await simple_task(stack, "subprocess",
                            "echo started; sleep 3; echo done > output/model")
    leaving = await stack.runner("org-a", new_backend("subprocess", stack.home / "leaving"))
    deadline = time.monotonic() + 30
    while "started" not in await stack.logs("org-a", key):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    await leaving.stop(drain_s=0)  # no time to finish: stopped and handed back
    stack.runners.remove(leaving)
    assert leaving.results[key].canceled
    back = await stack.wait_status("org-a", key, "TODO", "DONE", timeout=10)
    assert back["status"] == "TODO"

    await stack.runner("org-a", new_backend("subprocess", stack.home / "staying"))
    assert (await stack.wait_status("org-a", key, "DONE", "FAILED"))["status"] == "DONE"
    lease = await stack.runtime.leases.holder(key)
    assert lease is not None and lease.attempt == 1  # handing back is not a failed attempt


async def test_stopping_runner_lets_a_short_task_finish(stack: Stack) -> None:
    await stack.org("org-a")
    key = await simple_task(stack, "subprocess", "echo started; sleep 1; echo 1 > output/model")
    runner = await stack.runner("org-a", new_backend("subprocess", stack.home))
    deadline = time.monotonic() + 30
    while "started" not in await stack.logs("org-a", key):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    await runner.stop(drain_s=10)
    stack.runners.remove(runner)
    assert (await stack.task("org-a", key))["status"] == "DONE"


def dockerfile_archive(dockerfile: str) -> bytes:
    data = dockerfile.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def dockerfile_task(stack: Stack, dockerfile: str, script: str) -> tuple[str, str]:
    """(task key, function key) of one org-a task whose function is a Dockerfile archive."""
    archive = await stack.upload("org-a", dockerfile_archive(dockerfile))
    function = await stack.function("org-a", "built", ["sh", "-c", script],
                                    outputs={"model": {"kind": "MODEL"}},
                                    image_source="DOCKERFILE_ARCHIVE", image=archive)
    key = str(uuid.uuid4())
    await stack.plan("org-a", [{"key": key, "function_key": function, "worker": "org-a"}])
    return key, function


@pytest.fixture
def function_images(docker_engine: docker.DockerClient) -> Iterator[list[str]]:
    """Function keys whose consort-fn/ images are removed after the test."""
    keys: list[str] = []
    yield keys
    for image in docker_engine.images.list():
        for tag in image.tags:
            if any(tag.startswith(f"consort-fn/{key}:") for key in keys):
                with contextlib.suppress(docker.errors.ImageNotFound):
                    docker_engine.images.remove(tag, force=True)


async def test_failing_dockerfile_has_its_build_output_in_the_task_log(
    stack: Stack, busybox_image: str, function_images: list[str]
) -> None:
    await stack.org("org-a")
    key, function = await dockerfile_task(
        stack, f"FROM {busybox_image}\nRUN echo compiling the model && exit 3\n", "true")
    function_images.append(function)
    await stack.runner("org-a", new_backend("docker", stack.home))
    task = await stack.wait_status("org-a", key, "FAILED", "DONE")
    assert task["status"] == "FAILED" and task["error_type"] == "BUILD"
    lines = (await stack.logs("org-a", key)).splitlines()
    assert "[build] compiling the model" in lines, lines
    assert any(line.startswith("[build] ") and "returned a non-zero code: 3" in line
               for line in lines), lines


async def test_build_output_comes_before_the_run_output_in_the_task_log(
    stack: Stack, busybox_image: str, function_images: list[str]
) -> None:
    await stack.org("org-a")
    key, function = await dockerfile_task(
        stack, f"FROM {busybox_image}\nRUN echo compiling the model\n",
        "echo running the model; echo 1 > output/model")
    function_images.append(function)
    await stack.runner("org-a", new_backend("docker", stack.home))
    task = await stack.wait_status("org-a", key, "DONE", "FAILED")
    lines = (await stack.logs("org-a", key)).splitlines()
    assert task["status"] == "DONE", lines
    assert lines.index("[build] compiling the model") < lines.index("running the model")
    assert not any(line.startswith("[build] ") for line in
                   lines[lines.index("running the model"):]), lines
