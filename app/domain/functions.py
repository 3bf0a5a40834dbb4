"""Functions (Substra "algo", OASIS "Algorithm"): what a task runs, and its I/O contract.

A function declares named inputs and outputs of given kinds. The rules here make sure a
declaration is coherent before any task can use it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from app.domain.errors import InvalidCommand


class InputKind(enum.StrEnum):
    DATA_MANAGER = "DATA_MANAGER"
    DATA_SAMPLE = "DATA_SAMPLE"
    MODEL = "MODEL"
    DATASET = "DATASET"


class OutputKind(enum.StrEnum):
    MODEL = "MODEL"
    PERFORMANCE = "PERFORMANCE"
    DATASET = "DATASET"


class ImageSource(enum.StrEnum):
    DOCKERFILE_ARCHIVE = "DOCKERFILE_ARCHIVE"  # an archive holding a Dockerfile to build
    IMAGE_TARBALL = "IMAGE_TARBALL"  # OASIS "Image File": a `docker save` tarball
    IMAGE_REFERENCE = "IMAGE_REFERENCE"  # OASIS "Image ID": a name:tag to use or pull


@dataclasses.dataclass(frozen=True)
class InputSpec:
    kind: InputKind
    multiple: bool = False
    optional: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "multiple": self.multiple, "optional": self.optional}


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    kind: OutputKind
    multiple: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "multiple": self.multiple}


IDENTIFIER_MAX = 100


def validate_io(inputs: dict[str, InputSpec], outputs: dict[str, OutputSpec]) -> None:
    """The SPEC's rules on a function's declared inputs and outputs."""
    for name in [*inputs, *outputs]:
        if not name or len(name) > IDENTIFIER_MAX or not name.replace("_", "").isalnum():
            raise InvalidCommand(
                f"identifier {name!r} must be 1-{IDENTIFIER_MAX} letters, digits or '_'",
                code="invalid_identifier",
            )
    managers = [n for n, s in inputs.items() if s.kind is InputKind.DATA_MANAGER]
    samples = [n for n, s in inputs.items() if s.kind is InputKind.DATA_SAMPLE]
    if len(managers) > 1:
        raise InvalidCommand("a function has at most one DATA_MANAGER input",
                             code="invalid_function_inputs")
    for name in managers:
        if inputs[name].multiple or inputs[name].optional:
            raise InvalidCommand(f"DATA_MANAGER input {name!r} cannot be multiple or optional",
                                 code="invalid_function_inputs")
    if bool(managers) != bool(samples):
        raise InvalidCommand("a DATA_MANAGER input requires a DATA_SAMPLE input and vice versa",
                             code="invalid_function_inputs")
    for name, spec in outputs.items():
        if spec.kind is OutputKind.PERFORMANCE and spec.multiple:
            raise InvalidCommand(f"PERFORMANCE output {name!r} cannot be multiple",
                                 code="invalid_function_outputs")
