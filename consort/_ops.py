"""Every API operation, written once as a sans-I/O generator (see `_protocol`).

`Client` and `AsyncClient` expose these as methods; this module decides the requests,
how answers are parsed, and how a retried registration that meets a 409 naming its own
key is turned back into the success it was.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel

from app.api.routes.datasets import LOG_SIZE_HEADER
from consort import models as m
from consort._protocol import (
    CLOSE_STREAM,
    NEXT_LINE,
    Call,
    Emit,
    Op,
    OpenStream,
    Params,
    Progress,
    Sleep,
    SseParser,
    Upload,
    backoff,
)
from consort.errors import Conflict, ConnectionFailed, InvalidRequest, ServerError, WaitTimeout

M = TypeVar("M", bound=BaseModel)
FileSource = Path | str | bytes
StatusCounts = Callable[[dict[str, int]], None]


def _parse(model: type[M], response: httpx.Response) -> M:
    return model.model_validate(response.json())


def _params(**values: Any) -> Params:
    """Query parameters without the unset ones; lists become repeated parameters."""
    out: list[tuple[str, str | int | float | bool]] = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            out += [(name, str(v)) for v in value]
        else:
            out.append((name, value))
    return out


def _body(model: BaseModel) -> Any:
    return model.model_dump(mode="json", exclude_none=True)


def _get(model: type[M], path: str, **params: Any) -> Op[M]:
    response = yield Call("GET", path, _params(**params))
    return _parse(model, response)


def _register(model: type[M], path: str, body: BaseModel, key: str, get_path: str) -> Op[M]:
    """POST a registration under a client-chosen key; a retry meeting 409 for that key
    means the first attempt went through: return the stored asset."""
    try:
        response = yield Call("POST", path, json=_body(body))
    except Conflict as exc:
        if not (exc.retried and exc.key == key):
            raise
        return (yield from _get(model, get_path))
    return _parse(model, response)


def _new_key(key: str | uuid.UUID | None) -> str:
    return str(key or uuid.uuid4())


# --- pagination --------------------------------------------------------------------------------

MetadataFilter = Mapping[str, str | None]


def _metadata(metadata: MetadataFilter | None) -> list[str] | None:
    """`{"site": "lyon", "year": None}`: site is exactly lyon, and year is present."""
    if not metadata:
        return None
    return [key if value is None else f"{key}:{value}" for key, value in metadata.items()]


def paged(model: type[M], path: str, page_size: int = 100, **params: Any) -> Op[None]:
    """Every item of a cursor-paginated listing, emitted one by one."""
    cursor: str | None = None
    while True:
        response = yield Call("GET", path, _params(cursor=cursor, limit=page_size, **params))
        page = m.Page.model_validate(response.json())
        for item in page.items:
            yield Emit(model.model_validate(item))
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def _events_paged(path: str, after: int, page_size: int, **params: Any) -> Op[None]:
    while True:
        response = yield Call("GET", path, _params(after=after, limit=page_size, **params))
        page = m.EventPage.model_validate(response.json())
        for event in page.items:
            yield Emit(event)
        if page.next_after is None:
            return
        after = page.next_after


# --- organizations and tokens ------------------------------------------------------------------

def register_organization(
    id: str, name: str, *, model_export_enabled: bool = False
) -> Op[m.OrganizationCreated]:
    """Register an organization (administrator); the answer holds its first token.

    Not retried once sent: a lost answer would lose the token, which is shown only once."""
    response = yield Call("POST", "/organizations", json={
        "id": id, "name": name, "model_export_enabled": model_export_enabled},
        idempotent=False)
    return _parse(m.OrganizationCreated, response)


def iter_organizations(*, page_size: int = 100) -> Op[None]:
    """Every registered organization, by id."""
    return paged(m.Organization, "/organizations", page_size)


def get_organization(id: str) -> Op[m.Organization]:
    return _get(m.Organization, f"/organizations/{id}")


def issue_token(
    name: str = "", *, role: Literal["org", "auditor"] = "org", org: str | None = None
) -> Op[m.IssuedToken]:
    """Issue an API token (for the caller's organization unless the administrator names
    one); the token itself is in the answer only."""
    body = {"name": name, "role": role} | ({"org": org} if org else {})
    response = yield Call("POST", "/tokens", json=body, idempotent=False)
    return _parse(m.IssuedToken, response)


def iter_tokens(*, page_size: int = 100) -> Op[None]:
    return paged(m.TokenInfo, "/tokens", page_size)


def revoke_token(token_id: str) -> Op[m.TokenInfo]:
    """Revoke a token; revoking it again after a lost answer returns it as revoked."""
    try:
        response = yield Call("DELETE", f"/tokens/{token_id}")
    except Conflict as exc:
        if not (exc.retried and exc.code == "already_revoked"):
            raise
        response = None
    if response is not None:
        return _parse(m.TokenInfo, response)
    cursor: str | None = None
    while True:  # no GET /tokens/{id}: find it in the listing
        listing = yield Call("GET", "/tokens", _params(cursor=cursor, limit=1000))
        page = m.Page.model_validate(listing.json())
        for item in page.items:
            if item["id"] == token_id:
                return m.TokenInfo.model_validate(item)
        if page.next_cursor is None:
            raise ConnectionFailed(f"token {token_id} vanished after its revocation")
        cursor = page.next_cursor


def me() -> Op[m.Me]:
    """Who the token acts as."""
    return _get(m.Me, "/me")


def health() -> Op[dict[str, Any]]:
    response = yield Call("GET", "/health")
    result: dict[str, Any] = response.json()
    return result


# --- files ---------------------------------------------------------------------------------------

def _source(source: FileSource) -> Path | bytes:
    return source if isinstance(source, bytes) else Path(source)


def upload_file(source: FileSource, *, on_progress: Progress | None = None) -> Op[m.FileRef]:
    """Stream a file (or bytes) into the artifact store, verified by its SHA-256."""
    upload = Upload(_source(source), on_progress)
    checksum = upload.sha256()
    response = yield Call("POST", "/files", upload=upload,
                          headers={"X-Content-SHA256": checksum,
                                   "Content-Type": "application/octet-stream"})
    return _parse(m.FileRef, response)


def _download(path: str, dest: Path | str, on_progress: Progress | None, *,
              checksum: str | None = None, for_task: str | None = None) -> Op[Path]:
    """Stream into `dest`, checked against the SHA-256 the server announces and, when
    given, `checksum` (ChecksumMismatch: nothing is kept). `for_task`: the caller's open
    task that takes this file as an input (process permission is then enough)."""
    target = Path(dest)
    yield Call("GET", path, _params(for_task=for_task), download=target,
               download_progress=on_progress, download_sha256=checksum)
    return target


def _checksum_of(source: FileSource | None, checksum: str | None,
                 on_progress: Progress | None) -> Op[str]:
    if checksum is not None:
        return checksum
    if source is None:
        raise ValueError("give either a file to upload or the checksum of an uploaded one")
    return (yield from upload_file(source, on_progress=on_progress)).checksum


# --- data managers and samples -----------------------------------------------------------------

def add_data_manager(
    name: str, *, opener: FileSource | None = None, opener_checksum: str | None = None,
    description: str = "", permissions: m.PermissionsIn | Mapping[str, Any] | None = None,
    logs_permission: m.PermissionIn | Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None, key: str | uuid.UUID | None = None,
    on_progress: Progress | None = None,
) -> Op[m.DataManager]:
    """Register a data manager; `opener` (a path or bytes) is uploaded first."""
    checksum = yield from _checksum_of(opener, opener_checksum, on_progress)
    key = _new_key(key)
    body = m.DataManagerIn.model_validate({
        "key": key, "name": name, "description": description, "opener_checksum": checksum,
        "permissions": _model_input(permissions) or {},
        "logs_permission": _model_input(logs_permission), "metadata": dict(metadata or {})})
    return (yield from _register(m.DataManager, "/data_managers", body, key,
                                 f"/data_managers/{key}"))


def _model_input(value: BaseModel | Mapping[str, Any] | None) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


def iter_data_managers(*, owner: str | None = None, metadata: MetadataFilter | None = None,
                       page_size: int = 100) -> Op[None]:
    return paged(m.DataManager, "/data_managers", page_size, owner=owner,
                 metadata=_metadata(metadata))


def get_data_manager(key: str) -> Op[m.DataManager]:
    return _get(m.DataManager, f"/data_managers/{key}")


def download_opener(key: str, dest: Path | str, *, checksum: str | None = None,
                    on_progress: Progress | None = None) -> Op[Path]:
    """Save the data manager's opener to `dest` (`checksum`: the SHA-256 it must have)."""
    return _download(f"/data_managers/{key}/opener", dest, on_progress, checksum=checksum)


