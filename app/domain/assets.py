"""Read-only facts about stored assets that the task rules need.

The application layer loads these from the views and hands them to the rules; the rules
never fetch anything themselves.
"""

from __future__ import annotations

import dataclasses

from app.domain.functions import InputSpec, OutputKind, OutputSpec
from app.domain.permissions import Permission, Permissions


@dataclasses.dataclass(frozen=True)
class FunctionInfo:
    key: str
    owner: str
    permissions: Permissions
    inputs: dict[str, InputSpec]
    outputs: dict[str, OutputSpec]


@dataclasses.dataclass(frozen=True)
class DataManagerInfo:
    key: str
    owner: str
    permissions: Permissions
    logs_permission: Permission


@dataclasses.dataclass(frozen=True)
class DataSampleInfo:
    key: str
    owner: str
    data_manager_keys: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    key: str
    owner: str
    permissions: Permissions
    disabled: bool = False


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    key: str
    owner: str
    permissions: Permissions


@dataclasses.dataclass(frozen=True)
class TaskOutput:
    """One declared output of a registered task, with the permissions its assets get."""

    kind: OutputKind
    multiple: bool
    permissions: Permissions
    transient: bool

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind.value, "multiple": self.multiple,
            "permissions": self.permissions.to_json(), "transient": self.transient,
        }
