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


async def _running_task(net: Network) -> str:
    """A task of org-b (data of org-b: logs readable by org-a and org-b), started."""
    key = str(uuid.uuid4())
    r = await net.post("org-a", "/compute_plans", json={"name": "p", "tasks": [
        train_task(net, "org-b", key)]})
    assert r.status_code == 201, r.text
    r = await net.post("org-b", f"/tasks/{key}/actions", json={"action": "start"})
    assert r.status_code == 200, r.text
    return key


async def _append(net: Network, key: str, data: bytes) -> None:
    r = await net.client.post(f"/tasks/{key}/logs", content=data, headers=net.tokens["org-b"])
    assert r.status_code == 204, r.text


async def _read(net: Network, key: str, org: str = "org-a", **params: int) -> httpx.Response:
    r = await net.get(org, f"/tasks/{key}/logs", params=params)
    assert r.status_code == 200, r.text
    return r


# Chunks of different sizes, a multibyte character cut between two of them, and a byte
# that is not UTF-8 at all: offset reads must hand back the bytes untouched.
CHUNKS = [b"epoch 1 loss=0.9\n", b"epoch 2 caf\xc3", b"\xa9 \xff\n", b"x" * 5000,
          b"\n", "epoch 3 \u2713 done\n".encode()]
WHOLE = b"".join(CHUNKS)


async def test_log_read_from_an_offset_returns_only_what_came_after(net: Network) -> None:
    key = await _running_task(net)
    for chunk in CHUNKS:
        await _append(net, key, chunk)
    boundaries = {0}
    for chunk in CHUNKS:
        boundaries.add(max(boundaries) + len(chunk))
    # every chunk boundary (29 is also inside the two-byte character), inside chunks (the
    # first chunk read is cut), and past the end
    offsets = sorted(boundaries | {1, 5, 21, 28, 1000, 4999, len(WHOLE) - 1,
                                   len(WHOLE) + 1, len(WHOLE) + 10**12})
    assert 29 in boundaries and WHOLE[28:30] == "\u00e9".encode()
    for offset in offsets:
        r = await _read(net, key, offset=offset)
        assert r.content == WHOLE[offset:], offset
        assert r.headers["Consort-Log-Size"] == str(len(WHOLE)), offset
        assert r.headers["content-type"].startswith("text/plain")
    # without an offset: the whole log, as the bytes it is
    whole = await _read(net, key)
    assert whole.content == WHOLE and whole.headers["Consort-Log-Size"] == str(len(WHOLE))


async def test_successive_offset_reads_join_up_to_the_whole_log(net: Network) -> None:
    key = await _running_task(net)
    empty = await _read(net, key, offset=0)
    assert empty.content == b"" and empty.headers["Consort-Log-Size"] == "0"
    got, offset, reads = b"", 0, 0
    for i, chunk in enumerate(CHUNKS):
        await _append(net, key, chunk)
        if i % 2:  # sometimes two appends land between two reads
            continue
        r = await _read(net, key, offset=offset)
        got += r.content
        offset = int(r.headers["Consort-Log-Size"])
        reads += 1
        assert offset == len(got)
    r = await _read(net, key, offset=offset)
    got += r.content
    assert got == WHOLE and reads == 3
    again = await _read(net, key, offset=len(WHOLE))
    assert again.content == b"" and again.headers["Consort-Log-Size"] == str(len(WHOLE))


async def test_every_log_answer_carries_the_log_size(net: Network) -> None:
    key = await _running_task(net)
    assert (await _read(net, key)).headers["Consort-Log-Size"] == "0"
    for chunk in (b"epoch 1\n", b"epoch 2\n", "epoch 3 \u00e9\n".encode()):
        await _append(net, key, chunk)
    size = str(len(b"epoch 1\nepoch 2\n" + "epoch 3 \u00e9\n".encode()))
    head = await _read(net, key, head=1)
    tail = await _read(net, key, "org-b", tail=1)
    assert head.text == "epoch 1\n" and tail.text == "epoch 3 \u00e9\n"
    assert head.headers["Consort-Log-Size"] == tail.headers["Consort-Log-Size"] == size


async def test_log_offset_with_head_or_tail_is_refused(net: Network) -> None:
    key = await _running_task(net)
    await _append(net, key, b"epoch 1\n")
    for params in ({"offset": 0, "head": 1}, {"offset": 3, "tail": 2}):
        r = await net.get("org-a", f"/tasks/{key}/logs", params=params)
        assert r.status_code == 400, params
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "invalid_request"
    r = await net.get("org-a", f"/tasks/{key}/logs", params={"offset": -1})
    assert r.status_code == 422 and r.json()["code"] == "validation_error"


async def test_log_offset_reads_keep_the_logs_permission(net: Network) -> None:
    key = await _running_task(net)
    await _append(net, key, b"epoch 1\n")
    assert (await _read(net, key, "org-b", offset=2)).content == b"och 1\n"
    denied = await net.get("org-c", f"/tasks/{key}/logs", params={"offset": 2})
    assert denied.status_code == 403 and denied.json()["code"] == "forbidden"
    assert "Consort-Log-Size" not in denied.headers
    missing = await net.get("org-a", f"/tasks/{uuid.uuid4()}/logs", params={"offset": 0})
    assert missing.status_code == 404


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
