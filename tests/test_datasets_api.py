"""OASIS datasets, task logs and hostile input over HTTP."""

from __future__ import annotations

import io
import tarfile
import uuid
import zipfile

import httpx

from app.runtime import Runtime
from tests.conftest import bearer, register_org
from tests.test_compute_api import Network, eval_task, net, run_task, train_task, upload

__all__ = ["net"]  # the fixture, shared with the compute tests


async def test_dataset_is_registered_and_downloaded_as_files_and_zip(net: Network) -> None:
    files = {"a.txt": b"alpha\n", "dir/b.txt": b"beta\n"}
    refs = [{"path": p, "checksum": await upload(net.client, net.tokens["org-a"], d)}
            for p, d in files.items()]
    r = await net.post("org-a", "/datasets", json={
        "name": "texts", "files": refs,
        "permissions": {"process": {"public": False, "authorized_ids": ["org-b"]}}})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["total_size"] == 11 and [f["path"] for f in ds["files"]] == ["a.txt", "dir/b.txt"]
    got = await net.get("org-b", f"/datasets/{ds['key']}/files/dir/b.txt")
    assert got.status_code == 200 and got.content == b"beta\n"
    assert (await net.get("org-c", f"/datasets/{ds['key']}/files/a.txt")).status_code == 403
    z = await net.get("org-a", f"/datasets/{ds['key']}/zip")
    assert z.status_code == 200
    with zipfile.ZipFile(io.BytesIO(z.content)) as archive:
        assert {n: archive.read(n) for n in archive.namelist() if not n.endswith("/")} == files


async def test_dataset_paths_must_stay_inside(net: Network) -> None:
    checksum = await upload(net.client, net.tokens["org-a"], b"x")
    for path in ("../etc/passwd", "/abs", "a/./b"):
        r = await net.post("org-a", "/datasets", json={
            "name": "bad", "files": [{"path": path, "checksum": checksum}]})
        assert r.status_code == 400 and r.json()["code"] == "invalid_path", path
    assert (await net.get("org-a", "/datasets")).json()["items"] == []


async def test_task_logs_are_written_by_the_worker_and_read_per_logs_permission(
    net: Network,
) -> None:
    key = str(uuid.uuid4())
    await net.post("org-a", "/compute_plans", json={"name": "p", "tasks": [
        train_task(net, "org-b", key)]})
    await net.post("org-b", f"/tasks/{key}/actions", json={"action": "start"})
    for line in (b"epoch 1\n", b"epoch 2\n", b"epoch 3\n"):
        r = await net.client.post(f"/tasks/{key}/logs", content=line,
                                  headers=net.tokens["org-b"])
        assert r.status_code == 204
    assert (await net.client.post(f"/tasks/{key}/logs", content=b"x",
                                  headers=net.tokens["org-a"])).status_code == 403
    r = await net.get("org-b", f"/tasks/{key}/logs", params={"tail": 2})
    assert r.text == "epoch 2\nepoch 3\n"
    head = await net.get("org-b", f"/tasks/{key}/logs", params={"head": 1})
    assert head.text == "epoch 1\n"
    # Logs follow the data manager's logs permission (here its process permission: a, b).
    assert (await net.get("org-a", f"/tasks/{key}/logs")).status_code == 200
    assert (await net.get("org-c", f"/tasks/{key}/logs")).status_code == 403


async def test_task_dataset_output(client: httpx.AsyncClient, runtime: Runtime) -> None:
    tok = bearer(await register_org(client, "org-a"))
    r = await client.post("/functions", headers=tok, json={
        "name": "oasis", "inputs": {"input": {"kind": "DATASET"}},
        "outputs": {"output": {"kind": "DATASET"}}, "image_source": "IMAGE_REFERENCE",
        "image": "busybox", "command": ["sh", "-c", "cp -r input/* output/"],
        "environment": {"MODE": "copy"}})
    assert r.status_code == 201, r.text
    fn = r.json()["key"]
    src = await upload(client, tok, b"hello")
    ds = (await client.post("/datasets", headers=tok, json={
        "name": "in", "files": [{"path": "hello.txt", "checksum": src}]})).json()["key"]
    task = str(uuid.uuid4())
    r = await client.post("/compute_plans", headers=tok, json={"name": "oasis", "tasks": [
        {"key": task, "function_key": fn, "worker": "org-a",
         "inputs": [{"identifier": "input", "asset_key": ds}]}]})
    assert r.status_code == 201, r.text
    await client.post(f"/tasks/{task}/actions", headers=tok, json={"action": "start"})
    out = await client.post(f"/tasks/{task}/outputs/output/dataset", headers=tok, json={
        "files": [{"path": "hello.txt", "checksum": src}]})
    assert out.status_code == 201, out.text
    assert out.json()["compute_task_key"] == task
    done = await client.post(f"/tasks/{task}/actions", headers=tok, json={"action": "done"})
    assert done.json()["status"] == "DONE"


