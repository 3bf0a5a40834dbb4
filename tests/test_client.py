"""The Python client against a live API: every method, retries, iterators, SSE.

The async client talks to the app through httpx's ASGI transport; the blocking client
runs in a worker thread against a real uvicorn server (the server runs on the test's
event loop), which also carries the Server-Sent Events stream. No runner executes tasks
here: the tests play the worker through the client.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import tarfile
import threading
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.app import create_app
from app.runtime import Runtime
from app.storage.artifacts import FilesystemArtifactStore
from consort import (
    AsyncClient,
    ChecksumMismatch,
    Client,
    Conflict,
    ConnectionFailed,
    Forbidden,
    InvalidRequest,
    NotFound,
    RetryPolicy,
    Unauthorized,
    WaitTimeout,
)
from consort.client import STREAM_READ_TIMEOUT, _stream_timeout
from tests.conftest import ADMIN_TOKEN
from tests.test_audit_api import server
from tests.test_compute_api import aggregate_task, eval_task, train_task

__all__ = ["server"]  # the uvicorn fixture, shared with the audit tests

FAST = RetryPolicy(attempts=4, base=0.01)
AB = {"process": {"public": False, "authorized_ids": ["org-a", "org-b"]}}
DATA_INPUTS = {"opener": {"kind": "DATA_MANAGER"},
               "datasamples": {"kind": "DATA_SAMPLE", "multiple": True}}


@dataclass
class Federation:
    """Three organizations, a data manager and a sample for a and b, three functions
    (attribute names as the compute tests' Network, so their task builders apply)."""

    tokens: dict[str, str]
    dm: dict[str, str] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)
    train: str = ""
    aggregate: str = ""
    test: str = ""


async def federation(connect: Callable[[str], AsyncClient]) -> Federation:
    async with connect(ADMIN_TOKEN) as admin:
        tokens = {}
        for org in ("org-a", "org-b", "org-c"):
            created = await admin.register_organization(
                org, org.upper(), model_export_enabled=org == "org-a")
            tokens[org] = created.token.token
    fed = Federation(tokens)
    for org in ("org-a", "org-b"):
        async with connect(tokens[org]) as api:
            dm = await api.add_data_manager(f"data of {org}", opener=f"# {org}\n".encode(),
                                            permissions=AB)
            fed.dm[org] = dm.key
            sample = await api.add_data_sample([dm.key], "0" * 64, f"/data/{org}")
            fed.samples[org] = sample.key
    async with connect(tokens["org-a"]) as api:
        for name, inputs, outputs in (
            ("train", DATA_INPUTS | {"model": {"kind": "MODEL", "optional": True}},
             {"model": {"kind": "MODEL"}}),
            ("aggregate", {"models": {"kind": "MODEL", "multiple": True}},
             {"model": {"kind": "MODEL"}}),
            ("test", DATA_INPUTS | {"model": {"kind": "MODEL"}},
             {"performance": {"kind": "PERFORMANCE"}}),
        ):
            fn = await api.add_function(name, image="busybox:latest", inputs=inputs,
                                        outputs=outputs, command=["sh", "-c", "true"],
                                        permissions={"process": {"public": True}})
            setattr(fed, name, fn.key)
    return fed


def asgi(runtime: Runtime, transport: httpx.AsyncBaseTransport | None = None
         ) -> Callable[[str], AsyncClient]:
    app_transport = transport or httpx.ASGITransport(app=create_app(runtime,
                                                                    manage_runtime=False))
    return lambda token: AsyncClient("http://consort.test", token, transport=app_transport,
                                     retry=FAST)


@pytest.fixture
async def fed(runtime: Runtime) -> Federation:
    return await federation(asgi(runtime))


