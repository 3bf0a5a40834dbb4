"""Registering the assets organizations bring: data managers, data samples, functions,
datasets. Each rule checks a request and returns the event that records it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

from app.domain.errors import Conflict, Forbidden, InvalidCommand
from app.domain.events import DomainEvent
from app.domain.functions import ImageSource, InputSpec, OutputSpec, validate_io
from app.domain.permissions import Permission, Permissions

METADATA_MAX = 100
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class DataManagerRegistered(DomainEvent):
    asset_kind: ClassVar[str] = "data_manager"

    key: str
    owner: str
    name: str
    description: str
    opener_checksum: str
    permissions: dict[str, Any]
    logs_permission: dict[str, Any]
    metadata: dict[str, str]


@dataclasses.dataclass(frozen=True)
class DataSampleRegistered(DomainEvent):
    asset_kind: ClassVar[str] = "data_sample"

    key: str
    owner: str
    data_manager_keys: list[str]
    checksum: str
    location: str
    metadata: dict[str, str]


@dataclasses.dataclass(frozen=True)
class DataSampleLinked(DomainEvent):
    """The owner attached an existing sample to more data managers."""

    asset_kind: ClassVar[str] = "data_sample"

    key: str
    data_manager_keys: list[str]


@dataclasses.dataclass(frozen=True)
class FunctionRegistered(DomainEvent):
    asset_kind: ClassVar[str] = "function"

    key: str
    owner: str
    name: str
    description: str
    permissions: dict[str, Any]
    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    image_source: str
    # A checksum in the artifact store (archive or tarball) or an image reference.
    image: str
    command: list[str]
    entrypoint: list[str] | None
    environment: dict[str, str]
    gpu: bool
    metadata: dict[str, str]


@dataclasses.dataclass(frozen=True)
class DatasetRegistered(DomainEvent):
    """OASIS dataset: named files with a total size; uploaded, or produced by a task."""

    asset_kind: ClassVar[str] = "dataset"

    key: str
    owner: str
    name: str
    files: list[dict[str, Any]]
    total_size: int
    permissions: dict[str, Any]
    metadata: dict[str, str]
    compute_task_key: str | None = None
    identifier: str | None = None


def check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidCommand("metadata maps strings to strings", code="invalid_metadata")
        if len(key) > METADATA_MAX or len(value) > METADATA_MAX:
            raise InvalidCommand(
                f"metadata keys and values are at most {METADATA_MAX} characters ({key[:20]!r})",
                code="invalid_metadata",
            )
    return dict(metadata)


def check_checksum(value: str, what: str) -> str:
    if not SHA256.fullmatch(value):
        raise InvalidCommand(f"{what} must be a lowercase hex SHA-256", code="invalid_checksum")
    return value


def check_new_key(key: str, exists: bool) -> None:
    if exists:
        raise Conflict(f"an asset with key {key} already exists", code="already_exists", key=key)


def register_data_manager(
    owner: str, key: str, exists: bool, name: str, description: str, opener_checksum: str,
    opener_stored: bool, permissions: Permissions, logs_permission: Permission,
    metadata: Mapping[str, str],
) -> DataManagerRegistered:
    check_new_key(key, exists)
    check_checksum(opener_checksum, "opener checksum")
    if not opener_stored:
        raise InvalidCommand("upload the opener first (POST /files); no file has checksum "
                             f"{opener_checksum}", code="unknown_file")
    return DataManagerRegistered(
        key=key, owner=owner, name=name, description=description,
        opener_checksum=opener_checksum, permissions=permissions.to_json(),
        logs_permission=logs_permission.to_json(), metadata=check_metadata(metadata),
    )


def register_data_sample(
    owner: str, key: str, exists: bool, data_managers: Mapping[str, str | None],
    checksum: str, location: str, metadata: Mapping[str, str],
) -> DataSampleRegistered:
    """`data_managers` maps each requested data manager key to its owner (None: unknown).

    Samples never leave their owner: only the owner registers them, on its own data managers.
    """
    check_new_key(key, exists)
    _check_own_data_managers(owner, data_managers)
    if not location.strip():
        raise InvalidCommand("a data sample needs a location its owner's runners can read",
                             code="invalid_location")
    return DataSampleRegistered(
        key=key, owner=owner, data_manager_keys=list(data_managers),
        checksum=check_checksum(checksum, "data sample checksum"), location=location,
        metadata=check_metadata(metadata),
    )


def link_data_sample(
    sender: str, key: str, sample_owner: str, current: Collection[str],
    data_managers: Mapping[str, str | None],
) -> DataSampleLinked:
    if sender != sample_owner:
        raise Forbidden(f"only {sample_owner} may link its data sample {key}")
    _check_own_data_managers(sender, data_managers)
    added = [k for k in data_managers if k not in current]
    if not added:
        raise InvalidCommand(f"data sample {key} is already linked to these data managers",
                             code="nothing_to_link")
    return DataSampleLinked(key=key, data_manager_keys=added)


def _check_own_data_managers(owner: str, data_managers: Mapping[str, str | None]) -> None:
    if not data_managers:
        raise InvalidCommand("a data sample belongs to at least one data manager",
                             code="missing_data_manager")
    for dm_key, dm_owner in data_managers.items():
        if dm_owner is None:
            raise InvalidCommand(f"unknown data manager {dm_key}", code="unknown_asset")
        if dm_owner != owner:
            raise Forbidden(f"data manager {dm_key} belongs to {dm_owner}: samples are linked "
                            "to their owner's data managers only")


def register_function(
    owner: str, key: str, exists: bool, name: str, description: str,
    permissions: Permissions, inputs: dict[str, InputSpec], outputs: dict[str, OutputSpec],
    image_source: ImageSource, image: str, image_stored: bool, command: Sequence[str],
    entrypoint: Sequence[str] | None, environment: Mapping[str, str], gpu: bool,
    metadata: Mapping[str, str],
) -> FunctionRegistered:
    check_new_key(key, exists)
    validate_io(inputs, outputs)
    if image_source is ImageSource.IMAGE_REFERENCE:
        if not image.strip() or any(c.isspace() for c in image):
            raise InvalidCommand("an image reference looks like name[:tag] or name@digest",
                                 code="invalid_image")
    else:
        check_checksum(image, "image checksum")
        if not image_stored:
            raise InvalidCommand(f"upload the {image_source.value.lower()} first (POST /files); "
                                 f"no file has checksum {image}", code="unknown_file")
    if not command and not entrypoint and image_source is not ImageSource.DOCKERFILE_ARCHIVE:
        raise InvalidCommand("a function run from an image needs a command or an entrypoint",
                             code="missing_command")
    bad_env = [k for k in environment if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
    if bad_env:
        raise InvalidCommand(f"invalid environment variable name(s): {', '.join(bad_env)}",
                             code="invalid_environment")
    return FunctionRegistered(
        key=key, owner=owner, name=name, description=description,
        permissions=permissions.to_json(),
        inputs={n: s.to_json() for n, s in inputs.items()},
        outputs={n: s.to_json() for n, s in outputs.items()},
        image_source=image_source.value, image=image, command=list(command),
        entrypoint=list(entrypoint) if entrypoint is not None else None,
        environment=dict(environment), gpu=gpu, metadata=check_metadata(metadata),
    )


def register_dataset(
    owner: str, key: str, exists: bool, name: str, files: Sequence[Mapping[str, Any]],
    permissions: Permissions, metadata: Mapping[str, str],
    compute_task_key: str | None = None, identifier: str | None = None,
) -> DatasetRegistered:
    """`files` are {path, size, checksum}; paths are relative, unique and stay inside."""
    check_new_key(key, exists)
    seen: set[str] = set()
    for f in files:
        path = str(f["path"])
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise InvalidCommand(f"dataset file path {path!r} must be relative and normalised",
                                 code="invalid_path")
        if path in seen:
            raise InvalidCommand(f"dataset file {path!r} appears twice", code="invalid_path")
        seen.add(path)
        check_checksum(str(f["checksum"]), f"checksum of {path}")
    return DatasetRegistered(
        key=key, owner=owner, name=name,
        files=[{"path": f["path"], "size": int(f["size"]), "checksum": f["checksum"]}
               for f in files],
        total_size=sum(int(f["size"]) for f in files), permissions=permissions.to_json(),
        metadata=check_metadata(metadata), compute_task_key=compute_task_key,
        identifier=identifier,
    )