async def test_oversize_upload_is_413_and_nothing_is_kept(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    tok = bearer(await register_org(client, "org-a"))
    runtime.max_upload_bytes = 1000
    r = await client.post("/files", content=b"x" * 5000, headers=tok)
    assert r.status_code == 413 and r.json()["code"] == "too_large"
    r = await client.post("/files", content=b"abc", headers=tok | {"X-Content-SHA256": "0" * 64})
    assert r.status_code == 400 and r.json()["code"] == "checksum_mismatch"
    leftovers = [p for p in runtime.artifacts.root.rglob("*") if p.is_file()]  # type: ignore[attr-defined]
    assert leftovers == []


def _tar(members: dict[str, bytes], link: tuple[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type = tarfile.SYMTYPE
            info.linkname = link[1]
            tar.addfile(info)
    return buffer.getvalue()


async def test_hostile_function_archives_are_refused(client: httpx.AsyncClient) -> None:
    tok = bearer(await register_org(client, "org-a"))

    async def register(archive: bytes) -> httpx.Response:
        checksum = await upload(client, tok, archive)
        return await client.post("/functions", headers=tok, json={
            "name": "f", "image_source": "DOCKERFILE_ARCHIVE", "image": checksum})

    r = await register(_tar({"Dockerfile": b"FROM scratch\n", "../evil": b"x"}))
    assert r.status_code == 400 and r.json()["code"] == "unsafe_archive"
    r = await register(_tar({"Dockerfile": b"FROM scratch\n"}, link=("l", "/etc/passwd")))
    assert r.status_code == 400 and r.json()["code"] == "unsafe_archive"
    r = await register(_tar({"main.py": b"print()"}))
    assert r.status_code == 400 and r.json()["code"] == "missing_dockerfile"
    r = await register(_tar({"Dockerfile": b"FROM scratch\n", "main.py": b"print()"}))
    assert r.status_code == 201, r.text
    listing = (await client.get("/functions", headers=tok)).json()["items"]
    assert len(listing) == 1


async def test_unknown_fields_and_wrong_types_are_422_and_nothing_written(
    net: Network,
) -> None:
    r = await net.post("org-a", "/compute_plans", json={"name": "p", "colour": "red"})
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    r = await net.post("org-a", "/compute_plans", json={"name": "p", "tasks": "many"})
    assert r.status_code == 422
    r = await net.post("org-a", "/compute_plans", json={"name": "p", "tasks": [
        eval_task(net, "org-a", str(uuid.uuid4()), str(uuid.uuid4()))]})
    assert r.status_code == 400 and r.json()["code"] == "unknown_parent"
    assert (await net.get("org-a", "/compute_plans")).json()["items"] == []
    r = await net.post("org-a", "/data_managers", json={
        "name": "x", "opener_checksum": "f" * 64})
    assert r.status_code == 400 and r.json()["code"] == "unknown_file"
    r = await net.post("org-a", "/data_managers", json={"name": "x", "opener_checksum": "zz"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_checksum"


async def test_run_task_helper_still_works_for_failures(net: Network) -> None:
    key = str(uuid.uuid4())
    await net.post("org-a", "/compute_plans", json={"name": "p", "tasks": [
        train_task(net, "org-a", key), train_task(net, "org-a", str(uuid.uuid4()), parent=key)]})
    await net.post("org-a", f"/tasks/{key}/actions", json={"action": "start"})
    r = await net.post("org-a", f"/tasks/{key}/actions", json={
        "action": "fail", "error_type": "EXECUTION", "message": "exit code 1"})
    assert r.status_code == 200 and r.json()["status"] == "FAILED"
    assert r.json()["error_type"] == "EXECUTION"
    plan = (await net.get("org-a", "/compute_plans")).json()["items"][0]
    assert plan["status"] == "FAILED" and plan["failure_date"] is not None
    assert plan["status_counts"]["WAITING"] == 1  # children do not change when a parent fails
    _ = run_task