def dockerfile_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b"FROM busybox\n"
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def test_async_client_covers_every_endpoint(
    runtime: Runtime, fed: Federation, tmp_path: Path
) -> None:
    connect = asgi(runtime)
    a, b, c = (connect(fed.tokens[o]) for o in ("org-a", "org-b", "org-c"))
    admin = connect(ADMIN_TOKEN)

    # organizations, tokens, identity
    assert [o.id async for o in a.iter_organizations(page_size=2)] == ["org-a", "org-b",
                                                                        "org-c"]
    assert (await b.get_organization("org-a")).model_export_enabled is True
    me = await a.me()
    assert me.kind == "org" and me.org == "org-a"
    issued = await a.issue_token("ci")
    assert issued.info.org == "org-a" and issued.token
    assert (await connect(issued.token).me()).token_id == issued.info.id
    assert issued.info.id in [t.id async for t in a.iter_tokens(page_size=1)]
    assert (await a.revoke_token(issued.info.id)).revoked_at is not None
    with pytest.raises(Unauthorized) as unauthorized:
        await connect(issued.token).me()
    assert unauthorized.value.code == "invalid_token" and unauthorized.value.status == 401
    auditor = await admin.issue_token("audit", role="auditor")
    assert auditor.info.role == "auditor"
    assert (await a.health())["status"] == "ok"

    # files, data managers, samples
    ref = await a.upload_file(b"weights")
    assert ref.size == 7
    dm = await a.get_data_manager(fed.dm["org-a"])
    assert dm.name == "data of org-a" and dm.owner == "org-a"
    assert [d.key async for d in b.iter_data_managers(owner="org-a")] == [dm.key]
    opener = await b.download_opener(dm.key, tmp_path / "opener.py")
    assert opener.read_text() == "# org-a\n"
    with pytest.raises(Forbidden):
        await c.download_opener(dm.key, tmp_path / "nope.py")
    assert not (tmp_path / "nope.py").exists()
    second_dm = await a.add_data_manager("second", opener_checksum=dm.opener_checksum,
                                         metadata={"ward": "7"})
    assert [d.key async for d in b.iter_data_managers(metadata={"ward": "7"})] == [
        second_dm.key]
    assert [d.key async for d in b.iter_data_managers(metadata={"ward": None})] == [
        second_dm.key]
    assert [d.key async for d in b.iter_data_managers(metadata={"ward": "8"})] == []
    linked = await a.link_data_sample(fed.samples["org-a"], [second_dm.key])
    assert set(linked.data_manager_keys) == {dm.key, second_dm.key}
    assert (await a.get_data_sample(linked.key)).location == "/data/org-a"
    assert [s.key async for s in a.iter_data_samples(data_manager_key=second_dm.key)] == [
        linked.key]

    # functions: an archive with a Dockerfile, uploaded with progress, and downloaded back
    seen: list[tuple[int, int | None]] = []
    archive = dockerfile_archive()
    built = await a.add_function(
        "built", image_source="DOCKERFILE_ARCHIVE", image_file=archive,
        outputs={"model": {"kind": "MODEL"}}, environment={"MODE": "x"},
        on_progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(archive), len(archive))
    assert (await b.get_function(built.key)).environment == {"MODE": "x"}
    assert len([f async for f in b.iter_functions(owner="org-a")]) == 4
    saved = await a.download_function_archive(built.key, tmp_path / "fn.tar.gz")
    assert saved.read_bytes() == archive

    # datasets
    source = tmp_path / "b.txt"
    source.write_bytes(b"beta\n")
    files: dict[str, Path | bytes] = {"a.txt": b"alpha\n", "dir/b.txt": source}
    ds = await a.add_dataset("texts", files,
                             permissions={"process": {"public": False,
                                                      "authorized_ids": ["org-b"]}})
    assert ds.total_size == 11
    assert (await b.get_dataset(ds.key)).name == "texts"
    assert [d.key async for d in b.iter_datasets(owner="org-a")] == [ds.key]
    got = await b.download_dataset_file(ds.key, "dir/b.txt", tmp_path / "got.txt")
    assert got.read_bytes() == b"beta\n"
    zipped = await b.download_dataset_zip(ds.key, tmp_path / "ds.zip")
    with zipfile.ZipFile(zipped) as z:
        assert sorted(n for n in z.namelist() if not n.endswith("/")) == ["a.txt", "dir/b.txt"]

    # a compute plan, registered children first in batches of 2
    k = {n: str(uuid.uuid4()) for n in ("ta", "tb", "agg", "testa", "testb")}
    tasks = [eval_task(fed, "org-a", k["testa"], k["agg"]),  # type: ignore[arg-type]
             aggregate_task(fed, k["agg"], k["ta"], k["tb"]),  # type: ignore[arg-type]
             train_task(fed, "org-a", k["ta"]), train_task(fed, "org-b", k["tb"])]  # type: ignore[arg-type]
    progress: list[int] = []
    registered = await a.add_compute_plan("round", tasks, tag="t", batch_size=2,
                                          on_progress=lambda n, total: progress.append(n))
    assert progress == [2, 4] and sorted(registered.task_keys) == sorted(
        k[n] for n in ("ta", "tb", "agg", "testa"))
    plan_key = registered.plan.key
    assert registered.plan.task_count == 4 and registered.plan.status == "CREATED"
    more = await a.add_tasks(plan_key, [eval_task(fed, "org-b", k["testb"], k["agg"])])  # type: ignore[arg-type]
    assert more == [k["testb"]]
    assert [p.key async for p in c.iter_compute_plans(owner="org-a")] == [plan_key]
    todo = [t.key async for t in a.iter_tasks(compute_plan_key=plan_key, status="TODO",
                                               page_size=1)]
    assert sorted(todo) == sorted([k["ta"], k["tb"]])
    assert [t.key async for t in a.iter_tasks(compute_plan_key=plan_key, rank=2)] == [
        k["testa"], k["testb"]]

    # play the workers
    for org_client, key in ((a, k["ta"]), (b, k["tb"])):
        assert (await org_client.start_task(key)).status == "DOING"
        await org_client.append_logs(key, "epoch 1\n")
        await org_client.append_logs(key, b"epoch 2\n")
        model = await org_client.register_model_output(key, "model", file=b"m-" + key.encode())
        assert model.compute_task_key == key
        assert (await org_client.done_task(key)).status == "DONE"
    assert await b.read_logs(k["tb"], tail=1) == "epoch 2\n"
    assert (await c.get_task(k["agg"])).status == "TODO"
    await c.start_task(k["agg"])
    await c.register_model_output(k["agg"], "model", checksum=ref.checksum)
    await c.done_task(k["agg"])
    await a.start_task(k["testa"])
    perf = await a.register_performance_output(k["testa"], "performance", 0.91)
    assert perf.value == 0.91
    done = await a.done_task(k["testa"])
    assert done.status == "DONE"
    await b.start_task(k["testb"])
    failed = await b.fail_task(k["testb"], message="boom")
    assert failed.status == "FAILED" and failed.error_type == "EXECUTION"

    plan = await a.wait_compute_plan(plan_key, timeout=5)
    assert plan.status == "FAILED" and plan.status_counts["DONE"] == 4
    assert (await a.wait_task(k["testa"], timeout=5)).status == "DONE"
    perfs = await c.get_compute_plan_performances(plan_key)
    assert [p.value for p in perfs] == [0.91]
    graph = await b.get_compute_plan_graph(plan_key)
    assert len(graph.nodes) == 5 and len(graph.edges) == 4

    # models
    models = [md async for md in a.iter_models(compute_task_key=k["ta"])]
    assert len(models) == 1 and (await a.get_model(models[0].key)).identifier == "model"
    file = await c.download_model(models[0].key, tmp_path / "model.bin")
    assert file.read_bytes() == b"m-" + k["ta"].encode()

    # cancel a task, a plan
    other = await a.add_compute_plan("other", [train_task(fed, "org-a", str(uuid.uuid4())),  # type: ignore[arg-type]
                                               train_task(fed, "org-a", str(uuid.uuid4()))])  # type: ignore[arg-type]
    first, second = other.task_keys
    assert (await a.cancel_task(first)).status == "CANCELED"
    canceled = await a.cancel_compute_plan(other.plan.key)
    assert canceled.status == "CANCELED" and canceled.status_counts["CANCELED"] == 2

    # the ledger
    audit = connect(auditor.token)
    own = [e async for e in a.iter_events(page_size=50)]
    assert own and {e.org for e in own} == {"org-a"}
    filtered = [e async for e in audit.iter_events(org=["org-b"], asset_kind="compute_task")]
    assert filtered and {e.asset_kind for e in filtered} == {"compute_task"}
    seq = [e.sequence async for e in audit.iter_org_events("org-c", page_size=3)]
    assert seq == list(range(1, len(seq) + 1))
    verified = await audit.verify_ledger("org-a")
    assert verified.ok and verified.entries_checked == len(own)

    # errors carry the problem's code
    with pytest.raises(NotFound) as missing:
        await a.get_task(str(uuid.uuid4()))
    assert missing.value.code == "not_found" and missing.value.status == 404
    with pytest.raises(Forbidden) as wrong:
        await c.cancel_compute_plan(plan_key)
    assert wrong.value.status == 403
    with pytest.raises(InvalidRequest) as transition:
        await a.start_task(second)
    assert transition.value.code == "bad_transition"
    with pytest.raises(InvalidRequest) as bad:
        await a.add_compute_plan("bad", [{"function_key": fed.train, "inputs": []}])
    assert bad.value.code == "missing_input"
    with pytest.raises(Conflict) as conflict:  # a genuine duplicate, not a retry
        await a.add_data_manager("again", opener_checksum=dm.opener_checksum, key=dm.key)
    assert conflict.value.key == dm.key and conflict.value.code == "already_exists"
    with pytest.raises(WaitTimeout):
        await a.wait_compute_plan((await a.add_compute_plan(
            "idle", [train_task(fed, "org-a", str(uuid.uuid4()))])).plan.key, timeout=0.3)  # type: ignore[arg-type]
    for client in (a, b, c, admin, audit):
        await client.aclose()


