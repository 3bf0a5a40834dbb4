"""The contract between the runner's orchestration and its execution backends.

Owns what a backend is given and what it gives back: the image to prepare (`ImageSpec`),
the task to run (`RunSpec` with its `IOEntry`s), the outcome (`RunResult`), the
`BuildError` that makes a task fail with error type BUILD, the `Backend` protocol, and the
`io.json` document every function receives. The orchestration (runner/worker.py) prepares
the working directory and interprets results; backends (runner/backends/) only execute.

What every backend honours (SPEC "Execution"):

- the process runs with the task working directory as its working directory (`/consort`
  in a container, the host directory for the subprocess backend), `input/` read-only and
  `output/` writable;
- `io.json` is written in the working directory, lists every input and output with its
  absolute path as the process sees it, its path is in the environment as `CONSORT_IO` and
  is appended as the last argument of the command;
- the function's command, entrypoint and environment; no network unless asked; CPU and
  memory limits and GPUs when asked; a timeout; a non-root user where possible;
- stdout and stderr go to `on_log` in order while the process runs; setting `cancel`
  stops it within 5 s; nothing of the run is left behind (the container is removed);
- what an image preparation prints (build steps, load and pull messages) goes to its own
  `on_log`, one line at a time, each line starting with `[build] `.

Housekeeping (runner/housekeeping.py) asks a backend what a killed runner may have left
(`Leftover`s of an organization), removes them, and bounds the prepared images.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import stat
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    import docker

IO_FILE_NAME = "io.json"
IO_ENV = "CONSORT_IO"
CONTAINER_WORKDIR = "/consort"
INPUT_DIR = "input"
OUTPUT_DIR = "output"
# A cancelled process gets this long between the polite signal and the kill, so that the
# whole stop stays well inside the 5 s the contract promises.
STOP_GRACE_S = 2.0
# What starts every line of an image preparation's output in the task log.
BUILD_LOG_PREFIX = "[build] "

LogSink = Callable[[bytes], Awaitable[None]]
Gate = Callable[[], Awaitable[bool]]


class ImageSourceKind(StrEnum):
    """Where a function's image comes from (SPEC "Assets", Function image source)."""

    DOCKERFILE_ARCHIVE = "DOCKERFILE_ARCHIVE"  # tar/zip holding a Dockerfile and the code
    IMAGE_TARBALL = "IMAGE_TARBALL"  # a `docker save` tarball (OASIS "Image File")
    IMAGE_REFERENCE = "IMAGE_REFERENCE"  # an image name (OASIS "Image ID")


@dataclass(frozen=True)
class ImageSpec:
    """A function's image, as the orchestration hands it over for preparation."""

    function_key: str
    source: ImageSourceKind
    checksum: str | None  # sha256 of the archive/tarball (None for a reference)
    # Local, already checksum-verified: an archive with a Dockerfile, or a `docker save` tar.
    archive_path: Path | None
    reference: str | None  # IMAGE_REFERENCE only, e.g. "busybox:latest"


@dataclass(frozen=True)
class IOEntry:
    """One input or output of a task, as io.json lists it."""

    identifier: str
    kind: str  # "DATA_MANAGER" | "DATA_SAMPLE" | "MODEL" | "DATASET" | "PERFORMANCE"
    path: str  # relative to the task working dir, e.g. "input/models/<key>", "output/model"
    key: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """One execution of a function. `workdir` was prepared by the caller: `input/` filled,
    `output/` empty with the directories the output paths need."""

    task_key: str
    image: str  # what Backend.prepare_image returned
    command: list[str]
    entrypoint: list[str] | None
    environment: dict[str, str]
    gpu: bool
    workdir: Path
    inputs: list[IOEntry]
    outputs: list[IOEntry]
    timeout_s: float
    cpus: float | None = None
    memory_bytes: int | None = None
    network: bool = False
    # Who runs it: the backend labels what it creates with them, so that housekeeping can
    # tell an organization's leftovers from another's on a shared engine.
    org: str = ""
    runner_id: str = ""