def add_data_sample(
    data_manager_keys: Sequence[str], checksum: str, location: str, *,
    metadata: Mapping[str, str] | None = None, key: str | uuid.UUID | None = None,
) -> Op[m.DataSample]:
    """Register a sample by location and checksum (its bytes stay with its owner)."""
    key = _new_key(key)
    body = m.DataSampleIn.model_validate({
        "key": key, "data_manager_keys": list(data_manager_keys), "checksum": checksum,
        "location": location, "metadata": dict(metadata or {})})
    return (yield from _register(m.DataSample, "/data_samples", body, key,
                                 f"/data_samples/{key}"))


def link_data_sample(key: str, data_manager_keys: Sequence[str]) -> Op[m.DataSample]:
    response = yield Call("POST", f"/data_samples/{key}/data_managers",
                          json={"data_manager_keys": list(data_manager_keys)})
    return _parse(m.DataSample, response)


def iter_data_samples(*, owner: str | None = None, data_manager_key: str | None = None,
                      metadata: MetadataFilter | None = None, page_size: int = 100
                      ) -> Op[None]:
    return paged(m.DataSample, "/data_samples", page_size, owner=owner,
                 data_manager_key=data_manager_key, metadata=_metadata(metadata))


def get_data_sample(key: str) -> Op[m.DataSample]:
    return _get(m.DataSample, f"/data_samples/{key}")


