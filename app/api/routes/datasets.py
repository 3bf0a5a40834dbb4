"""OASIS datasets (named sets of files), task dataset outputs, and task logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import Field

from app.api import schemas_out as out
from app.api.asset_views import (
    asset_exists,
    asset_row,
    list_assets,
    require_logs_permission,
    resolve_permissions,
)
from app.api.compute import acting_org
from app.api.deps import PrincipalDep, RuntimeDep
from app.api.files import Download, ZipDownload, binary, file_response
from app.api.filters import MetadataQuery
from app.api.pagination import MAX_LIMIT, Page
from app.api.problems import ApiProblem
from app.api.schemas_assets import Metadata, PermissionsIn, Strict
from app.domain import registration as rules
from app.domain.errors import Forbidden, InvalidCommand, NotFound
from app.domain.functions import OutputKind
from app.domain.organizations import Principal
from app.domain.permissions import Permission
from app.domain.tasks import check_output_registration
from app.projections import queries as q
from app.runtime import Runtime
from app.storage.archives import zip_files_async
from app.storage.artifacts import FilesystemArtifactStore

router = APIRouter(tags=["datasets"])
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
LOG_CHUNK_MAX = 1024 * 1024
LOG_SIZE_HEADER = "Consort-Log-Size"
LOG_OFFSET_MAX = 2**63 - 1  # PostgreSQL's bigint


class DatasetFileIn(Strict):
    path: str = Field(min_length=1, max_length=1024)
    checksum: str = Field(description="SHA-256 of a file uploaded with POST /files")


class DatasetIn(Strict):
    key: uuid.UUID | None = None
    name: str = Field(min_length=1, max_length=200)
    files: list[DatasetFileIn] = Field(max_length=100_000)
    permissions: PermissionsIn = Field(default_factory=PermissionsIn)
    metadata: Metadata = Field(default_factory=dict)


class DatasetOutputIn(Strict):
    name: str = Field(default="", max_length=200)
    files: list[DatasetFileIn] = Field(max_length=100_000)


async def _files(runtime: Runtime, files: list[DatasetFileIn]) -> list[dict[str, Any]]:
    described = []
    for f in files:
        checksum = f.checksum.lower()
        if not await runtime.artifacts.exists(checksum):
            raise InvalidCommand(f"no uploaded file has checksum {checksum} ({f.path})",
                                 code="unknown_file")
        described.append({"path": f.path, "checksum": checksum,
                          "size": await runtime.artifacts.size(checksum)})
    return described


@router.post("/datasets", status_code=status.HTTP_201_CREATED, response_model=out.Dataset)
async def register_dataset(
    body: DatasetIn, actor: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """A dataset of files uploaded beforehand with POST /files."""
    org = acting_org(actor)
    key = str(body.key or uuid.uuid4())
    event = rules.register_dataset(
        org, key, await asset_exists(runtime, key), body.name, await _files(runtime, body.files),
        await resolve_permissions(runtime, body.permissions, org), body.metadata,
    )
    await runtime.record(actor, org, [event], {f"dataset/{key}": 0})
    return await asset_row(runtime, "datasets", key)


@router.get("/datasets", response_model=Page[out.Dataset])
async def list_datasets(
    _: PrincipalDep, runtime: RuntimeDep, metadata: MetadataQuery, owner: str | None = None,
    compute_task_key: str | None = None, cursor: str | None = None, limit: Limit = 100,
) -> dict[str, Any]:
    return await list_assets(runtime, "datasets", cursor, limit, owner, metadata,
                             "AND ($6::text IS NULL OR compute_task_key = $6)",
                             (compute_task_key,))


@router.get("/datasets/{key}", response_model=out.Dataset)
async def get_dataset(key: str, _: PrincipalDep, runtime: RuntimeDep) -> dict[str, Any]:
    return await asset_row(runtime, "datasets", key)


async def _require_download(
    runtime: Runtime, actor: Principal, row: dict[str, Any], for_task: str | None
) -> None:
    """Download permission, or process permission for `for_task`: an open (TODO/DOING)
    task of the caller's that takes this dataset as input (how a runner fetches its
    inputs)."""
    if actor.kind == "admin":
        return
    perm = Permission.from_json(row["permissions"]["download"])
    if actor.org is not None and perm.allows(actor.org):
        return
    process = Permission.from_json(row["permissions"]["process"])
    if actor.org is not None and for_task is not None and process.allows(actor.org):
        async with runtime.pool.acquire() as conn:
            if await q.is_input_of_open_task(conn, actor.org, for_task, row["key"],
                                                row.get("compute_task_key"),
                                                row.get("identifier")):
                return
    raise Forbidden(f"{actor.org or actor.kind} may not download dataset {row['key']}")


@router.get("/datasets/{key}/files/{path:path}", response_model=None, response_class=Download,
             responses=binary("One file of the dataset"))
async def download_dataset_file(
    key: str, path: str, actor: PrincipalDep, runtime: RuntimeDep, for_task: str | None = None,
) -> StreamingResponse:
    row = await asset_row(runtime, "datasets", key)
    await _require_download(runtime, actor, row, for_task)
    match = next((f for f in row["files"] if f["path"] == path), None)
    if match is None:
        raise NotFound(f"dataset {key} has no file {path!r}")
    return await file_response(runtime.artifacts, match["checksum"], Path(path).name)


@router.get("/datasets/{key}/zip", response_model=None, response_class=ZipDownload,
             responses=binary("The whole dataset as a zip", "application/zip"))
async def download_dataset_zip(
    key: str, actor: PrincipalDep, runtime: RuntimeDep, for_task: str | None = None,
) -> StreamingResponse:
    """The whole dataset as one zip, its file tree preserved."""
    row = await asset_row(runtime, "datasets", key)
    await _require_download(runtime, actor, row, for_task)
    store = runtime.artifacts
    if not isinstance(store, FilesystemArtifactStore):
        raise ApiProblem(501, "not_supported", "zip downloads need the filesystem store")
    fd, name = tempfile.mkstemp(suffix=".zip")
    os.close(fd)
    try:
        await zip_files_async([(f["path"], store.path(f["checksum"])) for f in row["files"]],
                              name)
    except BaseException:
        os.unlink(name)
        raise

    async def chunks() -> AsyncIterator[bytes]:
        try:
            with open(name, "rb") as handle:  # noqa: ASYNC230 - small reads, tmpfs-backed
                while chunk := handle.read(1024 * 1024):
                    yield chunk
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    return StreamingResponse(chunks(), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{key}.zip"',
        "Content-Length": str(await asyncio.to_thread(os.path.getsize, name))})


@router.post("/tasks/{key}/outputs/{identifier}/dataset", status_code=status.HTTP_201_CREATED,
             response_model=out.Dataset)
async def register_dataset_output(
    key: str, identifier: str, body: DatasetOutputIn, actor: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """The worker registers the files its task wrote to output/ as a dataset."""
    org = acting_org(actor)
    async with runtime.pool.acquire() as conn:
        tasks, versions = await q.tasks(conn, [key])
        if key not in tasks:
            raise NotFound(f"no compute task {key}")
        count = (await q.registered_outputs(conn, key)).get(identifier, 0)
    task = tasks[key]
    output = check_output_registration(task, identifier, OutputKind.DATASET, org, count)
    dataset_key = str(uuid.uuid4()) if output.multiple else str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"consort:{key}/{identifier}"))
    event = rules.register_dataset(
        task.worker, dataset_key, False, body.name or f"{identifier} of {key}",
        await _files(runtime, body.files), output.permissions, {},
        compute_task_key=key, identifier=identifier,
    )
    expected = {f"compute_task/{key}": versions[key]}
    if not output.multiple:
        expected[f"dataset/{dataset_key}"] = 0
    await runtime.record(actor, org, [event], expected)
    return await asset_row(runtime, "datasets", dataset_key)


# --- logs -------------------------------------------------------------------------------------

@router.post("/tasks/{key}/logs", status_code=status.HTTP_204_NO_CONTENT)
async def append_logs(key: str, request: Request, actor: PrincipalDep,
                      runtime: RuntimeDep) -> None:
    """The worker appends output (stdout/stderr) to the task's log while it runs."""
    org = acting_org(actor)
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT worker, status FROM compute_tasks WHERE key = $1", key)
    if row is None:
        raise NotFound(f"no compute task {key}")
    if row["worker"] != org:
        raise Forbidden(f"only the worker {row['worker']} writes the log of {key}",
                        code="wrong_sender")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > LOG_CHUNK_MAX:
            raise ApiProblem(413, "too_large", f"send logs in pieces of at most {LOG_CHUNK_MAX}"
                             " bytes")
    if data:
        await runtime.logs.append(key, bytes(data))


