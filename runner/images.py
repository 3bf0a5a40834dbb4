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
tail of the build or load log. Everything here blocks: backends call it from threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import docker
import docker.errors

from app.storage.archives import UnsafeArchive, has_root_dockerfile, unpack_archive
from runner.contract import BuildError, ImageSourceKind, ImageSpec

TAG_REPOSITORY = "consort-fn"
LOG_TAIL_LINES = 40
LABEL_FUNCTION = "consort.function_key"
LABEL_CHECKSUM = "consort.checksum"


def function_tag(spec: ImageSpec) -> str:
    """`consort-fn/<function_key>:<checksum[:16]>`, lowered and cleaned to what Docker
    accepts in a repository path and a tag."""
    name = re.sub(r"[^a-z0-9]+", "-", spec.function_key.lower()).strip("-") or "function"
    return f"{TAG_REPOSITORY}/{name}:{archive_checksum(spec)[:16]}"


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


def prepare_docker_image(client: docker.DockerClient, spec: ImageSpec) -> str:
    """The image name to run for `spec`, building, loading or pulling it when missing."""
    if spec.source is ImageSourceKind.IMAGE_REFERENCE:
        return ensure_reference(client, _reference(spec))
    tag = function_tag(spec)
    if _has_image(client, tag):
        return tag
    if spec.source is ImageSourceKind.DOCKERFILE_ARCHIVE:
        build_dockerfile_archive(client, spec, tag)
    else:
        load_image_tarball(client, spec, tag)
    return tag


def build_dockerfile_archive(client: docker.DockerClient, spec: ImageSpec, tag: str) -> None:
    archive = _archive(spec)
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
            tail = _follow_build(stream)
        except docker.errors.DockerException as exc:
            raise BuildError(f"docker build of {tag} failed: {_explain(exc)}") from exc
    if not _has_image(client, tag):
        raise BuildError(f"docker build of {tag} ended without an image", log_tail=tail)


def load_image_tarball(client: docker.DockerClient, spec: ImageSpec, tag: str) -> None:
    archive = _archive(spec)
    try:
        with archive.open("rb") as data:
            # The low-level stream rather than images.load(): its lines are the log tail.
            stream = client.api.load_image(data)
            tail, loaded = _follow_load(stream)
    except docker.errors.DockerException as exc:
        raise BuildError(f"docker load of {archive.name} failed: {_explain(exc)}") from exc
    except OSError as exc:
        raise BuildError(f"cannot read the image tarball {archive.name}: {exc}") from exc
    if not loaded:
        raise BuildError(f"docker load of {archive.name} gave no image", log_tail=tail)
    # A tarball holding several images: the first one is the function's (docker run would
    # need a name too, and the first is the one `docker save IMAGE` puts first).
    try:
        image = client.images.get(loaded[0])
        repository, _, version = tag.rpartition(":")
        image.tag(repository, version)
    except docker.errors.DockerException as exc:
        raise BuildError(f"cannot tag the loaded image {loaded[0]}: {_explain(exc)}") from exc


def ensure_reference(client: docker.DockerClient, reference: str) -> str:
    """`reference` when the engine has it, else pulled (the only time we pull)."""
    if _has_image(client, reference):
        return reference
    lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    try:
        for event in client.api.pull(reference, stream=True, decode=True):
            _remember(lines, event)
            if "error" in event:
                raise BuildError(
                    f"cannot pull {reference}: {event['error']}", log_tail=_text(lines)
                )
    except docker.errors.DockerException as exc:
        raise BuildError(f"cannot pull {reference}: {_explain(exc)}") from exc
    if not _has_image(client, reference):
        raise BuildError(f"pull of {reference} ended without the image", log_tail=_text(lines))
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


def _follow_build(stream: Iterable[dict[str, Any]]) -> str:
    lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    for event in stream:
        _remember(lines, event)
        if "error" in event or "errorDetail" in event:
            detail = event.get("error") or event.get("errorDetail", {}).get("message", "")
            raise BuildError(f"docker build failed: {str(detail).strip()}", log_tail=_text(lines))
    return _text(lines)


def _follow_load(stream: Iterable[dict[str, Any]]) -> tuple[str, list[str]]:
    lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    loaded: list[str] = []
    for event in stream:
        _remember(lines, event)
        if "error" in event or "errorDetail" in event:
            detail = event.get("error") or event.get("errorDetail", {}).get("message", "")
            raise BuildError(f"docker load failed: {str(detail).strip()}", log_tail=_text(lines))
        message = str(event.get("stream", ""))
        for prefix in ("Loaded image: ", "Loaded image ID: "):
            if message.startswith(prefix):
                loaded.append(message[len(prefix):].strip())
    return _text(lines), loaded


def _remember(lines: deque[str], event: dict[str, Any]) -> None:
    # Progress bars are left out: the tail is for a human reading why a build failed.
    for field in ("stream", "status", "error"):
        text = event.get(field)
        if isinstance(text, str) and text.strip():
            lines.append(text.rstrip())


def _text(lines: Iterable[str]) -> str:
    return "\n".join(lines)


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
