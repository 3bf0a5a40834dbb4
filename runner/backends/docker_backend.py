"""The Docker backend: every task in a fresh container, removed afterwards.

Owns the container's shape (mounts, user, limits, network, GPUs) and its supervision
(log streaming, timeout, cancellation). The Docker SDK is synchronous, so every call to it
runs on this backend's own thread pool, never on the event loop, and never on the loop's
default executor, which long waits (a container running for hours) would starve.

Inside the container the task working dir is `/consort`: `input/` is a read-only bind
mount, `output/` a writable one (chowned to the container user), `io.json` a read-only
file mount. The process runs as 65534:65534 unless configured otherwise, with
no-new-privileges, without network unless the task asks for it.

Every container carries the labels `consort.task_key`, `consort.org` and `consort.runner`
(the runner id): housekeeping lists an organization's containers by them to find what a
killed runner left (`leftovers`). Prepared images are bounded by `prune_images`
(runner/images.py); each run marks its image as used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import DeviceRequest, LogConfig, Mount

from runner import images
from runner.contract import (
    CONTAINER_WORKDIR,
    INPUT_DIR,
    IO_ENV,
    IO_FILE_NAME,
    OUTPUT_DIR,
    STOP_GRACE_S,
    Gate,
    ImageGone,
    ImageSpec,
    Leftover,
    LogSink,
    RunResult,
    RunSpec,
    prepare_workdir,
    write_io_file,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_USER = "65534:65534"
LABEL_TASK = "consort.task_key"
LABEL_RUNNER = "consort.runner"
LABEL_ORG = "consort.org"
# How long a build may wait for the task log to take a line before its output is dropped
# (the loop is stuck or gone: the build itself must go on).
EMIT_TIMEOUT_S = 30.0
LOG_QUEUE_CHUNKS = 256
LOG_BATCH_BYTES = 64 * 1024
LOG_DRAIN_TIMEOUT_S = 10.0
IO_PATH_IN_CONTAINER = f"{CONTAINER_WORKDIR}/{IO_FILE_NAME}"


class DockerBackend:
    """Runs tasks in containers of a Docker engine (see the module docstring)."""

    name = "docker"

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        *,
        close_client: bool | None = None,  # default: only a client made here
        user: str | None = DEFAULT_USER,
        security_opt: tuple[str, ...] = ("no-new-privileges",),
        max_threads: int = 64,
        stop_grace_s: float = STOP_GRACE_S,
        image_repository: str = images.TAG_REPOSITORY,
    ) -> None:
        # Each running task holds two threads (wait, logs): max_threads bounds parallel
        # tasks at about half of it. The pool of HTTP connections matches.
        self._owns_client = client is None if close_client is None else close_client
        self._client = client or docker.from_env(timeout=300, max_pool_size=max_threads)
        self._user = user
        self._security_opt = list(security_opt)
        self._stop_grace_s = stop_grace_s
        # Where prepared images are tagged, and the only images prune_images touches.
        self.image_repository = image_repository
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="consort-docker"
        )
        self._image_locks: dict[str, asyncio.Lock] = {}

    @property
    def client(self) -> docker.DockerClient:
        return self._client

    async def prepare_image(self, spec: ImageSpec, on_log: LogSink | None = None) -> str:
        # One preparation per image at a time: concurrent tasks of a new function wait for
        # the first build instead of starting their own (only the first one's log gets
        # the build's output).
        key = f"{spec.function_key}/{spec.source}/{spec.checksum or spec.reference}"
        lock = self._image_locks.setdefault(key, asyncio.Lock())
        emit = _emitter(on_log, asyncio.get_running_loop()) if on_log is not None else None
        async with lock:
            return await self._call(images.prepare_docker_image, self._client, spec, emit,
                                    self.image_repository)

    async def run(self, spec: RunSpec, on_log: LogSink, cancel: asyncio.Event,
                  gate: Gate | None = None) -> RunResult:
        called = time.monotonic()
        if cancel.is_set():
            return RunResult(None, timed_out=False, canceled=True, duration_s=0.0,
                             started_at_monotonic=called)
        create_kwargs = await self._call(self._prepare, spec)
        try:
            container = await self._call(self._client.containers.create, **create_kwargs)
        except docker.errors.ImageNotFound as exc:
            raise ImageGone(f"image {spec.image} is not in the engine: prepare it first") from exc
        except docker.errors.APIError as exc:
            return await self._refused(on_log, called, f"cannot create the container: {_why(exc)}")
        self._touch(spec.image)
        try:
            if gate is not None and not await gate():
                return RunResult(None, timed_out=False, canceled=True, duration_s=0.0,
                                 started_at_monotonic=time.monotonic())
            return await self._supervise(container, spec, on_log, cancel, called)
        finally:
            await self._call(self._remove, container)

    # -- housekeeping --------------------------------------------------------------------

    async def leftovers(self, org: str) -> list[Leftover]:
        filters = {"label": [f"{LABEL_ORG}={org}", LABEL_TASK]}
        found = await self._call(self._client.api.containers, all=True, filters=filters)
        leftovers = []
        for summary in found:
            # The list gives whole seconds; the grace period deserves the exact time.
            with contextlib.suppress(docker.errors.NotFound):
                attrs = await self._call(self._client.api.inspect_container, summary["Id"])
                created = images.engine_time(attrs.get("Created"))
                leftovers.append(_leftover(summary, created))
        return leftovers

    async def remove_leftover(self, leftover: Leftover) -> None:
        def remove() -> None:
            with contextlib.suppress(docker.errors.NotFound):
                self._client.api.remove_container(leftover.id, force=True, v=True)

        await self._call(remove)

    async def prune_images(
        self, keep: int, *, protect: Collection[str] = (), grace_s: float = 0.0
    ) -> list[str]:
        return await self._call(
            images.prune_function_images, self._client, keep,
            repository=self.image_repository, protect=protect, grace_s=grace_s)

    async def close(self) -> None:
        # Not waiting: a thread stuck on the engine must not hang the runner's shutdown.
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._owns_client:
            self._client.close()

    # -- the container -------------------------------------------------------------------

    def _prepare(self, spec: RunSpec) -> dict[str, Any]:
        """Blocking: permissions of the work dir, io.json, and the create() arguments."""
        input_dir, output_dir = prepare_workdir(
            spec, output_owner=_numeric_owner(self._user), input_mode="readable"
        )
        io_file = write_io_file(spec, CONTAINER_WORKDIR)
        command = list(spec.command) or self._image_command(spec.image)
        return container_kwargs(
            spec,
            command=[*command, IO_PATH_IN_CONTAINER],
            mounts=[
                Mount(f"{CONTAINER_WORKDIR}/{INPUT_DIR}", str(input_dir.resolve()),
                      type="bind", read_only=True),
                Mount(f"{CONTAINER_WORKDIR}/{OUTPUT_DIR}", str(output_dir.resolve()),
                      type="bind", read_only=False),
                Mount(IO_PATH_IN_CONTAINER, str(io_file.resolve()), type="bind", read_only=True),
            ],
            user=self._user,
            security_opt=self._security_opt,
        )

    def _image_command(self, image: str) -> list[str]:
        # No command given: the image's own CMD, so that io.json can still be appended.
        try:
            config = self._client.images.get(image).attrs.get("Config") or {}
        except docker.errors.ImageNotFound as exc:
            raise ImageGone(f"image {image} is not in the engine: prepare it first") from exc
        return list(config.get("Cmd") or [])

    def _touch(self, image: str) -> None:
        """Record the use of a prepared image for pruning, off the task's path: the
        container now holds the image, so nothing waits for this."""
        if not image.startswith(self.image_repository + "/"):
            return
        future = self._executor.submit(images.touch_function_image, self._client, image)
        future.add_done_callback(_log_failure)

    async def _supervise(
        self, container: Container, spec: RunSpec, on_log: LogSink, cancel: asyncio.Event,
        called: float,
    ) -> RunResult:
        loop = asyncio.get_running_loop()
        try:
            started = await self._call(_start, container)
        except docker.errors.APIError as exc:
            message = f"cannot start the container: {_why(exc)}"
            if spec.gpu and "capabilities: [[gpu]]" in message:
                message += " (the task asks for GPUs: the engine has none, or no NVIDIA runtime)"
            return await self._refused(on_log, called, message)
        pump = _LogPump(container, loop)
        reader = loop.run_in_executor(self._executor, pump.read)
        delivery = asyncio.create_task(pump.deliver(on_log))
        waiter = loop.run_in_executor(self._executor, container.wait)
        canceled = timed_out = False
        cancel_wait = asyncio.create_task(cancel.wait())
        try:
            remaining = max(0.0, spec.timeout_s - (time.monotonic() - started))
            done, _ = await asyncio.wait(
                {waiter, cancel_wait}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if waiter not in done:
                if cancel_wait in done:
                    canceled = True
                    await self._call(_stop, container, self._stop_grace_s)
                else:
                    timed_out = True
                    await self._call(_kill, container)
            status = await waiter
            ended = time.monotonic()
            # Every log chunk reaches on_log before the result does.
            await _finish_logs(pump, reader, delivery)
        finally:
            cancel_wait.cancel()
            pump.stop()
            if not delivery.done():
                delivery.cancel()
        return RunResult(
            exit_code=int(status.get("StatusCode", -1)),
            timed_out=timed_out,
            canceled=canceled,
            duration_s=ended - started,
            started_at_monotonic=started,
        )

    async def _refused(self, on_log: LogSink, called: float, message: str) -> RunResult:
        """The engine refused the container: a missing executable reads like a shell's 127."""
        message = message.strip()
        exit_code: int | None = None
        if re.search(r"executable file not found|no such file or directory", message, re.I):
            exit_code = 127
        elif re.search(r"permission denied", message, re.I):
            exit_code = 126
        with contextlib.suppress(Exception):
            await on_log(f"consort: {message}\n".encode())
        return RunResult(exit_code, timed_out=False, canceled=False, duration_s=0.0,
                         started_at_monotonic=called, error=message)

    def _remove(self, container: Container) -> None:
        try:
            container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError:
            log.exception("could not remove container %s", container.id)

    async def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))


