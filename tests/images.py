"""Test images for the execution backends, built locally (no registry is reachable).

- `consort-test/busybox:1`: Debian's static busybox (`apt-get download busybox-static`,
  `dpkg -x`) with one symlink per applet, `/etc/passwd` and `/etc/group` naming root and
  nobody (65534), a world-writable `/tmp`; `docker import`ed. About 2 MB, a few seconds.
- `consort-test/python:1`: `debootstrap --variant=minbase --include=python3 bookworm`
  from the Debian mirror apt is configured with; `docker import`ed. About a minute.

Each is built only when its tag is missing, so the engine's image store is the cache
(bump the tag's number when the recipe changes). Building needs root, apt-get and, for the
Python image, debootstrap (installed with apt-get when missing).

Session-scoped pytest fixtures `docker_engine`, `busybox_image` and `python_image` live
here. A test module brings them in by assignment (`docker_engine = images.docker_engine`;
an import would read to linters as a name redefined by each test's parameter), or
tests/conftest.py with `pytest_plugins = ["tests.images"]`. Without an engine they skip,
or fail with CI=true.
`python -m tests.images` builds both images ahead of a test run (.ci/run does).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

BUSYBOX_IMAGE = "consort-test/busybox:1"
PYTHON_IMAGE = "consort-test/python:1"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
IMAGE_CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    'CMD ["sh"]',
]
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


class ImageBuildFailed(RuntimeError):
    """A test image could not be built (missing tool, no mirror, engine error)."""


def docker_client() -> docker.DockerClient | None:
    """A client when a Docker engine answers, else None."""
    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except Exception:
        return None
    return client


def image_exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def ensure_busybox_image(client: docker.DockerClient) -> str:
    if image_exists(client, BUSYBOX_IMAGE):
        return BUSYBOX_IMAGE
    with tempfile.TemporaryDirectory(prefix="consort-busybox-") as scratch:
        work = Path(scratch)
        _run(["apt-get", "download", "busybox-static"], cwd=work)
        debs = sorted(work.glob("busybox-static_*.deb"))
        if not debs:
            raise ImageBuildFailed("apt-get download busybox-static gave no .deb")
        root = work / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        busybox = root / "bin" / "busybox"
        applets = _run([str(busybox), "--list"]).split()
        for applet in applets:
            link = root / "bin" / applet
            if not link.exists():
                link.symlink_to("busybox")
        for directory in ("etc", "tmp", "proc", "sys", "dev", "usr/bin"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        (root / "tmp").chmod(0o1777)
        (root / "etc" / "passwd").write_text(PASSWD)
        (root / "etc" / "group").write_text(GROUP)
        # `#!/usr/bin/env sh` scripts need env where Debian puts it.
        (root / "usr" / "bin" / "env").symlink_to("/bin/busybox")
        _import(client, root, work / "rootfs.tar", BUSYBOX_IMAGE)
    return BUSYBOX_IMAGE


def ensure_python_image(client: docker.DockerClient) -> str:
    if image_exists(client, PYTHON_IMAGE):
        return PYTHON_IMAGE
    debootstrap = shutil.which("debootstrap") or _install_debootstrap()
    with tempfile.TemporaryDirectory(prefix="consort-python-") as scratch:
        work = Path(scratch)
        root = work / "root"
        _run(
            [debootstrap, "--variant=minbase", "--include=python3", SUITE, str(root), mirror()],
            timeout=900,
        )
        # apt lists and caches are half of a minbase tree and never used by the tests.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(root / leftover, ignore_errors=True)
        _import(client, root, work / "rootfs.tar", PYTHON_IMAGE)
    return PYTHON_IMAGE


def mirror() -> str:
    """The Debian mirror apt is configured with (deb822 `URIs:` or a one-line `deb` entry),
    so debootstrap goes where apt-get already goes; CONSORT_TEST_DEBIAN_MIRROR overrides."""
    override = os.environ.get("CONSORT_TEST_DEBIAN_MIRROR")
    if override:
        return override
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        if not source.is_file() or source.name.endswith((".disabled", ".save")):
            continue
        text = source.read_text(errors="replace")
        for match in re.finditer(r"^(?:URIs:|deb(?:\s+\[[^]]*\])?)\s+(\S+)", text, re.M):
            uri = match.group(1)
            if re.search(r"/debian/?$", uri):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def _install_debootstrap() -> str:
    if os.geteuid() != 0:
        raise ImageBuildFailed("debootstrap is missing and installing it needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], env=env, timeout=600)
    _run(["apt-get", "install", "-y", "-qq", "debootstrap"], env=env, timeout=600)
    found = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin")
    if not found:
        raise ImageBuildFailed("debootstrap still missing after apt-get install")
    return found


def _import(client: docker.DockerClient, root: Path, tarball: Path, tag: str) -> None:
    # GNU tar as root keeps owners, modes and device-free trees exactly as debootstrap left them.
    _run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(tarball), "."], timeout=600)
    repository, _, version = tag.rpartition(":")
    client.api.import_image_from_file(
        str(tarball), repository=repository, tag=version, changes=IMAGE_CHANGES
    )
    if not image_exists(client, tag):
        raise ImageBuildFailed(f"docker import did not produce {tag}")


def _run(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> str:
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildFailed(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        raise ImageBuildFailed(f"{' '.join(argv[:3])} exited {done.returncode}: {tail}")
    return done.stdout


# -- pytest fixtures ----------------------------------------------------------------


def _missing(what: str) -> None:
    # The same rule as tests/conftest.py's service_missing (imported lazily: this module is
    # also run as a script, without pytest's conftest).
    from tests.conftest import service_missing

    service_missing(what)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    """A client of the machine's Docker engine (skip, or fail with CI=true, without one)."""
    client = docker_client()
    if client is None:
        _missing("a Docker engine (docker.from_env().ping())")
        raise AssertionError("unreachable")  # pragma: no cover - _missing raises
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_engine: docker.DockerClient) -> str:
    try:
        return ensure_busybox_image(docker_engine)
    except ImageBuildFailed as exc:
        _missing(f"the test image {BUSYBOX_IMAGE} ({exc})")
        raise AssertionError("unreachable") from exc  # pragma: no cover


@pytest.fixture(scope="session")
def python_image(docker_engine: docker.DockerClient) -> str:
    try:
        return ensure_python_image(docker_engine)
    except ImageBuildFailed as exc:
        _missing(f"the test image {PYTHON_IMAGE} ({exc})")
        raise AssertionError("unreachable") from exc  # pragma: no cover


def main() -> int:
    """Build the missing test images; prints one line per image with its build time."""
    client = docker_client()
    if client is None:
        print("no Docker engine answers", file=sys.stderr)
        return 1
    for tag, ensure in ((BUSYBOX_IMAGE, ensure_busybox_image), (PYTHON_IMAGE, ensure_python_image)):
        cached = image_exists(client, tag)
        started = time.monotonic()
        try:
            ensure(client)
        except ImageBuildFailed as exc:
            print(f"{tag}: FAILED: {exc}", file=sys.stderr)
            return 1
        took = time.monotonic() - started
        print(f"{tag}: {'cached' if cached else f'built in {took:.1f} s'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
