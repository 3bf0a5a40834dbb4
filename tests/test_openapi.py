"""The OpenAPI document describes every answer, and the answers are what it describes."""

from __future__ import annotations

import types
import uuid
from typing import Any, Union, get_args, get_origin

import httpx
from pydantic import BaseModel

from app.api import schemas_out as out
from tests.test_compute_api import Network, eval_task, keys, net, run_task, train_task, upload

__all__ = ["net"]  # the fixture, used by name

# Answers that are not JSON, by design.
NOT_JSON = {
    ("get", "/tasks/{key}/logs"): "text/plain",
    ("get", "/ledger/stream"): "text/event-stream",
}


async def test_every_answer_has_a_documented_schema(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            ok = {code: r for code, r in operation["responses"].items() if code.startswith("2")}
            assert ok, where
            for code, response in ok.items():
                content = response.get("content", {})
                if code == "204" or path == "/metrics":
                    continue
                if (method, path) in NOT_JSON:
                    assert NOT_JSON[method, path] in content, where
                    continue
                if "application/json" not in content:
                    # A download: bytes, declared as such.
                    [(media_type, body)] = content.items()
                    assert body["schema"] == {"type": "string", "format": "binary"}, where
                    continue
                schema = content["application/json"]["schema"]
                assert "$ref" in schema or schema.get("properties"), (where, schema)


def _fields_of(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation holds: X, X | None, list[X]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (list, Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _fields_of(arg)]
    return []


def assert_documented(model: type[BaseModel], data: dict[str, Any], where: str = "") -> None:
    """`data` has every required field of `model` and no field it does not declare,
    down through nested models."""
    where = where or model.__name__
    fields = model.model_fields
    assert set(data) <= set(fields), f"{where}: undocumented {sorted(set(data) - set(fields))}"
    required = {name for name, f in fields.items() if f.is_required()}
    assert required <= set(data), f"{where}: missing {sorted(required - set(data))}"
    model.model_validate(data)
    for name, value in data.items():
        for nested in _fields_of(fields[name].annotation):
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    assert_documented(nested, item, f"{where}.{name}")


async def test_answers_carry_exactly_the_documented_fields(net: Network) -> None:
    a = net.tokens["org-a"]
    k = keys("train", "test", "failing")
    plan_key = str(uuid.uuid4())
    registered = await net.post("org-a", "/compute_plans", json={
        "key": plan_key, "name": "documented", "metadata": {"study": "s"}, "tasks": [
            train_task(net, "org-a", k["train"]),
            eval_task(net, "org-a", k["test"], k["train"]),
            train_task(net, "org-a", k["failing"])]})
    assert_documented(out.PlanRegistered, registered.json())
    await run_task(net, "org-a", k["train"])
    await run_task(net, "org-a", k["test"], "performance", 0.5)
    started = await net.post("org-a", f"/tasks/{k['failing']}/actions", json={
        "action": "start", "runner_id": "runner-1"})
    assert_documented(out.Task, started.json())
    assert "lease" in started.json()
    renewed = await net.post("org-a", f"/tasks/{k['failing']}/lease",
                             json={"runner_id": "runner-1"})
    assert_documented(out.LeaseRenewed, renewed.json())
    await net.post("org-a", f"/tasks/{k['failing']}/actions", json={
        "action": "fail", "runner_id": "runner-1", "error_type": "EXECUTION",
        "message": "exit code 1"})
    checksum = await upload(net.client, a, b"alpha\n")
    dataset = await net.post("org-a", "/datasets", json={
        "name": "texts", "files": [{"path": "a.txt", "checksum": checksum}]})
    assert dataset.status_code == 201, dataset.text

    model_key = (await net.get("org-a", "/models", params={
        "compute_task_key": k["train"]})).json()["items"][0]["key"]
    one: dict[str, type[BaseModel]] = {
        f"/data_managers/{net.dm['org-a']}": out.DataManager,
        f"/data_samples/{net.samples['org-a']}": out.DataSample,
        f"/functions/{net.train}": out.Function,
        f"/datasets/{dataset.json()['key']}": out.Dataset,
        f"/compute_plans/{plan_key}": out.ComputePlan,
        f"/compute_plans/{plan_key}/graph": out.PlanGraph,
        f"/compute_plans/{plan_key}/performances": out.Performances,
        f"/tasks/{k['train']}": out.Task,
        f"/tasks/{k['failing']}/failure_report": out.FailureReport,
        f"/models/{model_key}": out.Model,
        "/ledger/org-a/verify": out.VerifyResult,
    }
    for path, model in one.items():
        r = await net.get("org-a", path)
        assert r.status_code == 200, (path, r.text)
        assert_documented(model, r.json(), path)
    pages: dict[str, type[BaseModel]] = {
        "/data_managers": out.DataManager, "/data_samples": out.DataSample,
        "/functions": out.Function, "/datasets": out.Dataset,
        "/compute_plans": out.ComputePlan, "/tasks": out.Task, "/models": out.Model}
    for path, model in pages.items():
        page = (await net.get("org-a", path)).json()
        assert set(page) == {"items", "next_cursor"} and page["items"], path
        for item in page["items"]:
            assert_documented(model, item, path)
