"""Preparing function images: the blocking work behind `Backend.prepare_image`.

Owns the naming and caching of prepared images and the three ways to get one:

- DOCKERFILE_ARCHIVE: unpacked with the safe unpacker (app.storage.archives) into a
  temporary build context and built with the Docker SDK, tagged
  `consort-fn/<function_key>:<checksum[:16]>`;
- IMAGE_TARBALL: `docker load`ed, then given the same kind of tag;
- IMAGE_REFERENCE: used as is when the engine has it, pulled only when absent;

and, for the subprocess backend, unpacking a Dockerfile archive once per checksum into a
cache directory. The tag (or the cache directory) is looked up first, so a restarted
runner finds what an earlier one prepared. Every failure is a `BuildError` carrying the
tail of the build or load log; every line of that log also goes, as it comes, to the
caller's `emit` (the task log), prefixed with `[build] `.

Only images carrying a `consort-fn/` tag are Consort's: `prune_function_images` keeps the
most recently used ones (their `LastTagTime`, which `touch_function_image` refreshes at
each use) and removes only those tags, so an image someone else also named (a loaded
tarball's own name, a referenced base image) stays. Everything here blocks: backends call
it from threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors

from app.storage.archives import UnsafeArchive, has_root_dockerfile, unpack_archive
from runner.contract import BUILD_LOG_PREFIX, BuildError, ImageSourceKind, ImageSpec

log = logging.getLogger(__name__)

TAG_REPOSITORY = "consort-fn"
LOG_TAIL_LINES = 40
LABEL_FUNCTION = "consort.function_key"
LABEL_CHECKSUM = "consort.checksum"

# Receives each line of a preparation's output, already prefixed and newline-terminated.
Emit = Callable[[str], None]


def function_tag(spec: ImageSpec, repository: str = TAG_REPOSITORY) -> str:
    """`consort-fn/<function_key>:<checksum[:16]>`, lowered and cleaned to what Docker
    accepts in a repository path and a tag."""
    name = re.sub(r"[^a-z0-9]+", "-", spec.function_key.lower()).strip("-") or "function"
    return f"{repository}/{name}:{archive_checksum(spec)[:16]}"


def archive_checksum(spec: ImageSpec) -> str:
    """The spec's checksum, or the sha256 of its file when the caller gave none."""
    if spec.checksum:
        return spec.checksum.lower()
    path = _archive(spec)
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


# -- Docker ---------------------------------------------------------------------------


class BuildOutput:
    """A preparation's output: every line to `emit` as it comes, the last LOG_TAIL_LINES
    kept for the BuildError. Progress bars are left out: the log is for a human."""

    def __init__(self, emit: Emit | None = None) -> None:
        self.lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._emit = emit

    def say(self, line: str) -> None:
        self.lines.append(line)
        if self._emit is not None:
            self._emit(f"{BUILD_LOG_PREFIX}{line}\n")

    def event(self, event: dict[str, Any]) -> None:
        if event.get("progress") or event.get("progressDetail"):
            return
        for field in ("stream", "status", "error"):
            text = event.get(field)
            if isinstance(text, str):
                for line in text.splitlines():
                    if line.strip():
                        self.say(line.rstrip())

    @property
    def tail(self) -> str:
        return "\n".join(self.lines)


def prepare_docker_image(
    client: docker.DockerClient, spec: ImageSpec, emit: Emit | None = None,
    repository: str = TAG_REPOSITORY,
) -> str:
    """The image name to run for `spec`, building, loading or pulling it when missing."""
    output = BuildOutput(emit)
    if spec.source is ImageSourceKind.IMAGE_REFERENCE:
        return ensure_reference(client, _reference(spec), output)
    tag = function_tag(spec, repository)
    if _has_image(client, tag):
        touch_function_image(client, tag)
        return tag
    if spec.source is ImageSourceKind.DOCKERFILE_ARCHIVE:
        build_dockerfile_archive(client, spec, tag, output)
    else:
        load_image_tarball(client, spec, tag, output)
    return tag