# --- functions -------------------------------------------------------------------------------

def add_function(
    name: str, *, image_source: str = "IMAGE_REFERENCE", image: str | None = None,
    image_file: FileSource | None = None, inputs: Mapping[str, Any] | None = None,
    outputs: Mapping[str, Any] | None = None, command: Sequence[str] = (),
    entrypoint: Sequence[str] | None = None, environment: Mapping[str, str] | None = None,
    gpu: bool = False, description: str = "",
    permissions: m.PermissionsIn | Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None, key: str | uuid.UUID | None = None,
    on_progress: Progress | None = None,
) -> Op[m.Function]:
    """Register a function. `image` is an image reference (IMAGE_REFERENCE) or the checksum
    of an uploaded file; `image_file` (an archive holding a Dockerfile, or a `docker save`
    tarball) is uploaded first."""
    if image_file is not None:
        image = yield from _checksum_of(image_file, None, on_progress)
    if image is None:
        raise ValueError("give image (a reference or checksum) or image_file")
    key = _new_key(key)
    body = m.FunctionIn.model_validate({
        "key": key, "name": name, "description": description,
        "permissions": _model_input(permissions) or {}, "inputs": dict(inputs or {}),
        "outputs": dict(outputs or {}), "image_source": image_source, "image": image,
        "command": list(command), "entrypoint": list(entrypoint) if entrypoint else None,
        "environment": dict(environment or {}), "gpu": gpu, "metadata": dict(metadata or {})})
    return (yield from _register(m.Function, "/functions", body, key, f"/functions/{key}"))


def iter_functions(*, owner: str | None = None, metadata: MetadataFilter | None = None,
                   page_size: int = 100) -> Op[None]:
    return paged(m.Function, "/functions", page_size, owner=owner,
                 metadata=_metadata(metadata))


def get_function(key: str) -> Op[m.Function]:
    return _get(m.Function, f"/functions/{key}")


def download_function_archive(key: str, dest: Path | str, *, checksum: str | None = None,
                              on_progress: Progress | None = None) -> Op[Path]:
    """Save the function's archive or image tarball to `dest` (`checksum`: the SHA-256 it
    must have)."""
    return _download(f"/functions/{key}/archive", dest, on_progress, checksum=checksum)


# --- datasets ---------------------------------------------------------------------------------

def _dataset_files(files: Mapping[str, FileSource] | Iterable[tuple[str, str]],
                   on_progress: Progress | None) -> Op[list[dict[str, str]]]:
    """{path: file or bytes} (uploaded) or [(path, checksum)] (already uploaded)."""
    refs = []
    if isinstance(files, Mapping):
        for path, source in files.items():
            refs.append({"path": path,
                         "checksum": (yield from _checksum_of(source, None, on_progress))})
    else:
        refs = [{"path": path, "checksum": checksum} for path, checksum in files]
    return refs


