"""List filters on metadata: `?metadata=key:value` and `?metadata=key`, on every asset list."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.conftest import bearer, register_org
from tests.test_compute_api import Network, keys, net, train_task, upload

__all__ = ["net"]  # the fixture, used by name


async def _keys_listed(client: httpx.AsyncClient, headers: dict[str, str], url: str,
                       *filters: str, **params: Any) -> set[str]:
    r = await client.get(url, headers=headers, params={"metadata": list(filters), **params})
    assert r.status_code == 200, r.text
    return {item["key"] for item in r.json()["items"]}


async def test_data_managers_filtered_by_metadata_value_presence_and_both(
    client: httpx.AsyncClient,
) -> None:
    a = bearer(await register_org(client, "org-a"))
    opener = await upload(client, a, b"# opener\n")
    made = {}
    for name, metadata in [("lyon", {"site": "lyon", "year": "2026"}),
                           ("nice", {"site": "nice"}),
                           ("none", {}),
                           ("url", {"source": "https://x.example/a"})]:
        r = await client.post("/data_managers", headers=a, json={
            "name": name, "opener_checksum": opener, "metadata": metadata,
            "permissions": {"process": {"public": True, "authorized_ids": []}}})
        assert r.status_code == 201, r.text
        made[name] = r.json()["key"]
    url = "/data_managers"
    assert await _keys_listed(client, a, url, "site:lyon") == {made["lyon"]}
    assert await _keys_listed(client, a, url, "site") == {made["lyon"], made["nice"]}
    assert await _keys_listed(client, a, url, "site:lyon", "year") == {made["lyon"]}
    assert await _keys_listed(client, a, url, "site:nice", "year") == set()
    # Split at the first colon: a value may hold colons.
    assert await _keys_listed(client, a, url, "source:https://x.example/a") == {made["url"]}
    assert len(await _keys_listed(client, a, url)) == 4


async def test_a_malformed_metadata_filter_is_a_400(client: httpx.AsyncClient) -> None:
    a = bearer(await register_org(client, "org-a"))
    for bad in ([":lyon"], ["site:lyon", "site:nice"]):
        r = await client.get("/functions", headers=a, params={"metadata": bad})
        assert r.status_code == 400
        assert r.json()["code"] == "invalid_filter"


async def test_tasks_and_plans_filtered_by_metadata(net: Network) -> None:
    k = keys("first", "second")
    plan_key = str(uuid.uuid4())
    tasks = [train_task(net, "org-a", k["first"]) | {"metadata": {"round": "1"}},
             train_task(net, "org-a", k["second"], parent=k["first"]) | {"metadata": {
                 "round": "2"}}]
    r = await net.post("org-a", "/compute_plans", json={
        "key": plan_key, "name": "tagged", "metadata": {"study": "s1"}, "tasks": tasks})
    assert r.status_code == 201, r.text
    r = await net.post("org-a", "/compute_plans", json={"name": "untagged", "tasks": []})
    assert r.status_code == 201, r.text
    a = net.tokens["org-a"]
    assert await _keys_listed(net.client, a, "/tasks", "round:2") == {k["second"]}
    assert await _keys_listed(net.client, a, "/tasks", "round",
                              compute_plan_key=plan_key) == {k["first"], k["second"]}
    assert await _keys_listed(net.client, a, "/compute_plans", "study:s1") == {plan_key}


async def test_samples_and_datasets_keep_their_own_filters_beside_metadata(
    net: Network,
) -> None:
    b = net.tokens["org-b"]
    r = await net.post("org-b", "/data_samples", json={
        "data_manager_keys": [net.dm["org-b"]], "checksum": "1" * 64, "location": "/data/x",
        "metadata": {"split": "test"}})
    assert r.status_code == 201, r.text
    tagged = r.json()["key"]
    assert await _keys_listed(net.client, b, "/data_samples", "split:test",
                              data_manager_key=net.dm["org-b"]) == {tagged}
    assert await _keys_listed(net.client, b, "/data_samples", "split:test",
                              data_manager_key=net.dm["org-a"]) == set()
    assert await _keys_listed(net.client, b, "/datasets", "split") == set()