def build_dockerfile_archive(
    client: docker.DockerClient, spec: ImageSpec, tag: str, output: BuildOutput | None = None
) -> None:
    output = output or BuildOutput()
    archive = _archive(spec)
    output.say(f"building {tag} from the function's Dockerfile archive")
    with tempfile.TemporaryDirectory(prefix="consort-build-") as scratch:
        context = Path(scratch) / "context"
        try:
            if not has_root_dockerfile(archive):
                raise BuildError(f"{archive.name}: no Dockerfile at the archive's root")
            unpack_archive(archive, context)
        except UnsafeArchive as exc:
            raise BuildError(f"function archive refused: {exc}") from exc
        labels = {LABEL_FUNCTION: spec.function_key, LABEL_CHECKSUM: archive_checksum(spec)}
        try:
            stream = client.api.build(
                path=str(context), tag=tag, rm=True, forcerm=True, decode=True, labels=labels
            )
            _follow_build(stream, output)
        except docker.errors.DockerException as exc:
            output.say(f"docker build failed: {_explain(exc)}")
            raise BuildError(f"docker build of {tag} failed: {_explain(exc)}") from exc
    if not _has_image(client, tag):
        raise BuildError(f"docker build of {tag} ended without an image", log_tail=output.tail)


def load_image_tarball(
    client: docker.DockerClient, spec: ImageSpec, tag: str, output: BuildOutput | None = None
) -> None:
    output = output or BuildOutput()
    archive = _archive(spec)
    output.say(f"loading the function's image tarball as {tag}")
    try:
        with archive.open("rb") as data:
            # The low-level stream rather than images.load(): its lines are the log.
            stream = client.api.load_image(data)
            loaded = _follow_load(stream, output)
    except docker.errors.DockerException as exc:
        output.say(f"docker load failed: {_explain(exc)}")
        raise BuildError(f"docker load of {archive.name} failed: {_explain(exc)}") from exc
    except OSError as exc:
        raise BuildError(f"cannot read the image tarball {archive.name}: {exc}") from exc
    if not loaded:
        raise BuildError(f"docker load of {archive.name} gave no image", log_tail=output.tail)
    # A tarball holding several images: the first one is the function's (docker run would
    # need a name too, and the first is the one `docker save IMAGE` puts first).
    try:
        image = client.images.get(loaded[0])
        repository, _, version = tag.rpartition(":")
        image.tag(repository, version)
    except docker.errors.DockerException as exc:
        raise BuildError(f"cannot tag the loaded image {loaded[0]}: {_explain(exc)}") from exc


def ensure_reference(
    client: docker.DockerClient, reference: str, output: BuildOutput | None = None
) -> str:
    """`reference` when the engine has it, else pulled (the only time we pull)."""
    if _has_image(client, reference):
        return reference
    output = output or BuildOutput()
    output.say(f"pulling {reference}")
    try:
        for event in client.api.pull(reference, stream=True, decode=True):
            output.event(event)
            if "error" in event:
                raise BuildError(
                    f"cannot pull {reference}: {event['error']}", log_tail=output.tail
                )
    except docker.errors.DockerException as exc:
        output.say(f"pull failed: {_explain(exc)}")
        raise BuildError(f"cannot pull {reference}: {_explain(exc)}") from exc
    if not _has_image(client, reference):
        raise BuildError(f"pull of {reference} ended without the image", log_tail=output.tail)
    return reference