def add_dataset(
    name: str, files: Mapping[str, FileSource] | Iterable[tuple[str, str]], *,
    permissions: m.PermissionsIn | Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None, key: str | uuid.UUID | None = None,
    on_progress: Progress | None = None,
) -> Op[m.Dataset]:
    """Register a dataset: `files` maps paths in the dataset to local files (uploaded
    first) or is a list of (path, checksum) of files already uploaded."""
    refs = yield from _dataset_files(files, on_progress)
    key = _new_key(key)
    body = m.DatasetIn.model_validate({
        "key": key, "name": name, "files": refs,
        "permissions": _model_input(permissions) or {}, "metadata": dict(metadata or {})})
    return (yield from _register(m.Dataset, "/datasets", body, key, f"/datasets/{key}"))


def iter_datasets(*, owner: str | None = None, compute_task_key: str | None = None,
                  metadata: MetadataFilter | None = None, page_size: int = 100) -> Op[None]:
    return paged(m.Dataset, "/datasets", page_size, owner=owner,
                 compute_task_key=compute_task_key, metadata=_metadata(metadata))


def get_dataset(key: str) -> Op[m.Dataset]:
    return _get(m.Dataset, f"/datasets/{key}")


def download_dataset_file(key: str, path: str, dest: Path | str, *,
                          for_task: str | None = None, checksum: str | None = None,
                          on_progress: Progress | None = None) -> Op[Path]:
    """Save one file of the dataset. A worker fetching its task's input passes the task's
    key as `for_task` (then process permission suffices) and the file's `checksum`."""
    return _download(f"/datasets/{key}/files/{path}", dest, on_progress, checksum=checksum,
                     for_task=for_task)


def download_dataset_zip(key: str, dest: Path | str, *,
                         on_progress: Progress | None = None) -> Op[Path]:
    """The whole dataset as one zip file, its tree preserved."""
    return _download(f"/datasets/{key}/zip", dest, on_progress)


# --- compute plans ------------------------------------------------------------------------------

TaskLike = m.TaskIn | Mapping[str, Any]


def _task_models(tasks: Iterable[TaskLike]) -> list[m.TaskIn]:
    """Validated tasks, each with a key (chosen here when missing: retry-safe)."""
    out = []
    for task in tasks:
        parsed = task if isinstance(task, m.TaskIn) else m.TaskIn.model_validate(task)
        if parsed.key is None:
            parsed = parsed.model_copy(update={"key": uuid.uuid4()})
        out.append(parsed)
    return out


def topological(tasks: Sequence[m.TaskIn]) -> list[m.TaskIn]:
    """Parents before children (stable); tasks on a cycle go last, for the server to refuse."""
    by_key = {str(t.key): t for t in tasks}
    parents = {k: {i.parent_task_key for i in t.inputs if i.parent_task_key in by_key}
               for k, t in by_key.items()}
    children: dict[str, list[str]] = {k: [] for k in by_key}
    for k, ps in parents.items():
        for p in ps:
            children[p].append(k)
    missing = {k: len(ps) for k, ps in parents.items()}
    ready = [k for k in by_key if missing[k] == 0]
    order: list[str] = []
    while ready:
        key = ready.pop(0)
        order.append(key)
        for child in children[key]:
            missing[child] -= 1
            if missing[child] == 0:
                ready.append(child)
    placed = set(order)
    order += [k for k in by_key if k not in placed]
    return [by_key[k] for k in order]


def _batches(tasks: list[m.TaskIn], size: int) -> list[list[m.TaskIn]]:
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    return [tasks[i:i + size] for i in range(0, len(tasks), size)]


def _task_batch(plan_key: str, batch: list[m.TaskIn]) -> Op[list[str]]:
    body = {"tasks": [_body(t) for t in batch]}
    try:
        response = yield Call("POST", f"/compute_plans/{plan_key}/tasks", json=body)
    except Conflict as exc:
        # A batch is atomic: one of its keys stored means the whole batch is.
        if exc.retried and exc.key in {str(t.key) for t in batch}:
            return [str(t.key) for t in batch]
        raise
    keys: list[str] = response.json()["task_keys"]
    return keys


