"""A task's working directory: its inputs fetched and laid out, its outputs collected.

Layout (paths relative to the working directory, also listed in `io.json`):

| kind | where |
|---|---|
| DATA_MANAGER input | `input/<identifier>/opener.py` |
| DATA_SAMPLE input | `input/<identifier>/<sample key>` (the sample's file or folder) |
| MODEL input | `input/<identifier>/<model key>` |
| DATASET input | `input/<identifier>/<dataset key>/<file tree>` |
| MODEL output | `output/<identifier>` (a file; a folder of files when multiple) |
| PERFORMANCE output | `output/<identifier>` (a file holding one number) |
| DATASET output | `output/<identifier>/` (every file under it) |

RD-OASIS's algorithms read their dataset at `input/` and write theirs to `output/`: a
function whose only input is one DATASET gets its files directly under `input/`, and
one whose only output is one DATASET has it collected from all of `output/`.
"""

from __future__ import annotations

import asyncio
import functools
import math
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from app.storage.checksums import sample_checksum
from runner.api import RunnerApi
from runner.cache import FileCache, place
from runner.contract import IOEntry


class ExecutionFailure(Exception):
    """The function ran but did not do its part (a missing or malformed output)."""


class InputUnavailable(Exception):
    """An input could not be fetched or verified (our side, not the function's)."""


def _inside(base: Path, relative: str) -> Path:
    target = (base / relative).resolve()
    if not target.is_relative_to(base.resolve()):
        raise InputUnavailable(f"path {relative!r} leaves its folder")
    return target


