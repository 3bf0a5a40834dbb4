"""Organizations, tokens and authentication over HTTP."""

from __future__ import annotations

import httpx

from tests.conftest import bearer, register_org


async def test_admin_registers_organization_and_its_token_works(client: httpx.AsyncClient) -> None:
    token = await register_org(client, "org-a")
    me = await client.get("/me", headers=bearer(token))
    assert me.status_code == 200
    assert me.json()["org"] == "org-a"
    assert me.json()["kind"] == "org"


async def test_missing_or_bad_token_is_401_problem(client: httpx.AsyncClient) -> None:
    r = await client.get("/organizations", headers={"Authorization": ""})
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "missing_token"
    r = await client.get("/organizations", headers=bearer("nope"))
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_token"


async def test_registering_an_existing_org_is_409(client: httpx.AsyncClient) -> None:
    await register_org(client, "org-a")
    r = await client.post("/organizations", json={"id": "org-a", "name": "again"})
    assert r.status_code == 409
    assert r.json()["code"] == "already_exists"
    assert r.json()["key"] == "org-a"


async def test_only_admin_registers_organizations(client: httpx.AsyncClient) -> None:
    token = await register_org(client, "org-a")
    r = await client.post("/organizations", json={"id": "org-b", "name": "B"},
                          headers=bearer(token))
    assert r.status_code == 403
    assert r.json()["code"] == "admin_only"


async def test_bad_org_id_unknown_field_and_malformed_json_are_4xx(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/organizations", json={"id": "Org A!", "name": "A"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_org_id"
    r = await client.post("/organizations", json={"id": "org-a", "name": "A", "colour": "red"})
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    r = await client.post("/organizations", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "malformed_json"
    listing = await client.get("/organizations")
    assert listing.json()["items"] == []


async def test_revoked_token_is_refused(client: httpx.AsyncClient) -> None:
    token = await register_org(client, "org-a")
    second = await client.post("/tokens", json={"name": "ci"}, headers=bearer(token))
    assert second.status_code == 201
    new_token = second.json()["token"]
    revoke = await client.delete(f"/tokens/{second.json()['info']['id']}", headers=bearer(token))
    assert revoke.status_code == 200 and revoke.json()["revoked_at"] is not None
    r = await client.get("/me", headers=bearer(new_token))
    assert r.status_code == 401
    again = await client.delete(f"/tokens/{second.json()['info']['id']}")
    assert again.status_code == 409


async def test_auditor_reads_every_ledger_and_changes_nothing(client: httpx.AsyncClient) -> None:
    await register_org(client, "org-a")
    r = await client.post("/tokens", json={"role": "auditor", "name": "auditor"})
    assert r.status_code == 201
    auditor = r.json()["token"]
    assert (await client.get("/ledger/org-a/verify", headers=bearer(auditor))).json()["ok"]
    r = await client.post("/tokens", json={"role": "org", "org": "org-a"},
                          headers=bearer(auditor))
    assert r.status_code == 403 and r.json()["code"] == "read_only"


async def test_org_may_not_read_another_orgs_ledger(client: httpx.AsyncClient) -> None:
    token_a = await register_org(client, "org-a")
    await register_org(client, "org-b")
    r = await client.get("/ledger/org-b/verify", headers=bearer(token_a))
    assert r.status_code == 403
    assert (await client.get("/ledger/org-a/verify", headers=bearer(token_a))).status_code == 200


async def test_organizations_list_is_paginated(client: httpx.AsyncClient) -> None:
    for i in range(5):
        await register_org(client, f"org-{i}")
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/organizations", params=params)).json()
        seen += [o["id"] for o in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"org-{i}" for i in range(5)]
    bad = await client.get("/organizations", params={"cursor": "garbage"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_cursor"


async def test_issued_token_info_is_what_the_token_list_shows(client: httpx.AsyncClient) -> None:
    created = await client.post("/organizations", json={"id": "org-a", "name": "A"})
    first = created.json()["token"]
    issued = await client.post("/tokens", json={"name": "ci"}, headers=bearer(first["token"]))
    listed = await client.get("/tokens", headers=bearer(first["token"]))
    by_id = {item["id"]: item for item in listed.json()["items"]}
    assert by_id[first["info"]["id"]] == first["info"]
    assert by_id[issued.json()["info"]["id"]] == issued.json()["info"]
    assert issued.json()["info"]["issued_by"] == "org-a"