def add_tasks(
    plan_key: str, tasks: Iterable[TaskLike], *, batch_size: int = 1000,
    on_progress: Progress | None = None,
) -> Op[list[str]]:
    """Add tasks to a plan in batches, parents first; returns their keys."""
    ordered = topological(_task_models(tasks))
    keys: list[str] = []
    for batch in _batches(ordered, batch_size):
        keys += yield from _task_batch(plan_key, batch)
        if on_progress is not None:
            on_progress(len(keys), len(ordered))
    return keys


def add_compute_plan(
    name: str, tasks: Iterable[TaskLike] = (), *, tag: str = "",
    metadata: Mapping[str, str] | None = None, key: str | uuid.UUID | None = None,
    batch_size: int = 1000, on_progress: Progress | None = None,
) -> Op[m.PlanRegistered]:
    """Register a plan of any size: the plan with the first batch of tasks, then the
    others batch by batch in topological order (each batch is atomic)."""
    key = _new_key(key)
    ordered = topological(_task_models(tasks))
    batches = _batches(ordered, batch_size) or [[]]
    body = m.ComputePlanIn.model_validate({
        "key": key, "name": name, "tag": tag, "metadata": dict(metadata or {}),
        "tasks": [_body(t) for t in batches[0]]})
    try:
        response = yield Call("POST", "/compute_plans", json=_body(body))
        keys: list[str] = response.json()["task_keys"]
    except Conflict as exc:
        if not (exc.retried and exc.key == key):
            raise
        keys = [str(t.key) for t in batches[0]]
    if on_progress is not None:
        on_progress(len(keys), len(ordered))
    for batch in batches[1:]:
        keys += yield from _task_batch(key, batch)
        if on_progress is not None:
            on_progress(len(keys), len(ordered))
    plan = yield from get_compute_plan(key)
    return m.PlanRegistered(plan=plan, task_keys=keys)


def get_compute_plan(key: str) -> Op[m.ComputePlan]:
    return _get(m.ComputePlan, f"/compute_plans/{key}")


def iter_compute_plans(*, owner: str | None = None, status: str | None = None,
                       metadata: MetadataFilter | None = None, page_size: int = 100
                       ) -> Op[None]:
    return paged(m.ComputePlan, "/compute_plans", page_size, owner=owner, status=status,
                 metadata=_metadata(metadata))


def cancel_compute_plan(key: str) -> Op[m.ComputePlan]:
    """Cancel the plan and every task of it that is not final yet."""
    response = yield Call("POST", f"/compute_plans/{key}/cancel")
    return _parse(m.ComputePlan, response)


def get_compute_plan_graph(key: str) -> Op[m.PlanGraph]:
    return _get(m.PlanGraph, f"/compute_plans/{key}/graph")


def get_compute_plan_performances(key: str, *, identifier: str | None = None
                                  ) -> Op[list[m.Performance]]:
    response = yield Call("GET", f"/compute_plans/{key}/performances",
                          _params(identifier=identifier))
    return [m.Performance.model_validate(p) for p in response.json()["items"]]


def wait_compute_plan(key: str, *, timeout: float | None = None,
                      on_progress: StatusCounts | None = None) -> Op[m.ComputePlan]:
    """Poll (with backoff) until the plan is DONE, FAILED or CANCELED."""
    return _wait(get_compute_plan, key, timeout, on_progress,
                 lambda p: p.status in m.FINAL_PLAN_STATUSES, lambda p: p.status_counts)


# --- tasks -------------------------------------------------------------------------------------

def iter_tasks(
    *, compute_plan_key: str | None = None, worker: str | None = None,
    owner: str | None = None, status: str | None = None, rank: int | None = None,
    category: str | None = None, metadata: MetadataFilter | None = None,
    page_size: int = 100,
) -> Op[None]:
    """Tasks in registration order, filtered (`metadata`: see `_metadata`)."""
    return paged(m.Task, "/tasks", page_size, compute_plan_key=compute_plan_key,
                 worker=worker, owner=owner, status=status, rank=rank, category=category,
                 metadata=_metadata(metadata))


def get_task(key: str) -> Op[m.Task]:
    return _get(m.Task, f"/tasks/{key}")


