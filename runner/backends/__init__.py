"""Execution backends: Docker containers, or local processes when no engine answers.

Owns the choice between them (`choose_backend`); each backend module owns its own way of
honouring runner.contract.
"""

from __future__ import annotations

import os
from pathlib import Path

import docker

from runner.backends.docker_backend import DockerBackend
from runner.backends.subprocess_backend import SubprocessBackend
from runner.contract import BackendChoice, BackendOptions

__all__ = ["DockerBackend", "SubprocessBackend", "choose_backend", "default_cache_dir"]


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/consort/runner`, or `~/.cache/consort/runner`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "consort" / "runner"


def choose_backend(options: BackendOptions) -> BackendChoice:
    """Docker when an engine answers `ping()` (or when preferred: then it must answer),
    else the subprocess backend; the reason is meant for the runner's start message."""
    if options.prefer not in (None, "docker", "subprocess"):
        raise ValueError(f"unknown backend {options.prefer!r} (docker or subprocess)")
    if options.prefer != "subprocess":
        client, problem = _engine(options)
        if client is not None:
            version = client.version().get("Version", "?")
            backend = DockerBackend(
                client,
                user=options.docker_user,
                close_client=options.docker_client is None,
            )
            user = options.docker_user or "the image's user"
            return BackendChoice(backend, f"docker: engine {version} answers; tasks run as {user}")
        if options.prefer == "docker":
            raise RuntimeError(f"the docker backend was asked for, but {problem}")
        why = f"no Docker engine ({problem})"
    else:
        why = "asked for"
    backend_ = SubprocessBackend(
        options.cache_dir or default_cache_dir(),
        user=options.subprocess_user,
        pass_env=options.subprocess_pass_env,
    )
    caveats = [
        "network isolated with unshare" if backend_.isolates_network else "NO network isolation"
    ]
    if os.geteuid() == 0 and options.subprocess_user is None:
        caveats.append("functions run as root, so input/ is NOT read-only to them")
    return BackendChoice(
        backend_,
        f"subprocess: {why}; functions run on the host without container isolation, "
        + ", ".join(caveats),
    )


def _engine(options: BackendOptions) -> tuple[docker.DockerClient | None, str]:
    client = options.docker_client
    try:
        if client is None:
            client = docker.from_env(timeout=options.ping_timeout_s)
            client.ping()
            # The short ping timeout was for the answer only: builds and loads take longer.
            client.close()
            client = docker.from_env(timeout=300, max_pool_size=64)
        else:
            client.ping()
    except Exception as exc:  # any failure to talk to the engine means "no engine"
        return None, f"{type(exc).__name__}: {exc}"
    return client, ""