class LoseResponses(httpx.AsyncBaseTransport):
    """Forwards every request, but for the matching ones throws the first answer away
    and reports a broken connection, as if the server committed and the reply was lost."""

    def __init__(self, inner: httpx.AsyncBaseTransport,
                 match: Callable[[httpx.Request], bool]) -> None:
        self.inner = inner
        self.match = match
        self.lost: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        name = f"{request.method} {request.url.path}"
        if self.match(request) and name not in self.lost:
            await response.aread()
            self.lost.append(name)
            raise httpx.ReadError("connection reset by peer", request=request)
        return response


class RecordLogReads(httpx.AsyncBaseTransport):
    """The app, recording for each log read the offset asked for and the bytes sent."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.reads: list[tuple[int, int]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "GET" and request.url.path.endswith("/logs"):
            body = await response.aread()
            self.reads.append((int(request.url.params.get("offset", "-1")), len(body)))
            return httpx.Response(response.status_code, headers=response.headers,
                                  content=body)
        return response


async def test_follow_logs_emits_each_byte_once_and_stops_when_the_task_is_final(
    runtime: Runtime, fed: Federation
) -> None:
    recorder = RecordLogReads(httpx.ASGITransport(app=create_app(runtime,
                                                                 manage_runtime=False)))
    key = str(uuid.uuid4())
    # The worker's output, cut anywhere: inside "é" (2 bytes) and inside "✓" (3 bytes).
    pieces = [b"epoch 1 loss=0.9\n", b"epoch 2 caf\xc3", b"\xa9 \xe2\x9c",
              b"\x93\n" + b"y" * 70_000 + b"\n"]
    last = b"done\n"
    whole = b"".join(pieces) + last
    emitted: list[str] = []
    async with asgi(runtime, recorder)(fed.tokens["org-a"]) as a:
        await a.add_compute_plan("follow", [train_task(fed, "org-a", key)])  # type: ignore[arg-type]
        await a.start_task(key)
        await a.append_logs(key, pieces[0])

        async def follow() -> None:
            # The worker appends the next piece each time the follower emits, so every
            # poll finds at most one new piece; the last one comes with the end.
            async for text in a.follow_logs(key, poll=0.05):
                emitted.append(text)
                if len(emitted) < len(pieces):
                    await a.append_logs(key, pieces[len(emitted)])
                elif len(emitted) == len(pieces):
                    await a.append_logs(key, last)
                    await a.register_model_output(key, "model", file=b"m")
                    await a.done_task(key)

        await asyncio.wait_for(follow(), 30)  # ends by itself once the task is DONE
        assert emitted == ["epoch 1 loss=0.9\n", "epoch 2 caf", "\u00e9 ",
                           "\u2713\n" + "y" * 70_000 + "\n", "done\n"]
        assert "".join(emitted).encode() == whole
        # Each poll asked for what came after the bytes it had: every byte sent once.
        offsets = [offset for offset, _ in recorder.reads]
        sizes = [size for _, size in recorder.reads]
        assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
        assert sum(sizes) == len(whole) and len(recorder.reads) >= len(emitted)

        # reading by hand from an offset
        assert await a.read_logs(key, offset=len(whole) - 5) == "done\n"
        piece = await a.read_log_bytes(key, offset=29)  # inside "é"
        assert piece.data == whole[29:] and piece.data.startswith(b"\xa9")
        assert piece.size == piece.next_offset == len(whole)
        with pytest.raises(InvalidRequest) as refused:
            await a.read_logs(key, offset=1, head=1)
        assert refused.value.code == "invalid_request"


async def test_read_log_bytes_from_a_server_without_offsets_cuts_the_whole_log() -> None:
    def old_server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="epoch 1\nepoch 2\n")  # no size, offset ignored

    async with AsyncClient("http://old.test", "t",
                           transport=httpx.MockTransport(old_server)) as client:
        piece = await client.read_log_bytes("k", offset=8)
    assert piece.data == b"epoch 2\n" and piece.size == 16


async def test_retried_registrations_that_meet_their_own_409_succeed(
    runtime: Runtime, fed: Federation
) -> None:
    app = httpx.ASGITransport(app=create_app(runtime, manage_runtime=False))
    lossy = LoseResponses(app, lambda r: r.method in ("POST", "DELETE"))
    async with asgi(runtime, lossy)(fed.tokens["org-a"]) as a, \
            asgi(runtime, lossy)(fed.tokens["org-b"]) as b:
        dm = await a.add_data_manager("lost", opener=b"# lost\n")
        assert (await a.get_data_manager(dm.key)).name == "lost"
        keys = [str(uuid.uuid4()) for _ in range(3)]
        tasks = [train_task(fed, "org-a", keys[0]),  # type: ignore[arg-type]
                 train_task(fed, "org-a", keys[1], parent=keys[0]),  # type: ignore[arg-type]
                 train_task(fed, "org-b", keys[2])]  # type: ignore[arg-type]
        plan = await a.add_compute_plan("lossy", tasks, batch_size=2)
        assert sorted(plan.task_keys) == sorted(keys) and plan.plan.task_count == 3
        assert (await b.start_task(keys[2])).status == "DOING"
        model = await b.register_model_output(keys[2], "model", file=b"weights")
        assert model.checksum == model.checksum.lower() and model.identifier == "model"
        assert (await b.done_task(keys[2])).status == "DONE"
        with pytest.raises(ConnectionFailed) as lost:  # not idempotent: never re-sent
            await a.issue_token("x")
        assert "after 1 attempt" in lost.value.detail
    assert "POST /compute_plans" in lossy.lost
    assert f"POST /compute_plans/{plan.plan.key}/tasks" in lossy.lost
    assert f"POST /tasks/{keys[2]}/actions" in lossy.lost
    assert f"POST /tasks/{keys[2]}/outputs/model/model" in lossy.lost


async def test_a_request_that_never_reaches_the_server_is_retried_then_fails() -> None:
    calls: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise httpx.ConnectError("connection refused", request=request)

    async with AsyncClient("http://nowhere.test", "t", retry=FAST,
                           transport=httpx.MockTransport(refuse)) as api:
        with pytest.raises(ConnectionFailed) as failed:
            await api.issue_token("x")
    assert len(calls) == FAST.attempts and "after 4 attempts" in failed.value.detail


async def test_big_plans_are_sent_in_topological_batches(
    runtime: Runtime, fed: Federation
) -> None:
    keys = [str(uuid.uuid4()) for _ in range(60)]
    chain = [train_task(fed, "org-a", key, parent=keys[i - 1] if i else None)  # type: ignore[arg-type]
             for i, key in enumerate(keys)]
    random.Random(7).shuffle(chain)
    async with asgi(runtime)(fed.tokens["org-a"]) as a:
        registered = await a.add_compute_plan("chain", chain, batch_size=7)
        assert registered.task_keys == keys and registered.plan.task_count == 60
        ranks = {t.key: t.rank async for t in a.iter_tasks(
            compute_plan_key=registered.plan.key, page_size=25)}
    assert [ranks[k] for k in keys] == list(range(60))


class CutStreams(httpx.BaseTransport):
    """Ends the first `cuts` event streams after their first chunk (a dropped
    connection) and records the Last-Event-ID of every stream request."""

    def __init__(self, cuts: int) -> None:
        self.inner = httpx.HTTPTransport()
        self.cuts = cuts
        self.resumed_from: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path == "/ledger/stream":
            self.resumed_from.append(request.headers.get("Last-Event-ID"))
            if self.cuts > 0:
                self.cuts -= 1
                response.stream = FirstChunkOnly(response.stream)
        return response

    def close(self) -> None:
        self.inner.close()


class FirstChunkOnly(httpx.SyncByteStream):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            yield chunk
            return

    def close(self) -> None:
        self.inner.close()


def sync_scenario(url: str, fed: Federation, auditor: str) -> None:
    """The blocking client end to end, in a worker thread."""
    a = Client(url, fed.tokens["org-a"], retry=FAST)
    admin = Client(url, ADMIN_TOKEN)
    cut = CutStreams(cuts=1)
    with a, admin, Client(url, auditor, transport=cut) as audit:
        assert a.me().org == "org-a"
        start = max(e.position or 0 for e in audit.iter_events(page_size=1000))
        # follow the ledger live, across a dropped connection
        positions: list[int] = []
        for event in audit.follow_events(after=start - 2, reconnect_delay=0.05):
            assert event.position is not None
            positions.append(event.position)
            if len(positions) == 2:  # the connection is cut after the first chunk
                admin.issue_token("live 1", org="org-c")
                admin.issue_token("live 2", org="org-c")
            if len(positions) == 4:
                break
        assert positions == [start - 1, start, start + 1, start + 2]
        assert cut.resumed_from[0] == str(start - 2) and cut.resumed_from[1] == str(start)

        # a task, its live log and waiting for it
        key = str(uuid.uuid4())
        plan = a.add_compute_plan("sync", [train_task(fed, "org-a", key)])  # type: ignore[arg-type]
        a.start_task(key)
        a.append_logs(key, "epoch 1\n")
        chunks = []
        for chunk in a.follow_logs(key, poll=0.1):
            chunks.append(chunk)
            if len(chunks) == 1:
                a.append_logs(key, "epoch 2\n")
                a.register_model_output(key, "model", file=b"sync model")
                a.done_task(key)
        assert "".join(chunks) == "epoch 1\nepoch 2\n"
        assert [t.key for t in a.iter_tasks(compute_plan_key=plan.plan.key)] == [key]

        second = str(uuid.uuid4())
        a.add_tasks(plan.plan.key, [train_task(fed, "org-a", second, parent=key)])  # type: ignore[arg-type]
        seen: list[dict[str, int]] = []

        def finish() -> None:
            with Client(url, fed.tokens["org-a"]) as worker:
                worker.start_task(second)
                worker.register_model_output(second, "model", file=b"second")
                worker.done_task(second)

        timer = threading.Timer(0.5, finish)
        timer.start()
        final = a.wait_compute_plan(plan.plan.key, timeout=20, on_progress=seen.append)
        timer.join()
        assert final.status == "DONE" and seen[0] == {**seen[0], "TODO": 1}
        assert seen[-1]["DONE"] == 2
        assert a.wait_task(second, on_progress=seen.append).status == "DONE"
        assert seen[-1] == {"DONE": 1}
        with pytest.raises(NotFound):
            a.get_compute_plan(str(uuid.uuid4()))


async def test_sync_client_and_event_stream_against_a_real_server(
    runtime: Runtime, server: str, fed: Federation
) -> None:
    async with AsyncClient(server, ADMIN_TOKEN) as admin:
        auditor = (await admin.issue_token("audit", role="auditor")).token
    await asyncio.wait_for(asyncio.to_thread(sync_scenario, server, fed, auditor), 60)


async def test_a_download_whose_bytes_do_not_match_the_announced_checksum_is_refused(
    runtime: Runtime, fed: Federation, tmp_path: Path
) -> None:
    a = asgi(runtime)(fed.tokens["org-a"])
    dm = await a.get_data_manager(fed.dm["org-a"])
    into = tmp_path / "downloads"
    assert (await a.download_opener(dm.key, into / "ok.py")).read_text() == "# org-a\n"
    # The stored file rots on the server's disk: the server still announces its SHA-256.
    assert isinstance(runtime.artifacts, FilesystemArtifactStore)
    stored = runtime.artifacts.path(dm.opener_checksum)
    stored.chmod(0o644)
    stored.write_bytes(b"# rotten\n")
    with pytest.raises(ChecksumMismatch) as refused:
        await a.download_opener(dm.key, into / "bad.py")
    assert refused.value.code == "checksum_mismatch"
    assert await asyncio.to_thread(os.listdir, into) == ["ok.py"]  # nor a .part file


async def test_a_runner_leases_its_task_and_fetches_inputs_for_it(
    runtime: Runtime, fed: Federation, tmp_path: Path
) -> None:
    connect = asgi(runtime)
    a, b, c = (connect(fed.tokens[o]) for o in ("org-a", "org-b", "org-c"))
    tb, agg = str(uuid.uuid4()), str(uuid.uuid4())
    await a.add_compute_plan("leased", [train_task(fed, "org-b", tb),  # type: ignore[arg-type]
                                        aggregate_task(fed, agg, tb)])  # type: ignore[arg-type]

    # start takes a lease; the same runner's start sent again gets the same one
    started = await b.task_action(tb, "start", runner_id="r1", lease_seconds=60)
    assert started.status == "DOING" and started.lease is not None
    again = await b.task_action(tb, "start", runner_id="r1", lease_seconds=60)
    assert again.lease is not None and again.lease.attempt == started.lease.attempt
    with pytest.raises(Conflict) as leased:
        await b.task_action(tb, "start", runner_id="r2")
    assert leased.value.code == "task_leased"
    renewed = await b.renew_lease(tb, "r1", lease_seconds=60)
    assert renewed.status == "DOING" and renewed.lease.expires_at >= started.lease.expires_at
    model = await b.register_model_output(tb, "model", file=b"weights of b")
    with pytest.raises(Conflict) as lost:
        await b.task_action(tb, "done", runner_id="r2")
    assert lost.value.code == "lease_lost"
    assert (await b.task_action(tb, "done", runner_id="r1")).status == "DONE"

    # org-b allows no export: org-c gets the model only for its task that takes it
    with pytest.raises(Forbidden) as refused:
        await c.download_model(model.key, tmp_path / "export.bin")
    assert refused.value.code == "model_export_disabled"
    got = await c.download_model(model.key, tmp_path / "m.bin", for_task=agg,
                                 checksum=model.checksum.upper())
    assert got.read_bytes() == b"weights of b"
    # ... checked against the checksum the caller expects, too
    with pytest.raises(ChecksumMismatch):
        await c.download_model(model.key, tmp_path / "bad" / "m.bin", for_task=agg,
                               checksum="0" * 64)
    assert await asyncio.to_thread(os.listdir, tmp_path / "bad") == []
    dm = await c.get_data_manager(fed.dm["org-a"])
    with pytest.raises(ChecksumMismatch):
        await b.download_opener(dm.key, tmp_path / "opener.py", checksum="f" * 64)

    # a runner shutting down gives its task back
    await c.task_action(agg, "start", runner_id="r3")
    released = await c.release_lease(agg, "r3")
    assert released.task_key == agg and released.lease.runner_id == "r3"
    for client in (a, b, c):
        await client.aclose()


async def test_requests_carry_the_client_timeouts_and_streams_wait_longer() -> None:
    assert _stream_timeout(httpx.Timeout(7.0, connect=2.0)) == httpx.Timeout(
        7.0, connect=2.0, read=STREAM_READ_TIMEOUT)
    seen: list[dict[str, float | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json={"status": "ok"})

    async with AsyncClient("http://t.test", "t", timeout=httpx.Timeout(7.0, connect=2.0),
                           transport=httpx.MockTransport(answer)) as client:
        await client.health()
    with Client("http://t.test", "t", timeout=3.0,
                transport=httpx.MockTransport(answer)) as blocking:
        blocking.health()
    assert seen == [{"connect": 2.0, "read": 7.0, "write": 7.0, "pool": 7.0},
                    {"connect": 3.0, "read": 3.0, "write": 3.0, "pool": 3.0}]
