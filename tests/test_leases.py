"""Runner leases and dispatch: a task runs once at a time, a silent runner's task is retried
once then FAILED (INTERNAL), and every TODO task reaches its worker's JetStream subject."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import nats

from app.api import compute as commands
from app.execution.dispatcher import DispatchConfig, Dispatcher, ensure_tasks_stream
from app.execution.sweeper import LeaseSweeper
from app.runtime import Runtime
from tests.conftest import NATS_URL, service_missing
from tests.test_compute_api import Network, net, train_task

__all__ = ["net"]  # the fixture, shared with the compute tests


async def one_task(n: Network) -> str:
    key = str(uuid.uuid4())
    r = await n.post("org-a", "/compute_plans", json={
        "name": "p", "tasks": [train_task(n, "org-a", key)]})
    assert r.status_code == 201, r.text
    return key


async def start(n: Network, key: str, runner: str, lease_s: float = 30) -> httpx.Response:
    return await n.post("org-a", f"/tasks/{key}/actions", json={
        "action": "start", "runner_id": runner, "lease_seconds": lease_s})


async def expire_now(runtime: Runtime, key: str) -> None:
    async with runtime.pool.acquire() as conn:
        await conn.execute("UPDATE task_leases SET expires_at = now() - interval '1 second' "
                           "WHERE task_key = $1", key)


def sweeper(runtime: Runtime) -> LeaseSweeper:
    return LeaseSweeper(runtime.leases, lambda run: commands.expire_lease(runtime, run))


async def test_runner_start_takes_a_lease_on_its_first_attempt(net: Network) -> None:
    key = await one_task(net)
    r = await start(net, key, "runner-1")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "DOING"
    assert r.json()["lease"]["runner_id"] == "runner-1"
    assert r.json()["lease"]["attempt"] == 1


async def test_a_runner_sending_its_start_again_gets_its_lease_back(net: Network) -> None:
    key = await one_task(net)
    first = await start(net, key, "runner-1")
    again = await start(net, key, "runner-1")  # its first answer was lost on the way
    assert again.status_code == 200, again.text
    assert again.json()["lease"]["attempt"] == first.json()["lease"]["attempt"] == 1


async def test_second_runner_cannot_start_a_leased_task(net: Network) -> None:
    key = await one_task(net)
    assert (await start(net, key, "runner-1")).status_code == 200
    r = await start(net, key, "runner-2")
    assert r.status_code == 409
    assert r.json()["code"] == "task_leased"


async def test_concurrent_starts_by_two_runners_one_wins(net: Network) -> None:
    key = await one_task(net)
    results = await asyncio.gather(*(start(net, key, f"runner-{i}") for i in range(4)))
    assert sorted(r.status_code for r in results).count(200) == 1


async def test_only_the_holder_renews_its_lease(net: Network) -> None:
    key = await one_task(net)
    await start(net, key, "runner-1")
    r = await net.post("org-a", f"/tasks/{key}/lease", json={"runner_id": "runner-1"})
    assert r.status_code == 200 and r.json()["status"] == "DOING"
    r = await net.post("org-a", f"/tasks/{key}/lease", json={"runner_id": "runner-2"})
    assert r.status_code == 409 and r.json()["code"] == "lease_lost"
    r = await net.post("org-b", f"/tasks/{key}/lease", json={"runner_id": "runner-1"})
    assert r.status_code == 403


async def test_renewal_reports_a_canceled_task(net: Network) -> None:
    key = await one_task(net)
    await start(net, key, "runner-1")
    r = await net.post("org-a", f"/tasks/{key}/actions", json={"action": "cancel"})
    assert r.status_code == 200, r.text
    r = await net.post("org-a", f"/tasks/{key}/lease", json={"runner_id": "runner-1"})
    assert r.status_code == 200 and r.json()["status"] == "CANCELED"


async def test_expired_lease_requeues_then_fails_internal(net: Network, runtime: Runtime) -> None:
    key = await one_task(net)
    await start(net, key, "runner-1")
    await expire_now(runtime, key)
    assert await sweeper(runtime).sweep_once() == {key: ["TODO"]}
    r = await net.get("org-a", f"/tasks/{key}")
    assert r.json()["status"] == "TODO"

    r = await start(net, key, "runner-2")
    assert r.status_code == 200 and r.json()["lease"]["attempt"] == 2
    await expire_now(runtime, key)
    assert await sweeper(runtime).sweep_once() == {key: ["FAILED"]}
    task = (await net.get("org-a", f"/tasks/{key}")).json()
    assert task["status"] == "FAILED" and task["error_type"] == "INTERNAL"
    async with runtime.pool.acquire() as conn:
        report = await conn.fetchrow("SELECT * FROM failure_reports WHERE key = $1", key)
        actor = await conn.fetchval(
            "SELECT actor FROM ledger WHERE asset_key = $1 ORDER BY sequence DESC LIMIT 1", key)
    assert report["error_type"] == "INTERNAL" and "runner-2" in report["message"]
    assert actor == "system"


async def test_live_lease_is_not_swept(net: Network, runtime: Runtime) -> None:
    key = await one_task(net)
    await start(net, key, "runner-1")
    assert await sweeper(runtime).sweep_once() == {}


async def test_task_started_by_hand_has_no_lease_and_is_never_swept(
    net: Network, runtime: Runtime
) -> None:
    key = await one_task(net)
    r = await net.post("org-a", f"/tasks/{key}/actions", json={"action": "start"})
    assert r.status_code == 200 and "lease" not in r.json()
    assert await sweeper(runtime).sweep_once() == {}


async def test_runner_that_lost_its_lease_cannot_finish_the_task(
    net: Network, runtime: Runtime
) -> None:
    key = await one_task(net)
    await start(net, key, "runner-1")
    await expire_now(runtime, key)
    await sweeper(runtime).sweep_once()
    assert (await start(net, key, "runner-2")).status_code == 200
    r = await net.post("org-a", f"/tasks/{key}/actions", json={
        "action": "fail", "runner_id": "runner-1", "message": "late"})
    assert r.status_code == 409 and r.json()["code"] == "lease_lost"
    r = await net.post("org-a", f"/tasks/{key}/actions", json={
        "action": "fail", "runner_id": "runner-2", "message": "boom"})
    assert r.status_code == 200 and r.json()["status"] == "FAILED"


async def test_todo_tasks_are_dispatched_to_their_worker_once_per_version(
    net: Network, runtime: Runtime
) -> None:
    try:
        nc = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
    except Exception as exc:  # noqa: BLE001 - any connection failure means no NATS
        service_missing(f"NATS at {NATS_URL} ({exc})")
    js = nc.jetstream()
    tag = uuid.uuid4().hex[:8]
    config = DispatchConfig(stream=f"TEST_TASKS_{tag}", subject_prefix=f"test.{tag}.tasks")
    await ensure_tasks_stream(js, config)
    sub = await js.pull_subscribe(config.worker_subject("org-a"), durable="runners-org-a",
                                  stream=config.stream)
    dispatcher = Dispatcher(runtime.pool, runtime.notifications, NATS_URL, config, poll_s=0.1)
    try:
        key = await one_task(net)
        await dispatcher.start()
        [msg] = await sub.fetch(1, timeout=10)
        await msg.ack()
        body = json.loads(msg.data)
        assert body["task_key"] == key and body["worker"] == "org-a"
        await asyncio.sleep(0.5)
        assert dispatcher.dispatched == 1  # not again while the version is unchanged

        await start(net, key, "runner-1")
        await expire_now(runtime, key)
        await sweeper(runtime).sweep_once()  # back to TODO at a new version
        [msg] = await sub.fetch(1, timeout=10)
        assert json.loads(msg.data)["task_key"] == key
        assert json.loads(msg.data)["version"] > body["version"]
    finally:
        await dispatcher.stop()
        await js.delete_stream(config.stream)
        await nc.close()