@dataclass(frozen=True)
class RunResult:
    """How a run ended. Check `canceled` and `timed_out` before `exit_code`: a killed
    process has the exit code the kill gave it (137 in Docker).

    `exit_code` is None only when no exit status exists (the engine refused to create or
    start the container); `error` then says why. A command that does not exist ends with
    127 (126: exists but cannot be executed), as a shell reports it, with `error` set.
    """

    exit_code: int | None
    timed_out: bool
    canceled: bool
    duration_s: float  # from the start of the process to its end
    started_at_monotonic: float  # time.monotonic() when the process/container started
    error: str | None = None


class BuildError(Exception):
    """The image could not be built, loaded or pulled: the task fails with error type
    BUILD, and the message (with the build log's tail) says why."""

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        super().__init__(f"{message}\n{log_tail}".rstrip() if log_tail else message)
        self.log_tail = log_tail


class ImageGone(BuildError):
    """The prepared image was removed from the engine before the run (another runner
    sharing the engine pruned it): prepare it again and retry."""


@dataclass(frozen=True)
class Leftover:
    """Something a run left in a backend (a container), as housekeeping sees it."""

    id: str
    task_key: str
    org: str
    runner_id: str
    created_at: float  # seconds since the epoch, by the backend's clock
    running: bool

    def describe(self) -> str:
        state = "running" if self.running else "stopped"
        return f"{self.id[:12]} ({state}, task {self.task_key}, runner {self.runner_id})"


class Backend(Protocol):
    """Executes tasks. Every method is safe to await from the runner's event loop."""

    name: str  # "docker" | "subprocess"

    async def prepare_image(self, spec: ImageSpec, on_log: LogSink | None = None) -> str:
        """Build, load or find the function's image; the answer goes in RunSpec.image.

        Idempotent and cached: the same function and checksum are built once, even across
        runner restarts, and concurrent calls for the same image wait for one preparation.
        What the preparation prints goes to `on_log` as lines starting with
        BUILD_LOG_PREFIX (nothing when the image was already there). Raises BuildError.
        """
        ...

    async def run(self, spec: RunSpec, on_log: LogSink, cancel: asyncio.Event,
                  gate: Gate | None = None) -> RunResult:
        """Run the task to its end, timeout or cancellation (see the module docstring).

        With a `gate`, everything up to the start of the process (io.json, the container
        created) is done first, then the gate is awaited: False means do not start (the
        result is `canceled`, nothing ran). The runner uses it to prepare a task while the
        API is still recording its start.
        """
        ...

    async def leftovers(self, org: str) -> list[Leftover]:
        """What runs of `org`'s runners left in the backend (every runner's, this one's
        included: housekeeping decides which are abandoned)."""
        ...

    async def remove_leftover(self, leftover: Leftover) -> None:
        """Remove it, killing it first if it runs; gone already is fine."""
        ...

    async def prune_images(
        self, keep: int, *, protect: Collection[str] = (), grace_s: float = 0.0
    ) -> list[str]:
        """Remove the least recently used prepared images beyond the `keep` most recent
        ones, except images in `protect` (RunSpec.image values about to run), images a
        container uses, and images used within `grace_s`; returns what was removed. Only
        images the backend prepared itself are ever touched."""
        ...

    async def close(self) -> None:
        """Release the backend's resources (engine connections, threads)."""
        ...


# -- io.json -------------------------------------------------------------------------


def check_io_paths(spec: RunSpec) -> None:
    """ValueError unless every input path lies under input/ and every output under output/
    (relative, no `..`): a bad path is the orchestration's bug, never the function's."""
    for entries, top in ((spec.inputs, INPUT_DIR), (spec.outputs, OUTPUT_DIR)):
        for entry in entries:
            normal = posixpath.normpath(entry.path)
            if (
                posixpath.isabs(entry.path)
                or "\\" in entry.path
                or ".." in entry.path.split("/")
                or not (normal == top or normal.startswith(top + "/"))
            ):
                raise ValueError(
                    f"{entry.identifier}: path {entry.path!r} is not under {top}/"
                )


