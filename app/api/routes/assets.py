"""Files, data managers, data samples, functions and datasets.

Files are uploaded first (streamed, checksummed, size-limited) and assets then refer to
them by SHA-256, so a registration is a small JSON request that is safe to retry.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import Field

from app.api import schemas_out as out
from app.api.asset_views import asset_exists, asset_row, list_assets, resolve_permissions
from app.api.compute import acting_org
from app.api.deps import PrincipalDep, RuntimeDep
from app.api.files import Download, binary, file_response
from app.api.filters import MetadataQuery
from app.api.pagination import MAX_LIMIT, Page
from app.api.schemas_assets import (
    InputSpecIn,
    Metadata,
    OutputSpecIn,
    PermissionIn,
    PermissionsIn,
    Strict,
)
from app.domain import registration as rules
from app.domain.errors import Forbidden, InvalidCommand, NotFound
from app.domain.functions import ImageSource, InputSpec, OutputSpec
from app.domain.organizations import Principal
from app.domain.permissions import Permission
from app.projections import queries as q
from app.runtime import Runtime
from app.storage.archives import has_root_dockerfile_async
from app.storage.artifacts import FilesystemArtifactStore

router = APIRouter(tags=["assets"])
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]


# --- files ------------------------------------------------------------------------------------

@router.post("/files", status_code=status.HTTP_201_CREATED, response_model=out.FileRef)
async def upload_file(
    request: Request, actor: PrincipalDep, runtime: RuntimeDep,
    x_content_sha256: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """Stream a file into the artifact store (body = the bytes); returns its SHA-256.

    Send `X-Content-SHA256` to have the upload verified. Uploading the same bytes twice is
    harmless: the store is content-addressed.
    """
    acting_org(actor)
    stored = await runtime.artifacts.put_stream(
        request.stream(), max_bytes=runtime.max_upload_bytes, expected_sha256=x_content_sha256
    )
    return {"checksum": stored.sha256, "size": stored.size}


async def _stream_file(runtime: Runtime, checksum: str, filename: str) -> StreamingResponse:
    return await file_response(runtime.artifacts, checksum, filename)


def _require_process(actor: Principal, perms: Any, what: str) -> None:
    if actor.kind == "admin":
        return
    if actor.org is None or not Permission.from_json(perms["process"]).allows(actor.org):
        raise Forbidden(f"{actor.org or actor.kind} may not process {what}")


# --- data managers ----------------------------------------------------------------------------

class DataManagerIn(Strict):
    key: uuid.UUID | None = None
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=10_000)
    opener_checksum: str
    permissions: PermissionsIn = Field(default_factory=PermissionsIn)
    logs_permission: PermissionIn | None = None
    metadata: Metadata = Field(default_factory=dict)


@router.post("/data_managers", status_code=status.HTTP_201_CREATED,
             response_model=out.DataManager)
async def register_data_manager(
    body: DataManagerIn, actor: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    org = acting_org(actor)
    key = str(body.key or uuid.uuid4())
    perms = await resolve_permissions(runtime, body.permissions, org)
    logs = (await resolve_permissions(runtime, PermissionsIn(process=body.logs_permission), org)
            ).process if body.logs_permission else perms.process
    event = rules.register_data_manager(
        org, key, await asset_exists(runtime, key), body.name, body.description,
        body.opener_checksum, await runtime.artifacts.exists(body.opener_checksum.lower()),
        perms, logs, body.metadata,
    )
    await runtime.record(actor, org, [event], {f"data_manager/{key}": 0})
    return await asset_row(runtime, "data_managers", key)


@router.get("/data_managers", response_model=Page[out.DataManager])
async def list_data_managers(
    _: PrincipalDep, runtime: RuntimeDep, metadata: MetadataQuery, owner: str | None = None,
    cursor: str | None = None, limit: Limit = 100,
) -> dict[str, Any]:
    return await list_assets(runtime, "data_managers", cursor, limit, owner, metadata)


@router.get("/data_managers/{key}", response_model=out.DataManager)
async def get_data_manager(key: str, _: PrincipalDep, runtime: RuntimeDep) -> dict[str, Any]:
    return await asset_row(runtime, "data_managers", key)


@router.get("/data_managers/{key}/opener", response_model=None, response_class=Download,
             responses=binary("The opener (a Python file)"))
async def download_opener(key: str, actor: PrincipalDep, runtime: RuntimeDep) -> StreamingResponse:
    """The opener, for organizations that may process the data manager."""
    row = await asset_row(runtime, "data_managers", key)
    _require_process(actor, row["permissions"], f"data manager {key}")
    return await _stream_file(runtime, row["opener_checksum"], "opener.py")


# --- data samples -----------------------------------------------------------------------------

class DataSampleIn(Strict):
    key: uuid.UUID | None = None
    data_manager_keys: list[str] = Field(min_length=1)
    checksum: str
    location: str = Field(min_length=1, max_length=4096,
                          description="A path or URI the owner's runners can read")
    metadata: Metadata = Field(default_factory=dict)


class DataSampleLinkIn(Strict):
    data_manager_keys: list[str] = Field(min_length=1)


async def _dm_owners(runtime: Runtime, keys: list[str]) -> dict[str, str | None]:
    async with runtime.pool.acquire() as conn:
        found = await q.data_managers(conn, keys)
    return {k: found[k].owner if k in found else None for k in keys}


@router.post("/data_samples", status_code=status.HTTP_201_CREATED,
             response_model=out.DataSample)
async def register_data_sample(
    body: DataSampleIn, actor: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """Register a sample by location and checksum: its bytes never reach the service."""
    org = acting_org(actor)
    key = str(body.key or uuid.uuid4())
    event = rules.register_data_sample(
        org, key, await asset_exists(runtime, key),
        await _dm_owners(runtime, body.data_manager_keys), body.checksum.lower(),
        body.location, body.metadata,
    )
    await runtime.record(actor, org, [event], {f"data_sample/{key}": 0})
    return await asset_row(runtime, "data_samples", key)


@router.post("/data_samples/{key}/data_managers", response_model=out.DataSample)
async def link_data_sample(
    key: str, body: DataSampleLinkIn, actor: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """The owner links an existing sample to more of its data managers."""
    org = acting_org(actor)
    row = await asset_row(runtime, "data_samples", key)
    event = rules.link_data_sample(org, key, row["owner"], row["data_manager_keys"],
                                   await _dm_owners(runtime, body.data_manager_keys))
    await runtime.record(actor, org, [event])
    return await asset_row(runtime, "data_samples", key)


@router.get("/data_samples", response_model=Page[out.DataSample])
async def list_data_samples(
    _: PrincipalDep, runtime: RuntimeDep, metadata: MetadataQuery, owner: str | None = None,
    data_manager_key: str | None = None, cursor: str | None = None, limit: Limit = 100,
) -> dict[str, Any]:
    return await list_assets(runtime, "data_samples", cursor, limit, owner, metadata,
                             "AND ($6::text IS NULL OR data_manager_keys @> ARRAY[$6])",
                             (data_manager_key,))


@router.get("/data_samples/{key}", response_model=out.DataSample)
async def get_data_sample(key: str, _: PrincipalDep, runtime: RuntimeDep) -> dict[str, Any]:
    return await asset_row(runtime, "data_samples", key)


# --- functions --------------------------------------------------------------------------------

class FunctionIn(Strict):
    key: uuid.UUID | None = None
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=10_000)
    permissions: PermissionsIn = Field(default_factory=PermissionsIn)
    inputs: dict[str, InputSpecIn] = Field(default_factory=dict)
    outputs: dict[str, OutputSpecIn] = Field(default_factory=dict)
    image_source: ImageSource
    image: str = Field(min_length=1, max_length=500, description=(
        "SHA-256 of the uploaded archive/tarball, or the image reference"))
    command: list[str] = Field(default_factory=list)
    entrypoint: list[str] | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    gpu: bool = False
    metadata: Metadata = Field(default_factory=dict)


@router.post("/functions", status_code=status.HTTP_201_CREATED,
             response_model=out.Function)
async def register_function(
    body: FunctionIn, actor: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    org = acting_org(actor)
    key = str(body.key or uuid.uuid4())
    stored = body.image_source is not ImageSource.IMAGE_REFERENCE and \
        await runtime.artifacts.exists(body.image.lower())
    if stored and body.image_source is ImageSource.DOCKERFILE_ARCHIVE:
        await _check_dockerfile_archive(runtime, body.image.lower())
    event = rules.register_function(
        org, key, await asset_exists(runtime, key), body.name, body.description,
        await resolve_permissions(runtime, body.permissions, org),
        {n: InputSpec(s.kind, s.multiple, s.optional) for n, s in body.inputs.items()},
        {n: OutputSpec(s.kind, s.multiple) for n, s in body.outputs.items()},
        body.image_source,
        body.image if body.image_source is ImageSource.IMAGE_REFERENCE else body.image.lower(),
        stored, body.command, body.entrypoint, body.environment, body.gpu, body.metadata,
    )
    await runtime.record(actor, org, [event], {f"function/{key}": 0})
    return await asset_row(runtime, "functions", key)


async def _check_dockerfile_archive(runtime: Runtime, checksum: str) -> None:
    """Refuse hostile archives (UnsafeArchive → 400) and ones with no root Dockerfile."""
    store = runtime.artifacts
    if isinstance(store, FilesystemArtifactStore) and not await has_root_dockerfile_async(
        store.path(checksum)
    ):
        raise InvalidCommand("the archive has no Dockerfile at its root",
                             code="missing_dockerfile")


@router.get("/functions", response_model=Page[out.Function])
async def list_functions(
    _: PrincipalDep, runtime: RuntimeDep, metadata: MetadataQuery, owner: str | None = None,
    cursor: str | None = None, limit: Limit = 100,
) -> dict[str, Any]:
    return await list_assets(runtime, "functions", cursor, limit, owner, metadata)


@router.get("/functions/{key}", response_model=out.Function)
async def get_function(key: str, _: PrincipalDep, runtime: RuntimeDep) -> dict[str, Any]:
    return await asset_row(runtime, "functions", key)


@router.get("/functions/{key}/archive", response_model=None, response_class=Download,
             responses=binary("The function's archive or image tarball"))
async def download_function(
    key: str, actor: PrincipalDep, runtime: RuntimeDep
) -> StreamingResponse:
    """The function's archive or image tarball, for organizations that may process it."""
    row = await asset_row(runtime, "functions", key)
    _require_process(actor, row["permissions"], f"function {key}")
    if row["image_source"] == ImageSource.IMAGE_REFERENCE:
        raise NotFound(f"function {key} refers to image {row['image']}; it has no file")
    return await _stream_file(runtime, row["image"], f"{key}.tar")