_ACTION_TARGET = {"start": "DOING", "done": "DONE", "fail": "FAILED", "cancel": "CANCELED"}


def task_action(
    key: str, action: Literal["start", "done", "fail", "cancel"], *,
    error_type: Literal["BUILD", "EXECUTION", "INTERNAL"] | None = None,
    message: str = "", logs_checksum: str | None = None, runner_id: str | None = None,
    lease_seconds: float | None = None,
) -> Op[m.Task]:
    """Move a task: start/done/fail by its worker, cancel by its owner. A retried action
    refused because the task already reached the target status is a success.

    A runner passes its `runner_id`: its start takes a lease for `lease_seconds` (the
    answer's `lease`; a start sent again by the same runner gets the same lease), to be
    renewed with `renew_lease`, and its done/fail are refused (409 lease_lost) once
    another run took the task over."""
    body = {"action": action, "message": message} | (
        {"error_type": error_type} if error_type else {}) | (
        {"logs_checksum": logs_checksum} if logs_checksum else {}) | (
        {"runner_id": runner_id} if runner_id else {}) | (
        {"lease_seconds": lease_seconds} if lease_seconds is not None else {})
    try:
        response = yield Call("POST", f"/tasks/{key}/actions", json=body)
    except InvalidRequest as exc:
        if not (exc.retried and exc.code == "bad_transition"):
            raise
        task = yield from get_task(key)
        if task.status != _ACTION_TARGET[action]:
            raise
        return task
    return _parse(m.Task, response)


def start_task(key: str) -> Op[m.Task]:
    return task_action(key, "start")


def done_task(key: str) -> Op[m.Task]:
    return task_action(key, "done")


def fail_task(key: str, *, error_type: Literal["BUILD", "EXECUTION", "INTERNAL"] = "EXECUTION",
              message: str = "", logs_checksum: str | None = None) -> Op[m.Task]:
    return task_action(key, "fail", error_type=error_type, message=message,
                       logs_checksum=logs_checksum)


def cancel_task(key: str) -> Op[m.Task]:
    return task_action(key, "cancel")


def renew_lease(key: str, runner_id: str, *, lease_seconds: float = 30.0
                ) -> Op[m.LeaseRenewed]:
    """The runner running a task extends its lease and learns the task's status (not
    DOING: its cue to stop). 409 lease_lost once another run took the task over."""
    response = yield Call("POST", f"/tasks/{key}/lease",
                          json={"runner_id": runner_id, "lease_seconds": lease_seconds})
    return _parse(m.LeaseRenewed, response)


def release_lease(key: str, runner_id: str) -> Op[m.LeaseRenewed]:
    """The runner gives the task back at once (it is shutting down): the task is TODO
    again within a second, for another runner, without counting as an attempt. Never
    re-sent once it may have arrived (a second release would uncount another attempt)."""
    response = yield Call("POST", f"/tasks/{key}/lease", idempotent=False,
                          json={"runner_id": runner_id, "release": True})
    return _parse(m.LeaseRenewed, response)


def _retried_output(exc: Conflict) -> bool:
    return exc.retried and exc.code == "output_already_registered"


def register_model_output(
    task_key: str, identifier: str, *, file: FileSource | None = None,
    checksum: str | None = None, on_progress: Progress | None = None,
) -> Op[m.Model]:
    """The worker registers a model output (`file` is uploaded first)."""
    checksum = yield from _checksum_of(file, checksum, on_progress)
    try:
        response = yield Call("POST", f"/tasks/{task_key}/outputs/{identifier}/model",
                              json={"checksum": checksum})
    except Conflict as exc:
        if not _retried_output(exc):
            raise
        response = yield Call("GET", "/models", _params(compute_task_key=task_key, limit=1000))
        found = [i for i in response.json()["items"]
                 if i["identifier"] == identifier and i["checksum"] == checksum.lower()]
        if not found:
            raise
        return m.Model.model_validate(found[-1])
    return _parse(m.Model, response)


def register_performance_output(task_key: str, identifier: str, value: float
                                ) -> Op[m.Performance]:
    """The worker registers a performance output (a number, always public)."""
    try:
        response = yield Call("POST", f"/tasks/{task_key}/outputs/{identifier}/performance",
                              json={"value": value})
    except Conflict as exc:
        if not _retried_output(exc):
            raise
        task = yield from get_task(task_key)
        perfs = yield from get_compute_plan_performances(task.compute_plan_key,
                                                         identifier=identifier)
        found = [p for p in perfs if p.compute_task_key == task_key and p.value == value]
        if not found:
            raise
        return found[0]
    return _parse(m.Performance, response)