def _has_image(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    except docker.errors.APIError as exc:
        # A malformed reference is the function's problem, not a transient one.
        if exc.status_code == 400:
            raise BuildError(f"invalid image reference {name!r}: {_explain(exc)}") from exc
        raise
    return True


def _follow_build(stream: Iterable[dict[str, Any]], output: BuildOutput) -> None:
    for event in stream:
        output.event(event)
        if "error" in event or "errorDetail" in event:
            detail = event.get("error") or event.get("errorDetail", {}).get("message", "")
            raise BuildError(f"docker build failed: {str(detail).strip()}", log_tail=output.tail)


def _follow_load(stream: Iterable[dict[str, Any]], output: BuildOutput) -> list[str]:
    loaded: list[str] = []
    for event in stream:
        output.event(event)
        if "error" in event or "errorDetail" in event:
            detail = event.get("error") or event.get("errorDetail", {}).get("message", "")
            raise BuildError(f"docker load failed: {str(detail).strip()}", log_tail=output.tail)
        message = str(event.get("stream", ""))
        for prefix in ("Loaded image: ", "Loaded image ID: "):
            if message.startswith(prefix):
                loaded.append(message[len(prefix):].strip())
    return loaded


def _explain(exc: docker.errors.DockerException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc)


def _archive(spec: ImageSpec) -> Path:
    if spec.archive_path is None:
        raise BuildError(f"function {spec.function_key}: {spec.source} without a file")
    if not spec.archive_path.is_file():
        raise BuildError(f"function {spec.function_key}: {spec.archive_path} is missing")
    return spec.archive_path


def _reference(spec: ImageSpec) -> str:
    if not spec.reference or not spec.reference.strip():
        raise BuildError(f"function {spec.function_key}: image reference is empty")
    return spec.reference.strip()


# -- Docker: bounding the prepared images ---------------------------------------------


@dataclass(frozen=True)
class PreparedImage:
    """An image carrying at least one tag of Consort's repository."""

    id: str
    tags: tuple[str, ...]  # Consort's tags only
    last_used: float  # seconds since the epoch: its LastTagTime, else its creation


def touch_function_image(client: docker.DockerClient, image: str) -> None:
    """Record a use of a prepared image: tagging it again with the same tag sets the
    engine's LastTagTime, which every runner sharing the engine reads for pruning."""
    repository, _, tag = image.rpartition(":")
    try:
        client.api.tag(image, repository, tag)
    except docker.errors.DockerException as exc:  # gone meanwhile: nothing to record
        log.debug("could not touch %s: %s", image, exc)


def prepared_images(
    client: docker.DockerClient, repository: str = TAG_REPOSITORY
) -> list[PreparedImage]:
    """Every image with a `<repository>/` tag, most recently used first."""
    found: list[PreparedImage] = []
    for summary in client.api.images():
        tags = tuple(t for t in summary.get("RepoTags") or () if t.startswith(repository + "/"))
        if not tags:
            continue
        try:
            attrs = client.api.inspect_image(summary["Id"])
        except docker.errors.NotFound:
            continue
        used = engine_time((attrs.get("Metadata") or {}).get("LastTagTime"))
        found.append(PreparedImage(summary["Id"], tags, used or float(summary.get("Created", 0))))
    return sorted(found, key=lambda image: image.last_used, reverse=True)


def prune_function_images(
    client: docker.DockerClient, keep: int, *, repository: str = TAG_REPOSITORY,
    protect: Collection[str] = (), grace_s: float = 0.0,
) -> list[str]:
    """Keep the `keep` most recently used prepared images (0: all) and remove the tags of
    the others, except images a container (in any state) uses, images named in `protect`,
    and images used within `grace_s`. Removing an image's last tag deletes it; an image
    that has other names keeps them. Returns the removed tags."""
    if keep <= 0:
        return []
    candidates = prepared_images(client, repository)[keep:]
    if not candidates:
        return []
    in_use = {c.get("ImageID") for c in client.api.containers(all=True)}
    now = time.time()
    removed: list[str] = []
    for image in candidates:
        if image.id in in_use or set(image.tags) & set(protect):
            continue
        if now - image.last_used < grace_s:
            continue
        removed += _untag(client, image)
    return removed


def _untag(client: docker.DockerClient, image: PreparedImage) -> list[str]:
    removed: list[str] = []
    for tag in image.tags:
        try:
            client.api.remove_image(tag)
        except docker.errors.NotFound:
            continue
        except docker.errors.APIError as exc:
            # A container was created from it since we looked (409): it stays.
            log.info("keeping image %s: %s", tag, _explain(exc))
            break
        removed.append(tag)
    return removed


def engine_time(text: object) -> float | None:
    """An engine timestamp (RFC 3339 with nanoseconds) in epoch seconds; None when unset
    (the engine writes year 1 for an image never tagged)."""
    if not isinstance(text, str):
        return None
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    if match is None or match.group(1).startswith("0001-"):
        return None
    fraction = (match.group(2) or ".0")[:7]  # microseconds at most
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    return datetime.fromisoformat(match.group(1) + fraction + zone).timestamp()


# -- subprocess: unpacked function directories ------------------------------------------


def function_dir(cache_dir: Path, spec: ImageSpec) -> Path:
    """Where the subprocess backend keeps `spec`'s unpacked archive."""
    return cache_dir / "functions" / function_tag(spec).split("/", 1)[1].replace(":", "-")


def unpack_function(cache_dir: Path, spec: ImageSpec) -> Path:
    """Unpack a Dockerfile archive once per function and checksum; the directory, when it
    already exists (an earlier runner unpacked it), is reused as is."""
    target = function_dir(cache_dir, spec)
    if target.is_dir():
        return target
    archive = _archive(spec)
    try:
        unpack_archive(archive, target)
    except UnsafeArchive as exc:
        raise BuildError(f"function archive refused: {exc}") from exc
    except FileExistsError:
        # Another runner sharing the cache unpacked it first: the rename is atomic, so what
        # is there is complete.
        if not target.is_dir():
            raise
    return target


def remove_function_dir(cache_dir: Path, spec: ImageSpec) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(function_dir(cache_dir, spec))