class Workspace:
    """Builds one task's working directory through the API and the runner's cache."""

    def __init__(self, api: RunnerApi, cache: FileCache, task: dict[str, Any],
                 function: dict[str, Any], workdir: Path) -> None:
        self.api = api
        self.cache = cache
        self.task = task
        self.function = function
        self.workdir = workdir
        self.key: str = task["key"]

    def _spec_kind(self, identifier: str, inputs: bool) -> str:
        specs = self.function["inputs" if inputs else "outputs"]
        return str(specs[identifier]["kind"])

    @property
    def _oasis_input(self) -> bool:
        specs = self.function["inputs"]
        return len(specs) == 1 and next(iter(specs.values()))["kind"] == "DATASET"

    @property
    def _oasis_output(self) -> bool:
        specs = self.function["outputs"]
        return len(specs) == 1 and next(iter(specs.values()))["kind"] == "DATASET"

    # -- inputs ----------------------------------------------------------------------------

    async def prepare_inputs(self) -> list[IOEntry]:
        (self.workdir / "input").mkdir(parents=True, exist_ok=True)
        entries: list[IOEntry] = []
        for item in self.task["inputs"]:
            identifier = item["identifier"]
            kind = self._spec_kind(identifier, inputs=True)
            if kind == "DATA_MANAGER":
                entries.append(await self._opener(identifier, item["asset_key"]))
            elif kind == "DATA_SAMPLE":
                entries.append(await self._sample(identifier, item["asset_key"]))
            elif kind == "MODEL":
                for model in await self._assets("models", item):
                    entries.append(await self._model(identifier, model))
            elif kind == "DATASET":
                for dataset in await self._assets("datasets", item):
                    entries.append(await self._dataset(identifier, dataset))
        return entries

    async def _assets(self, kind: str, item: dict[str, Any]) -> list[dict[str, Any]]:
        if item.get("asset_key"):
            return [await self.api.asset(kind, item["asset_key"])]
        found = await self.api.outputs_of(kind, item["parent_task_key"], item["parent_output"])
        if not found:
            raise InputUnavailable(f"task {item['parent_task_key']} has no {kind} output "
                                   f"{item['parent_output']!r}")
        return found

    async def _cached(self, checksum: str, fetch: Callable[[Path], Awaitable[Path]],
                      dest: Path) -> None:
        """Put the file with this SHA-256 at `dest`, from the cache or `fetch(path)` (which
        checks it against the checksum)."""
        place(await self.cache.get(checksum, fetch), dest)

    async def _opener(self, identifier: str, key: str) -> IOEntry:
        manager = await self.api.asset("data_managers", key)
        relative = f"input/{identifier}/opener.py"
        checksum = manager["opener_checksum"]
        await self._cached(checksum, lambda path: self.api.client.download_opener(
            key, path, checksum=checksum), self.workdir / relative)
        return IOEntry(identifier, "DATA_MANAGER", relative, key)

    async def _sample(self, identifier: str, key: str) -> IOEntry:
        sample = await self.api.asset("data_samples", key)
        relative = f"input/{identifier}/{key}"
        await asyncio.to_thread(_copy_sample, key, str(sample["location"]), sample["checksum"],
                                self.workdir / relative)
        return IOEntry(identifier, "DATA_SAMPLE", relative, key)

    async def _model(self, identifier: str, model: dict[str, Any]) -> IOEntry:
        relative = f"input/{identifier}/{model['key']}"
        await self._cached(model["checksum"], lambda path: self.api.client.download_model(
            model["key"], path, for_task=self.key, checksum=model["checksum"]),
            self.workdir / relative)
        return IOEntry(identifier, "MODEL", relative, model["key"])

    async def _dataset(self, identifier: str, dataset: dict[str, Any]) -> IOEntry:
        relative = "input" if self._oasis_input else f"input/{identifier}/{dataset['key']}"
        base = self.workdir / relative
        base.mkdir(parents=True, exist_ok=True)
        for file in dataset["files"]:
            await self._cached(file["checksum"], functools.partial(
                self.api.client.download_dataset_file, dataset["key"], file["path"],
                for_task=self.key, checksum=file["checksum"]), _inside(base, file["path"]))
        return IOEntry(identifier, "DATASET", relative, dataset["key"])

    # -- outputs ---------------------------------------------------------------------------

    def output_entries(self) -> list[IOEntry]:
        """Where the function writes each output; folders are created beforehand."""
        out = self.workdir / "output"
        out.mkdir(parents=True, exist_ok=True)
        entries = []
        for identifier, spec in self.task["outputs"].items():
            kind = spec["kind"]
            if kind == "DATASET" and self._oasis_output:
                relative = "output"
            else:
                relative = f"output/{identifier}"
            if kind == "DATASET" or (kind == "MODEL" and spec.get("multiple")):
                (self.workdir / relative).mkdir(parents=True, exist_ok=True)
            entries.append(IOEntry(identifier, kind, relative))
        return entries

    async def register_outputs(self, entries: list[IOEntry]) -> None:
        """Upload and register every output; ExecutionFailure if one is missing/invalid."""
        for entry in entries:
            path = self.workdir / entry.path
            multiple = bool(self.task["outputs"][entry.identifier].get("multiple"))
            if entry.kind == "PERFORMANCE":
                await self.api.register_performance(self.key, entry.identifier,
                                                    _performance(path, entry.identifier))
            elif entry.kind == "MODEL" and multiple:
                files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() \
                    else []
                if not files:
                    raise ExecutionFailure(f"output {entry.identifier!r}: no model file was "
                                           f"written under {entry.path}/")
                for file in files:
                    await self.api.register_model(self.key, entry.identifier,
                                                  await self.api.upload(file))
            elif entry.kind == "MODEL":
                if not path.is_file():
                    raise ExecutionFailure(f"output {entry.identifier!r}: the function did not "
                                           f"write the file {entry.path}")
                await self.api.register_model(self.key, entry.identifier,
                                              await self.api.upload(path))
            elif entry.kind == "DATASET":
                files = sorted(p for p in path.rglob("*") if p.is_file())
                described = [{"path": f.relative_to(path).as_posix(),
                              "checksum": await self.api.upload(f)} for f in files]
                await self.api.register_dataset(self.key, entry.identifier, described)


def _performance(path: Path, identifier: str) -> float:
    if not path.is_file():
        raise ExecutionFailure(f"output {identifier!r}: the function did not write the file "
                               f"output/{identifier} (one number)")
    text = path.read_text(errors="replace").strip()
    try:
        value = float(text)
    except ValueError:
        raise ExecutionFailure(f"output {identifier!r}: {text[:50]!r} is not a number") from None
    if not math.isfinite(value):
        raise ExecutionFailure(f"output {identifier!r}: {value} is not a finite number")
    return value


def _copy_sample(key: str, location: str, checksum: str, dest: Path) -> None:
    """Copy a data sample from where its owner keeps it, checking it is the registered one.

    Copied, not linked: the task's input/ is made read-only, and that must not change the
    permissions of the organization's own data files."""
    source = Path(location.removeprefix("file://"))
    if not source.exists():
        raise InputUnavailable(f"data sample {key}: {location} does not exist on this "
                               "runner's machine")
    if sample_checksum(source) != checksum:
        raise InputUnavailable(f"data sample {key}: {location} does not match its registered "
                               "checksum")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        shutil.copyfile(source, dest)
    else:
        shutil.copytree(source, dest)