def register_dataset_output(
    task_key: str, identifier: str, files: Mapping[str, FileSource] | Iterable[tuple[str, str]],
    *, name: str = "", on_progress: Progress | None = None,
) -> Op[m.Dataset]:
    """The worker registers files its task wrote as a dataset output."""
    refs = yield from _dataset_files(files, on_progress)
    try:
        response = yield Call("POST", f"/tasks/{task_key}/outputs/{identifier}/dataset",
                              json={"name": name, "files": refs})
    except Conflict as exc:
        if not _retried_output(exc):
            raise
        response = yield Call("GET", "/datasets", _params(compute_task_key=task_key, limit=1000))
        found = [d for d in response.json()["items"] if d["identifier"] == identifier]
        if not found:
            raise
        return m.Dataset.model_validate(found[-1])
    return _parse(m.Dataset, response)


def append_logs(task_key: str, data: bytes | str) -> Op[None]:
    """The worker appends output to the task's log (never re-sent once it may have
    arrived: that would repeat the lines)."""
    content = data.encode() if isinstance(data, str) else data
    yield Call("POST", f"/tasks/{task_key}/logs", content=content, idempotent=False,
               headers={"Content-Type": "application/octet-stream"})


def read_logs(task_key: str, *, head: int | None = None, tail: int | None = None,
              offset: int | None = None) -> Op[str]:
    """The task's log, whole, its first/last lines, or what came after its first `offset`
    bytes. Text: a multibyte character that an offset cuts becomes U+FFFD; to follow a
    log, use `follow_logs` (or `read_log_bytes`), which keep every byte."""
    response: httpx.Response = yield Call("GET", f"/tasks/{task_key}/logs",
                                          _params(head=head, tail=tail, offset=offset))
    return response.text


def read_log_bytes(task_key: str, *, offset: int = 0) -> Op[m.LogBytes]:
    """The log's bytes after its first `offset`, as the task wrote them, and the log's
    size then: ask again from `offset + len(data)` for what comes next."""
    response: httpx.Response = yield Call("GET", f"/tasks/{task_key}/logs",
                                          _params(offset=offset))
    size = response.headers.get(LOG_SIZE_HEADER)
    if size is None:
        # A server from before log offsets ignores the parameter and sends the whole log.
        return m.LogBytes(offset=offset, data=response.content[offset:],
                          size=len(response.content))
    return m.LogBytes(offset=offset, data=response.content, size=int(size))