def io_document(spec: RunSpec, root: str) -> dict[str, Any]:
    """The io.json content, paths absolute under `root` (the working dir as the process
    sees it). Inputs of a `multiple` identifier appear once per asset, in the given order."""

    def entry(item: IOEntry) -> dict[str, Any]:
        return {
            "identifier": item.identifier,
            "kind": item.kind,
            "key": item.key,
            "path": posixpath.join(root, posixpath.normpath(item.path)),
        }

    return {
        "task_key": spec.task_key,
        "workdir": root,
        "input_dir": posixpath.join(root, INPUT_DIR),
        "output_dir": posixpath.join(root, OUTPUT_DIR),
        "inputs": [entry(item) for item in spec.inputs],
        "outputs": [entry(item) for item in spec.outputs],
    }


def write_io_file(spec: RunSpec, root: str) -> Path:
    """Write io.json into the host working dir (world-readable: the process may run as
    another user) and return its host path."""
    check_io_paths(spec)
    path = spec.workdir / IO_FILE_NAME
    path.write_text(json.dumps(io_document(spec, root), indent=2) + "\n")
    path.chmod(0o644)
    return path


def prepare_workdir(
    spec: RunSpec, *, output_owner: tuple[int, int] | None, input_mode: str
) -> tuple[Path, Path]:
    """Make sure input/ and output/ exist and carry the permissions the contract needs;
    returns (input dir, output dir) on the host.

    input_mode "readable": every user may read input/ (a container user other than the
    runner's reads it through a read-only mount). "read-only": also no write bit anywhere
    under input/ (the subprocess backend has no read-only mount). `output_owner`: chown
    output/ to this uid:gid (falls back to world-writable when the runner may not chown).
    Symlinks are never followed: input files should be hard links or copies.
    """
    input_dir = spec.workdir / INPUT_DIR
    output_dir = spec.workdir / OUTPUT_DIR
    input_dir.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    strip_write = input_mode == "read-only"
    for path in _tree(input_dir):
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            continue
        wanted = stat.S_IMODE(mode) | (0o555 if stat.S_ISDIR(mode) else 0o444)
        if strip_write:
            wanted &= ~0o222
        if wanted != stat.S_IMODE(mode):
            os.chmod(path, wanted)
    for path in _tree(output_dir):
        if os.path.islink(path):
            continue
        if output_owner is not None:
            try:
                os.chown(path, *output_owner, follow_symlinks=False)
                continue
            except PermissionError:
                pass  # not root: world-writable directories instead
        if os.path.isdir(path):
            os.chmod(path, 0o777)
    return input_dir, output_dir


def _tree(root: Path) -> Iterator[str]:
    """root and everything below it, directories before their content."""
    yield str(root)
    for directory, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            yield os.path.join(directory, name)


# -- choosing a backend --------------------------------------------------------------


class BackendChoice(NamedTuple):
    """The backend to use and why, in words for the runner's start message."""

    backend: Backend
    reason: str


@dataclass(frozen=True)
class BackendOptions:
    """Settings of both backends (all optional)."""

    # "docker", "subprocess", or None: docker when an engine answers, else subprocess.
    prefer: str | None = None
    # Where the subprocess backend unpacks function archives (one directory per checksum).
    cache_dir: Path | None = None
    # Docker: the container user ("uid:gid"); None keeps the image's own USER.
    docker_user: str | None = "65534:65534"
    # Subprocess: run the function as this uid:gid (needs root); None: the runner's user.
    subprocess_user: tuple[int, int] | None = None
    # Extra environment every subprocess run inherits from the runner (names only).
    subprocess_pass_env: tuple[str, ...] = ()
    docker_client: docker.DockerClient | None = field(default=None, compare=False)
    ping_timeout_s: float = 5.0


def choose_backend(options: BackendOptions | None = None) -> BackendChoice:
    """Docker when an engine answers `ping()`, else the subprocess backend; blocking (it
    pings the engine), call it at start-up or through `asyncio.to_thread`."""
    from runner.backends import choose_backend as choose

    return choose(options or BackendOptions())