@router.get("/tasks/{key}/logs", response_class=PlainTextResponse, responses={200: {
    "description": "The log, or the part of it asked for",
    "headers": {LOG_SIZE_HEADER: {"description": "The whole log's size in bytes when it was "
                                  "read: the offset to ask for next",
                                  "schema": {"type": "integer"}}}}})
async def read_logs(
    key: str, actor: PrincipalDep, runtime: RuntimeDep,
    head: Annotated[int | None, Query(ge=1, description="The first lines only")] = None,
    tail: Annotated[int | None, Query(ge=1, description="The last lines only")] = None,
    offset: Annotated[int | None, Query(
        ge=0, le=LOG_OFFSET_MAX,
        description=f"Only the bytes after the first `offset` (the {LOG_SIZE_HEADER} of "
                    "the previous read, to follow the log)")] = None,
) -> PlainTextResponse:
    """The task's log (stdout and stderr), whole, its first/last lines, or the bytes after
    an offset; readable live. Every answer carries the log's size so far in bytes in the
    `Consort-Log-Size` header.

    The whole log and offset reads are the bytes as the task wrote them: a read may start
    or end inside a multibyte UTF-8 character (the worker ships output in pieces cut
    anywhere), so a follower keeps the bytes and decodes them as a stream. `head` and
    `tail` decode the log (bytes that are not UTF-8 become U+FFFD) and cut whole lines.
    """
    await require_logs_permission(runtime, actor, key)
    if head is not None and tail is not None:
        raise InvalidCommand("ask for head or tail, not both", code="invalid_request")
    if offset is not None and (head is not None or tail is not None):
        # An offset counts bytes, head and tail count lines: together they mean nothing.
        raise InvalidCommand("ask for an offset or for head/tail lines, not both",
                             code="invalid_request")
    log = await runtime.logs.read(key, offset or 0)
    size = {LOG_SIZE_HEADER: str(log.size)}
    if head is None and tail is None:
        return PlainTextResponse(log.data, headers=size)
    lines = log.data.decode("utf-8", errors="replace").splitlines(keepends=True)
    if head is not None:
        lines = lines[:head]
    elif tail is not None:
        lines = lines[-tail:]
    return PlainTextResponse("".join(lines), headers=size)
