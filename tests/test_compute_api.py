"""Assets, compute plans and the task lifecycle over HTTP, on the real stack."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import bearer, register_org

AB = {"process": {"public": False, "authorized_ids": ["org-a", "org-b"]}}
PUBLIC = {"process": {"public": True, "authorized_ids": []}}


@dataclass
class Network:
    client: httpx.AsyncClient
    tokens: dict[str, dict[str, str]]
    dm: dict[str, str]
    samples: dict[str, str]
    train: str
    aggregate: str
    test: str

    async def post(self, org: str, url: str, **kw: Any) -> httpx.Response:
        return await self.client.post(url, headers=self.tokens[org], **kw)

    async def get(self, org: str, url: str, **kw: Any) -> httpx.Response:
        return await self.client.get(url, headers=self.tokens[org], **kw)


async def upload(client: httpx.AsyncClient, headers: dict[str, str], data: bytes) -> str:
    r = await client.post("/files", content=data, headers=headers)
    assert r.status_code == 201, r.text
    checksum: str = r.json()["checksum"]
    assert checksum == hashlib.sha256(data).hexdigest()
    return checksum


async def function(net: Network, org: str, name: str, inputs: dict[str, Any],
                   outputs: dict[str, Any], permissions: dict[str, Any] = PUBLIC) -> str:
    r = await net.post(org, "/functions", json={
        "name": name, "permissions": permissions, "inputs": inputs, "outputs": outputs,
        "image_source": "IMAGE_REFERENCE", "image": "busybox:latest",
        "command": ["sh", "-c", "true"],
    })
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key


@pytest.fixture
async def net(client: httpx.AsyncClient) -> Network:
    tokens = {}
    for org in ("org-a", "org-b", "org-c"):
        tokens[org] = bearer(await register_org(client, org, model_export_enabled=(org == "org-a")))
    n = Network(client, tokens, {}, {}, "", "", "")
    for org in ("org-a", "org-b"):
        opener = await upload(client, tokens[org], f"# opener of {org}\n".encode())
        r = await n.post(org, "/data_managers", json={
            "name": f"data of {org}", "opener_checksum": opener, "permissions": AB})
        assert r.status_code == 201, r.text
        n.dm[org] = r.json()["key"]
        r = await n.post(org, "/data_samples", json={
            "data_manager_keys": [n.dm[org]], "checksum": "0" * 64, "location": f"/data/{org}"})
        assert r.status_code == 201, r.text
        n.samples[org] = r.json()["key"]
    data_inputs = {"opener": {"kind": "DATA_MANAGER"},
                   "datasamples": {"kind": "DATA_SAMPLE", "multiple": True}}
    n.train = await function(n, "org-a", "train", data_inputs | {
        "model": {"kind": "MODEL", "optional": True}}, {"model": {"kind": "MODEL"}})
    n.aggregate = await function(n, "org-a", "aggregate", {
        "models": {"kind": "MODEL", "multiple": True}}, {"model": {"kind": "MODEL"}})
    n.test = await function(n, "org-a", "test", data_inputs | {"model": {"kind": "MODEL"}},
                            {"performance": {"kind": "PERFORMANCE"}})
    return n


def train_task(n: Network, org: str, key: str, parent: str | None = None,
               transient: bool = False) -> dict[str, Any]:
    inputs = [{"identifier": "opener", "asset_key": n.dm[org]},
              {"identifier": "datasamples", "asset_key": n.samples[org]}]
    if parent:
        inputs.append({"identifier": "model", "parent_task_key": parent,
                       "parent_output": "model"})
    return {"key": key, "function_key": n.train, "inputs": inputs,
            "outputs": {"model": {"permissions": {"process": {
                "public": False, "authorized_ids": ["org-a", "org-b", "org-c"]}},
                "transient": transient}}}


def aggregate_task(n: Network, key: str, *parents: str, worker: str = "org-c") -> dict[str, Any]:
    return {"key": key, "function_key": n.aggregate, "worker": worker,
            "inputs": [{"identifier": "models", "parent_task_key": p, "parent_output": "model"}
                       for p in parents],
            "outputs": {"model": {"permissions": {"process": {
                "public": False, "authorized_ids": ["org-a", "org-b"]}}}}}


def eval_task(n: Network, org: str, key: str, parent: str) -> dict[str, Any]:
    return {"key": key, "function_key": n.test, "inputs": [
        {"identifier": "opener", "asset_key": n.dm[org]},
        {"identifier": "datasamples", "asset_key": n.samples[org]},
        {"identifier": "model", "parent_task_key": parent, "parent_output": "model"}]}


def keys(*names: str) -> dict[str, str]:
    return {name: str(uuid.uuid4()) for name in names}


async def run_task(n: Network, worker: str, key: str, output: str = "model",
                   value: float | None = None) -> None:
    r = await n.post(worker, f"/tasks/{key}/actions", json={"action": "start"})
    assert r.status_code == 200 and r.json()["status"] == "DOING", r.text
    if value is None:
        checksum = await upload(n.client, n.tokens[worker], f"model of {key}".encode())
        r = await n.post(worker, f"/tasks/{key}/outputs/{output}/model",
                         json={"checksum": checksum})
    else:
        r = await n.post(worker, f"/tasks/{key}/outputs/{output}/performance",
                         json={"value": value})
    assert r.status_code == 201, r.text
    r = await n.post(worker, f"/tasks/{key}/actions", json={"action": "done"})
    assert r.status_code == 200 and r.json()["status"] == "DONE", r.text


async def status_of(n: Network, key: str) -> str:
    status: str = (await n.get("org-a", f"/tasks/{key}")).json()["status"]
    return status


async def test_substra_round_runs_through_its_whole_lifecycle(net: Network) -> None:
    k = keys("ta", "tb", "agg", "testa", "testb")
    plan_key = str(uuid.uuid4())
    r = await net.post("org-a", "/compute_plans", json={
        "key": plan_key, "name": "round 1", "tasks": [
            eval_task(net, "org-a", k["testa"], k["agg"]),
            aggregate_task(net, k["agg"], k["ta"], k["tb"]),
            train_task(net, "org-a", k["ta"]), train_task(net, "org-b", k["tb"]),
            eval_task(net, "org-b", k["testb"], k["agg"]),
        ]})
    assert r.status_code == 201, r.text
    assert r.json()["plan"]["status"] == "CREATED"
    tasks = {t["key"]: t for t in (await net.get("org-a", "/tasks", params={
        "compute_plan_key": plan_key})).json()["items"]}
    assert {tasks[k[n]]["rank"] for n in ("ta", "tb")} == {0}
    assert tasks[k["agg"]]["rank"] == 1 and tasks[k["testa"]]["rank"] == 2
    assert tasks[k["tb"]]["worker"] == "org-b" and tasks[k["agg"]]["worker"] == "org-c"
    assert tasks[k["ta"]]["status"] == "TODO" and tasks[k["agg"]]["status"] == "WAITING"

    # Only the worker starts a task.
    r = await net.post("org-a", f"/tasks/{k['tb']}/actions", json={"action": "start"})
    assert r.status_code == 403 and r.json()["code"] == "wrong_sender"

    await run_task(net, "org-a", k["ta"])
    assert await status_of(net, k["agg"]) == "WAITING"
    assert (await net.get("org-a", f"/compute_plans/{plan_key}")).json()["status"] == "DOING"
    await run_task(net, "org-b", k["tb"])
    assert await status_of(net, k["agg"]) == "TODO"
    await run_task(net, "org-c", k["agg"])
    assert await status_of(net, k["testa"]) == "TODO"
    await run_task(net, "org-a", k["testa"], "performance", 0.91)
    await run_task(net, "org-b", k["testb"], "performance", 0.87)

    plan = (await net.get("org-c", f"/compute_plans/{plan_key}")).json()
    assert plan["status"] == "DONE" and plan["status_counts"]["DONE"] == 5
    assert plan["start_date"] and plan["end_date"]
    perfs = (await net.get("org-c", f"/compute_plans/{plan_key}/performances")).json()["items"]
    assert sorted(p["value"] for p in perfs) == [0.87, 0.91]
    graph = (await net.get("org-a", f"/compute_plans/{plan_key}/graph")).json()
    assert len(graph["nodes"]) == 5 and len(graph["edges"]) == 4


async def test_batch_is_atomic_and_a_retried_plan_key_is_409(net: Network) -> None:
    k = keys("t1", "bad")
    bad = train_task(net, "org-a", k["bad"])
    bad["inputs"][1]["asset_key"] = net.samples["org-b"]  # a sample of another data manager
    plan = {"key": str(uuid.uuid4()), "name": "p",
            "tasks": [train_task(net, "org-a", k["t1"]), bad]}
    r = await net.post("org-a", "/compute_plans", json=plan)
    assert r.status_code == 400 and r.json()["code"] == "sample_not_in_data_manager"
    assert (await net.get("org-a", f"/tasks/{k['t1']}")).status_code == 404
    assert (await net.get("org-a", f"/compute_plans/{plan['key']}")).status_code == 404
    plan["tasks"] = [train_task(net, "org-a", k["t1"])]
    assert (await net.post("org-a", "/compute_plans", json=plan)).status_code == 201
    again = await net.post("org-a", "/compute_plans", json=plan)
    assert again.status_code == 409 and again.json()["key"] == plan["key"]


async def test_cancel_plan_cancels_every_non_final_task(net: Network) -> None:
    k = keys("t1", "t2", "t3")
    plan_key = str(uuid.uuid4())
    await net.post("org-a", "/compute_plans", json={"key": plan_key, "name": "p", "tasks": [
        train_task(net, "org-a", k["t1"]), train_task(net, "org-a", k["t2"], parent=k["t1"]),
        train_task(net, "org-a", k["t3"], parent=k["t2"])]})
    await run_task(net, "org-a", k["t1"])
    r = await net.post("org-b", f"/compute_plans/{plan_key}/cancel")
    assert r.status_code == 403
    r = await net.post("org-a", f"/compute_plans/{plan_key}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "CANCELED"
    assert [await status_of(net, k[n]) for n in ("t1", "t2", "t3")] == [
        "DONE", "CANCELED", "CANCELED"]
    more = await net.post("org-a", f"/compute_plans/{plan_key}/tasks",
                          json={"tasks": [train_task(net, "org-a", str(uuid.uuid4()))]})
    assert more.status_code == 400 and more.json()["code"] == "plan_canceled"


async def test_child_becomes_todo_when_parents_finish_at_the_same_time(net: Network) -> None:
    k = keys("ta", "tb", "agg")
    await net.post("org-a", "/compute_plans", json={"name": "p", "tasks": [
        train_task(net, "org-a", k["ta"]), train_task(net, "org-b", k["tb"]),
        aggregate_task(net, k["agg"], k["ta"], k["tb"])]})
    for org, key in (("org-a", k["ta"]), ("org-b", k["tb"])):
        await net.post(org, f"/tasks/{key}/actions", json={"action": "start"})
        checksum = await upload(net.client, net.tokens[org], key.encode())
        await net.post(org, f"/tasks/{key}/outputs/model/model", json={"checksum": checksum})
    done = await asyncio.gather(
        net.post("org-a", f"/tasks/{k['ta']}/actions", json={"action": "done"}),
        net.post("org-b", f"/tasks/{k['tb']}/actions", json={"action": "done"}),
    )
    assert [r.status_code for r in done] == [200, 200], [r.text for r in done]
    assert await status_of(net, k["agg"]) == "TODO"


async def test_outputs_rules_over_http(net: Network) -> None:
    k = keys("t1")
    await net.post("org-a", "/compute_plans", json={"name": "p", "tasks": [
        train_task(net, "org-a", k["t1"])]})
    checksum = await upload(net.client, net.tokens["org-a"], b"weights")
    r = await net.post("org-a", f"/tasks/{k['t1']}/outputs/model/model",
                       json={"checksum": checksum})
    assert r.status_code == 400 and r.json()["code"] == "task_not_doing"
    await net.post("org-a", f"/tasks/{k['t1']}/actions", json={"action": "start"})
    r = await net.post("org-a", f"/tasks/{k['t1']}/actions", json={"action": "done"})
    assert r.status_code == 400 and r.json()["code"] == "outputs_missing"
    first = await net.post("org-a", f"/tasks/{k['t1']}/outputs/model/model",
                           json={"checksum": checksum})
    assert first.status_code == 201
    second = await net.post("org-a", f"/tasks/{k['t1']}/outputs/model/model",
                            json={"checksum": checksum})
    assert second.status_code == 409
    model_key = first.json()["key"]
    # org-a has model export enabled; org-c may process the model and download it.
    assert (await net.get("org-c", f"/models/{model_key}/file")).content == b"weights"


async def test_model_export_needs_the_worker_orgs_setting(net: Network) -> None:
    k = keys("tb")
    await net.post("org-a", "/compute_plans", json={"name": "p", "tasks": [
        train_task(net, "org-b", k["tb"])]})
    await run_task(net, "org-b", k["tb"])
    model = (await net.get("org-a", "/tasks/" + k["tb"])).json()
    assert model["status"] == "DONE"
    r = await net.client.get("/models", headers=net.tokens["org-a"],
                             params={"compute_task_key": k["tb"]})
    model_key = r.json()["items"][0]["key"]
    r = await net.get("org-a", f"/models/{model_key}/file")
    assert r.status_code == 403 and r.json()["code"] == "model_export_disabled"
    assert (await net.get("org-b", f"/models/{model_key}/file")).status_code == 200


async def test_transient_model_is_disabled_and_deleted_after_its_consumers_finish(
    net: Network,
) -> None:
    k = keys("t1", "t2")
    await net.post("org-a", "/compute_plans", json={"name": "p", "tasks": [
        train_task(net, "org-a", k["t1"], transient=True),
        train_task(net, "org-a", k["t2"], parent=k["t1"])]})
    await run_task(net, "org-a", k["t1"])
    models = (await net.get("org-a", "/models", params={"compute_task_key": k["t1"]})).json()
    model = models["items"][0]
    assert model["disabled"] is False
    await run_task(net, "org-a", k["t2"])
    models = (await net.get("org-a", "/models", params={"compute_task_key": k["t1"]})).json()
    assert models["items"][0]["disabled"] is True
    r = await net.get("org-a", f"/models/{model['key']}/file")
    assert r.status_code == 410
    reuse = await net.post("org-a", "/compute_plans", json={"name": "p2", "tasks": [
        {"function_key": net.aggregate, "worker": "org-a",
         "inputs": [{"identifier": "models", "asset_key": model["key"]}]}]})
    assert reuse.status_code == 400 and reuse.json()["code"] == "disabled_model"


@pytest.mark.parametrize("org, allowed", [("org-a", True), ("org-b", True), ("org-c", False)])
async def test_seed_permission_table_for_datasets_and_functions(
    net: Network, org: str, allowed: bool
) -> None:
    """orgA registers with {public: false, authorized_ids: [orgA, orgB]}."""
    private_train = await function(net, "org-a", "private train", {
        "opener": {"kind": "DATA_MANAGER"}, "datasamples": {"kind": "DATA_SAMPLE",
                                                          "multiple": True}},
        {"model": {"kind": "MODEL"}}, permissions=AB)
    task = train_task(net, "org-a", str(uuid.uuid4()))
    task["function_key"] = private_train
    r = await net.post(org, "/compute_plans", json={"name": "p", "tasks": [task]})
    assert (r.status_code == 201) is allowed, r.text
    if not allowed:
        assert r.status_code == 403
    else:
        assert r.json()["plan"]["task_count"] == 1
        assert (await net.get(org, f"/tasks/{task['key']}")).json()["worker"] == "org-a"
    opener = await net.get(org, f"/data_managers/{net.dm['org-a']}/opener")
    assert (opener.status_code == 200) is allowed
    archive = await net.get(org, f"/functions/{private_train}/archive")
    assert archive.status_code == (404 if allowed else 403)  # image reference: no file


async def test_failure_report_tells_why_and_keeps_the_log_for_whoever_may_read_logs(
    net: Network,
) -> None:
    k = keys("t1", "t2")
    await net.post("org-a", "/compute_plans", json={"name": "p", "tasks": [
        train_task(net, "org-a", k["t1"]), train_task(net, "org-a", k["t2"])]})
    log = b"epoch 1\nTraceback: out of memory\n"
    checksum = await upload(net.client, net.tokens["org-a"], log)
    await net.post("org-a", f"/tasks/{k['t1']}/actions", json={"action": "start"})
    r = await net.post("org-a", f"/tasks/{k['t1']}/actions", json={
        "action": "fail", "error_type": "EXECUTION", "message": "exit code 137",
        "logs_checksum": checksum})
    assert r.status_code == 200 and r.json()["status"] == "FAILED", r.text

    report = (await net.get("org-a", f"/tasks/{k['t1']}/failure_report")).json()
    assert report["compute_task_key"] == k["t1"] and report["error_type"] == "EXECUTION"
    assert report["message"] == "exit code 137" and report["logs_checksum"] == checksum
    saved = await net.get("org-a", f"/tasks/{k['t1']}/failure_report/logs")
    assert saved.status_code == 200 and saved.content == log
    # org-c is not in the data manager's logs permission: neither the report nor its log.
    for path in ("failure_report", "failure_report/logs"):
        denied = await net.get("org-c", f"/tasks/{k['t1']}/{path}")
        assert denied.status_code == 403, path
    missing = await net.get("org-a", f"/tasks/{k['t2']}/failure_report")
    assert missing.status_code == 404 and missing.json()["code"] == "no_failure_report"