def follow_logs(task_key: str, *, poll: float = 1.0, offset: int = 0) -> Op[None]:
    """Emit the log as it grows, until the task is final (then whatever came last).

    Each poll asks only for the bytes after those already emitted, and they are decoded
    as one UTF-8 stream: a character cut between two pieces of output comes out whole,
    once. `offset` skips that many bytes first (to resume)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    idle = 0
    while True:
        # The status first: a task final by then wrote all its log before this read.
        task = yield from get_task(task_key)
        piece = yield from read_log_bytes(task_key, offset=offset)
        offset = piece.next_offset
        text = decoder.decode(piece.data)
        if text:
            yield Emit(text)
        idle = 0 if piece.data else idle + 1
        if task.status in m.FINAL_TASK_STATUSES:
            rest = decoder.decode(b"", final=True)  # a character the log ends inside of
            if rest:
                yield Emit(rest)
            return
        yield Sleep(min(poll, backoff(idle, cap=poll)))


def wait_task(key: str, *, timeout: float | None = None,
              on_progress: StatusCounts | None = None) -> Op[m.Task]:
    """Poll (with backoff) until the task is DONE, FAILED or CANCELED."""
    return _wait(get_task, key, timeout, on_progress,
                 lambda t: t.status in m.FINAL_TASK_STATUSES, lambda t: {t.status: 1})


def _wait(get: Callable[[str], Op[M]], key: str, timeout: float | None,
          on_progress: StatusCounts | None, final: Callable[[M], bool],
          counts: Callable[[M], dict[str, int]]) -> Op[M]:
    deadline = None if timeout is None else time.monotonic() + timeout
    last: dict[str, int] | None = None
    unchanged = 0
    while True:
        current = yield from get(key)
        now = counts(current)
        if now != last:
            unchanged = 0
            if on_progress is not None:
                on_progress(dict(now))
        else:
            unchanged += 1
        last = now
        if final(current):
            return current
        delay = backoff(unchanged)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"{key} is still not final after {timeout} s",
                                  code="wait_timeout")
            delay = min(delay, left)
        yield Sleep(delay)


# --- models -----------------------------------------------------------------------------------

def iter_models(*, compute_task_key: str | None = None, owner: str | None = None,
                page_size: int = 100) -> Op[None]:
    return paged(m.Model, "/models", page_size, compute_task_key=compute_task_key, owner=owner)


def get_model(key: str) -> Op[m.Model]:
    return _get(m.Model, f"/models/{key}")


def get_failure_report(task_key: str) -> Op[m.FailureReport]:
    """Why a FAILED task failed (readable by whoever may read the task's logs)."""
    return _get(m.FailureReport, f"/tasks/{task_key}/failure_report")


def download_failure_logs(task_key: str, dest: Path | str, *,
                          on_progress: Progress | None = None) -> Op[Path]:
    """Save the log kept with a task's failure report."""
    return _download(f"/tasks/{task_key}/failure_report/logs", dest, on_progress)


def download_model(key: str, dest: Path | str, *, for_task: str | None = None,
                   checksum: str | None = None, on_progress: Progress | None = None
                   ) -> Op[Path]:
    """Save a model file: needs process permission and the worker's export setting, or,
    for a worker fetching its task's input, process permission and `for_task` (the
    task's key). `checksum`: the SHA-256 it must have."""
    return _download(f"/models/{key}/file", dest, on_progress, checksum=checksum,
                     for_task=for_task)


# --- the ledger ------------------------------------------------------------------------------

def iter_events(
    *, after: int = 0, org: Sequence[str] | str | None = None,
    asset_kind: Sequence[str] | str | None = None, event_type: Sequence[str] | str | None = None,
    page_size: int = 100,
) -> Op[None]:
    """Entries of every ledger the caller may read, by global position, up to now."""
    return _events_paged("/ledger/events", after, page_size, org=_listed(org),
                         asset_kind=_listed(asset_kind), event_type=_listed(event_type))


def iter_org_events(org: str, *, after: int = 0, page_size: int = 100) -> Op[None]:
    """One organization's entries by sequence."""
    return _events_paged(f"/ledger/{org}/events", after, page_size)


def verify_ledger(org: str) -> Op[m.VerifyResult]:
    """Have the server recompute an organization's hash chain."""
    return _get(m.VerifyResult, f"/ledger/{org}/verify")


def _listed(value: Sequence[str] | str | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def follow_events(
    *, after: int = 0, org: Sequence[str] | str | None = None,
    asset_kind: Sequence[str] | str | None = None, event_type: Sequence[str] | str | None = None,
    reconnect_delay: float = 0.5,
) -> Op[None]:
    """Every matching entry after `after`, then live ones, forever, over the SSE stream;
    after a disconnect it resumes with Last-Event-ID: no gap, no duplicate."""
    last = after
    failures = 0
    params = _params(org=_listed(org), asset_kind=_listed(asset_kind),
                     event_type=_listed(event_type))
    while True:
        call = Call("GET", "/ledger/stream", (*params, ("after", last)),
                    headers={"Last-Event-ID": str(last), "Accept": "text/event-stream"})
        try:
            yield OpenStream(call)
        except (ConnectionFailed, ServerError):
            failures += 1
            yield Sleep(min(10.0, reconnect_delay * 2 ** min(failures, 5)))
            continue
        parser = SseParser()
        while (line := (yield NEXT_LINE)) is not None:
            message = parser.feed(line)
            if message is None or "data" not in message:
                continue
            event = m.LedgerEvent.model_validate(json.loads(message["data"]))
            if event.position is not None:
                last = event.position
            failures = 0
            yield Emit(event)
        yield CLOSE_STREAM
        failures += 1
        yield Sleep(min(10.0, reconnect_delay * 2 ** min(failures - 1, 5)))