def container_kwargs(
    spec: RunSpec,
    *,
    command: list[str],
    mounts: list[Mount],
    user: str | None,
    security_opt: list[str],
) -> dict[str, Any]:
    """The arguments of containers.create() for `spec` (pure: tested without an engine)."""
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": command,
        "environment": {**spec.environment, IO_ENV: IO_PATH_IN_CONTAINER},
        "working_dir": CONTAINER_WORKDIR,
        "mounts": mounts,
        "name": _container_name(spec.task_key),
        "labels": _labels(spec),
        "security_opt": security_opt,
        # json-file whatever the daemon's default: the live log stream reads it back.
        "log_config": LogConfig(type="json-file", config={"max-size": "64m", "max-file": "2"}),
    }
    if spec.entrypoint is not None:
        # [] clears the image's entrypoint, the way `docker run --entrypoint ""` does.
        kwargs["entrypoint"] = list(spec.entrypoint) or [""]
    if user is not None:
        kwargs["user"] = user
    if not spec.network:
        kwargs["network_mode"] = "none"
    if spec.cpus is not None:
        kwargs["nano_cpus"] = int(spec.cpus * 1e9)
    if spec.memory_bytes is not None:
        kwargs["mem_limit"] = spec.memory_bytes
        kwargs["memswap_limit"] = spec.memory_bytes  # no swap beyond the limit
    if spec.gpu:
        kwargs["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return kwargs


def _labels(spec: RunSpec) -> dict[str, str]:
    labels = {LABEL_TASK: spec.task_key, LABEL_RUNNER: spec.runner_id or "1"}
    if spec.org:
        labels[LABEL_ORG] = spec.org
    return labels


def _leftover(summary: dict[str, Any], created: float | None) -> Leftover:
    """A container as the engine lists it (GET /containers/json)."""
    labels = summary.get("Labels") or {}
    return Leftover(
        id=str(summary["Id"]), task_key=labels.get(LABEL_TASK, ""),
        org=labels.get(LABEL_ORG, ""), runner_id=labels.get(LABEL_RUNNER, ""),
        created_at=created or float(summary.get("Created", 0)),
        running=summary.get("State") in ("running", "restarting", "paused"),
    )


def _emitter(on_log: LogSink, loop: asyncio.AbstractEventLoop) -> images.Emit:
    """A build thread's way to put a line into `on_log` on the loop, in order (it waits
    for each line to be taken). A sink that fails or hangs loses the rest of the build's
    output, never the build."""
    broken = threading.Event()

    async def deliver(data: bytes) -> None:
        await on_log(data)

    def emit(line: str) -> None:
        if broken.is_set():
            return
        try:
            future = asyncio.run_coroutine_threadsafe(deliver(line.encode()), loop)
        except RuntimeError:  # the loop is closed
            broken.set()
            return
        try:
            future.result(timeout=EMIT_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the sink failed, or hangs (timeout)
            future.cancel()
            broken.set()
            log.warning("build output could not reach the task log; the rest is dropped",
                        exc_info=True)

    return emit


def _log_failure(future: concurrent.futures.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("touching an image failed", exc_info=future.exception())


def _container_name(task_key: str) -> str:
    safe = re.sub(r"[^a-zA-Z0-9_.-]+", "-", task_key).strip("-.")[:64] or "task"
    return f"consort-{safe}-{uuid.uuid4().hex[:8]}"


def _why(exc: docker.errors.APIError) -> str:
    return str(exc.explanation or exc)


def _numeric_owner(user: str | None) -> tuple[int, int] | None:
    if user is None:
        return None
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        return None  # a user name: output/ becomes world-writable instead
    return int(uid), int(gid or uid)


def _start(container: Container) -> float:
    container.start()
    return time.monotonic()


def _stop(container: Container, grace_s: float) -> None:
    # SIGTERM, then SIGKILL after the grace; a shell as PID 1 ignores SIGTERM, so the kill
    # is what usually ends it.
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        container.stop(timeout=max(1, round(grace_s)))


def _kill(container: Container) -> None:
    # It may have exited on its own meanwhile (409): nothing to do then.
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        container.kill()


async def _finish_logs(
    pump: _LogPump, reader: asyncio.Future[None], delivery: asyncio.Task[None]
) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(reader), LOG_DRAIN_TIMEOUT_S)
    except TimeoutError:
        log.warning("log stream did not end %.0f s after the container", LOG_DRAIN_TIMEOUT_S)
        pump.stop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(delivery), LOG_DRAIN_TIMEOUT_S)


class _LogPump:
    """Moves the container's log stream from a thread to `on_log` on the event loop, in
    order, through a bounded queue (a slow consumer slows the reader, not the memory)."""

    def __init__(self, container: Container, loop: asyncio.AbstractEventLoop) -> None:
        self._container = container
        self._loop = loop
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(LOG_QUEUE_CHUNKS)
        self._stopped = threading.Event()
        self._stream: Any = None

    def read(self) -> None:
        """Thread: follow the logs until the container ends or stop() is called."""
        try:
            self._stream = self._container.logs(stream=True, follow=True)
            for chunk in self._chunks():
                if not self._put(chunk):
                    return
        except (docker.errors.DockerException, OSError, ValueError):
            if not self._stopped.is_set():
                log.exception("reading the logs of %s failed", self._container.id)
        finally:
            self._put(None)

    def _chunks(self) -> Iterator[bytes]:
        for chunk in self._stream:
            if self._stopped.is_set():
                return
            if chunk:
                yield bytes(chunk)

    def _put(self, item: bytes | None) -> bool:
        put = self._queue.put(item)
        try:
            future = asyncio.run_coroutine_threadsafe(put, self._loop)
        except RuntimeError:  # the loop is closed: the coroutine will never run
            put.close()
            return False
        while True:
            try:
                future.result(timeout=0.5)
                return True
            except concurrent.futures.TimeoutError:
                if self._stopped.is_set():
                    future.cancel()
                    return False

    async def deliver(self, on_log: LogSink) -> None:
        """Loop: hand queued chunks to on_log, merging what is already queued."""
        while True:
            item = await self._queue.get()
            if item is None:
                return
            batch = [item]
            size = len(item)
            end = False
            while size < LOG_BATCH_BYTES and not self._queue.empty():
                more = self._queue.get_nowait()
                if more is None:
                    end = True
                    break
                batch.append(more)
                size += len(more)
            try:
                await on_log(b"".join(batch))
            except Exception:
                # A failing sink must not stop the task nor block the reader thread.
                log.exception("on_log failed; log chunk dropped")
            if end:
                return

    def stop(self) -> None:
        self._stopped.set()
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
