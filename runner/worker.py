"""The runner: takes its organization's TODO tasks from JetStream and runs them.

All runners of one organization share one durable pull consumer on the organization's
subject of the work-queue stream, so each message goes to one of them. A message only
says "this task is TODO"; the runner then asks the API to start the task with its
runner id, which takes the task's lease: if another runner holds it, or the task is no
longer TODO (a JetStream redelivery, a duplicate), the API says no and the message is
dropped. So a task never runs twice at once, whatever NATS delivers.

While a task runs the runner renews its lease every few seconds; the answer carries the
task's status, and anything but DOING (canceled by its owner, or handed to another run)
stops the container. If this runner dies, the lease expires and the API retries the
task on another runner once, then fails it (INTERNAL); the container and working dir it
left are removed by the housekeeping of its organization's runners (runner/housekeeping.py),
which also bounds the prepared images.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from app.events.background import stop_task, wake_or_poll
from app.execution.dispatcher import DispatchConfig, ensure_tasks_stream
from app.metrics import CONTAINER_SECONDS
from consort.errors import ServerError
from runner.api import ApiError, ChecksumMismatch, ConnectionFailed, ErrorType, RunnerApi
from runner.cache import FileCache
from runner.contract import (
    Backend,
    BuildError,
    ImageGone,
    ImageSourceKind,
    ImageSpec,
    LogSink,
    RunResult,
    RunSpec,
)
from runner.housekeeping import Housekeeper
from runner.workspace import ExecutionFailure, InputUnavailable, Workspace

log = logging.getLogger(__name__)

# A copy of the log is kept to store it as the failure report's artifact; past this size
# only its head and tail are kept (the API keeps the whole log).
LOG_COPY_MAX = 4 * 1024**2


def default_runner_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    api_url: str
    token: str
    org: str
    nats_url: str
    home: Path
    runner_id: str = dataclasses.field(default_factory=default_runner_id)
    concurrency: int = 2
    lease_s: float = 30.0
    # How often the lease is renewed, hence how fast a cancel stops the container.
    heartbeat_s: float = 2.0
    task_timeout_s: float = 3600.0
    cpus: float | None = None
    memory_bytes: int | None = None
    cache_max_bytes: int = 10 * 1024**3
    dispatch: DispatchConfig = DispatchConfig()
    # A running task is given this long to finish when the runner stops; then it is
    # stopped and handed back (its lease released at once, for another runner).
    drain_s: float = 30.0
    # Housekeeping (runner/housekeeping.py): a sweep at start, then every housekeeping_s
    # (0: never); what is younger than leftover_grace_s is never removed; at most
    # max_images prepared function images are kept (0: no bound).
    housekeeping_s: float = 30.0
    leftover_grace_s: float = 60.0
    max_images: int = 20

    @property
    def durable(self) -> str:
        return "runners-" + self.dispatch.worker_subject(self.org).rsplit(".", 1)[-1]


class Runner:
    def __init__(self, config: RunnerConfig, backend: Backend,
                 *, api: RunnerApi | None = None) -> None:
        self.config = config
        self.backend = backend
        self.api = api or RunnerApi(config.api_url, config.token)
        self.cache = FileCache(config.home / "cache", config.cache_max_bytes)
        self.workdirs = config.home / "tasks"
        self._nc: NatsClient | None = None
        self._slots = asyncio.Semaphore(config.concurrency)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancels: dict[str, asyncio.Event] = {}
        self._stopping = asyncio.Event()
        # Tasks stopped by our own shutdown: their leases are released, not left to expire.
        self._handing_back: set[str] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._images: dict[str, str] = {}
        self._functions: dict[str, dict[str, Any]] = {}
        self._image_locks: dict[str, asyncio.Lock] = {}
        # Functions of the tasks being run: their images are never pruned meanwhile.
        self._functions_in_use: Counter[str] = Counter()
        self.housekeeping = Housekeeper(
            org=config.org, backend=backend, api=self.api, workdirs=self.workdirs,
            running=self._running.keys, images_in_use=self._images_in_use,
            grace_s=config.leftover_grace_s, max_images=config.max_images)
        self._housekeeping_task: asyncio.Task[None] | None = None
        # Figures for tests and bench: task key → monotonic time of each phase (fetched
        # from NATS, start accepted by the API, inputs ready), and how the run ended.
        self.phases: dict[str, dict[str, float]] = {}
        self.results: dict[str, RunResult] = {}

    # -- lifetime --------------------------------------------------------------------------

    async def start(self) -> None:
        self.workdirs.mkdir(parents=True, exist_ok=True)
        self._loop_task = asyncio.create_task(self._consume(), name=f"runner-{self.config.org}")
        if self.config.housekeeping_s > 0:
            self._housekeeping_task = asyncio.create_task(
                self.housekeeping.run_forever(self.config.housekeeping_s),
                name=f"housekeeping-{self.config.org}")
        log.info("runner %s for %s started (%s backend, %d at a time)", self.config.runner_id,
                 self.config.org, self.backend.name, self.config.concurrency)

    async def stop(self, *, drain_s: float | None = None) -> None:
        """Stop taking tasks; let running ones finish within `drain_s`, then stop their
        containers and hand them back to be run elsewhere."""
        self._stopping.set()
        for task in (self._housekeeping_task, self._loop_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        running = list(self._running.values())
        if running:
            _, pending = await asyncio.wait(
                running, timeout=self.config.drain_s if drain_s is None else drain_s)
            for key, task in list(self._running.items()):
                cancel = self._cancels.get(key)  # None: not started yet, or just ended
                if task in pending and cancel is not None:
                    self._handing_back.add(key)
                    cancel.set()
            if pending:
                await asyncio.wait(pending, timeout=15)
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await asyncio.wait_for(self._nc.close(), timeout=5)
        await self.api.close()
        await self.backend.close()

    # -- taking tasks ----------------------------------------------------------------------

    async def _subscription(self) -> Any:
        cfg = self.config
        if self._nc is None or self._nc.is_closed:
            self._nc = await nats.connect(
                cfg.nats_url, name=f"consort-runner-{cfg.runner_id}", allow_reconnect=True,
                max_reconnect_attempts=-1, reconnect_time_wait=1, connect_timeout=2)
        js = self._nc.jetstream()
        await ensure_tasks_stream(js, cfg.dispatch)
        # ack_wait only covers a runner dying between fetch and start: once started, the
        # lease (not JetStream) decides who runs the task.
        return await js.pull_subscribe(
            cfg.dispatch.worker_subject(cfg.org), durable=cfg.durable, stream=cfg.dispatch.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30,
                                  max_ack_pending=-1))

    async def _consume(self) -> None:
        sub = None
        while not self._stopping.is_set():
            try:
                if sub is None:
                    sub = await self._subscription()
                await self._slots.acquire()
                try:
                    msgs = await sub.fetch(1, timeout=5)
                except BaseException:
                    self._slots.release()
                    raise
                for msg in msgs:
                    self._spawn_for(msg)
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                log.warning("runner %s: NATS unavailable (%s); retrying", self.config.org, exc)
                sub = None
                await asyncio.sleep(1)

    def _spawn_for(self, msg: Msg) -> None:
        async def handle() -> None:
            try:
                await self._handle(msg)
            finally:
                self._slots.release()

        task = asyncio.create_task(handle())
        key = _task_key(msg)
        self._running[key] = task
        task.add_done_callback(lambda _: self._running.pop(key, None))

    async def _handle(self, msg: Msg) -> None:
        """Start the task and, meanwhile, prepare it: the API's answer to the start opens
        the gate in front of the process (see Backend.run). A refused start (not TODO any
        more, or another runner holds it) closes it, and the preparation is thrown away."""
        key = _task_key(msg)
        fetched = time.monotonic()
        start = asyncio.create_task(self._start(key, msg))
        run = _Run(key, start, fetched, json.loads(msg.data).get("task"))
        self._cancels[key] = run.cancel
        try:
            await self._execute(run)
        finally:
            if not start.done():
                start.cancel()
            with contextlib.suppress(BaseException):
                await start
            self._cancels.pop(key, None)

    async def _start(self, key: str, msg: Msg) -> dict[str, Any] | None:
        """The task as started for this runner (with its lease), or None if refused."""
        try:
            # Sent again (by the client) when the connection broke: the API answers a
            # repeated start by the same runner with the lease it already holds.
            started = await self.api.act(key, "start", self.config.runner_id,
                                         lease_seconds=self.config.lease_s)
        except ConnectionFailed as exc:
            log.warning("task %s: API unreachable (%s); redelivering", key, exc)
            await msg.nak(delay=2)
            return None
        except ApiError as exc:
            log.debug("task %s not started: %s", key, exc)
            await msg.ack()
            return None
        await msg.ack()
        return started

    # -- running one task ------------------------------------------------------------------

    async def _execute(self, run: _Run) -> None:
        key = run.key
        logs = LogShipper(self.api, key, allowed=run.owned)
        workdir = self.workdirs / f"{key}-{uuid.uuid4().hex[:8]}"
        try:
            await self._run(run, workdir, logs)
        except BuildError as exc:
            await self._fail(run, logs, "BUILD", f"image build failed: {exc}")
        except ExecutionFailure as exc:
            await self._fail(run, logs, "EXECUTION", str(exc))
        except (InputUnavailable, ChecksumMismatch, ApiError, httpx.HTTPError, OSError) as exc:
            log.warning("task %s: %r", key, exc)
            await self._fail(run, logs, "INTERNAL", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - anything of ours fails the task, never hangs it
            log.exception("task %s: internal error", key)
            await self._fail(run, logs, "INTERNAL", f"{type(exc).__name__}: {exc}")
        finally:
            if run.heartbeat is not None:
                run.heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run.heartbeat
            await logs.close()
            await asyncio.to_thread(shutil.rmtree, workdir, True)

    async def _run(self, run: _Run, workdir: Path, logs: LogShipper) -> None:
        # Prepared while the start is being recorded, from what the dispatcher sent (a
        # task's inputs and outputs never change), or else from the API.
        task = run.task or await self.api.task(run.key)
        function = await self._function(task["function_key"])
        self._functions_in_use[function["key"]] += 1
        try:
            await self._run_function(run, task, function, workdir, logs)
        finally:
            self._functions_in_use[function["key"]] -= 1
            if self._functions_in_use[function["key"]] <= 0:
                del self._functions_in_use[function["key"]]

    async def _run_function(self, run: _Run, task: dict[str, Any], function: dict[str, Any],
                            workdir: Path, logs: LogShipper) -> None:
        key = run.key
        image = await self._image(function, logs.write)
        workspace = Workspace(self.api, self.cache, task, function, workdir)
        inputs = await workspace.prepare_inputs()
        outputs = workspace.output_entries()
        self.phases[key] = {"fetched": run.fetched, "prepared": time.monotonic()}
        spec = RunSpec(
            task_key=key, image=image, command=list(function["command"]),
            entrypoint=function.get("entrypoint"), environment=dict(function["environment"]),
            gpu=bool(function["gpu"]), workdir=workdir, inputs=inputs, outputs=outputs,
            timeout_s=self.config.task_timeout_s, cpus=self.config.cpus,
            memory_bytes=self.config.memory_bytes, org=self.config.org,
            runner_id=self.config.runner_id,
        )

        async def gate() -> bool:
            if await run.owned():
                self.phases[key]["started"] = time.monotonic()
                run.heartbeat = asyncio.create_task(self._heartbeat(key, run.cancel))
                return True
            return False

        try:
            result = await self.backend.run(spec, logs.write, run.cancel, gate)
        except ImageGone:
            # Another runner sharing the engine pruned the image since we prepared it
            # (nothing ran yet): prepare it again, once.
            self._images.pop(function["key"], None)
            spec = dataclasses.replace(spec, image=await self._image(function, logs.write))
            result = await self.backend.run(spec, logs.write, run.cancel, gate)
        if not await run.owned():
            return  # another runner's, or no longer TODO: nothing ran
        self.results[key] = result
        outcome = ("canceled" if result.canceled else "timed_out" if result.timed_out
                   else "ok" if result.exit_code == 0 else "failed")
        CONTAINER_SECONDS.labels(self.backend.name, outcome).observe(result.duration_s)
        await logs.flush()
        if run.cancel.is_set():
            if key in self._handing_back:
                await self._hand_back(key)
            return  # canceled by its owner, or another run holds it now: nothing to report
        if result.timed_out:
            raise ExecutionFailure(f"timed out after {self.config.task_timeout_s:g} s")
        if result.exit_code is None:
            raise ExecutionFailure(f"the function could not be started: {result.error}")
        if result.exit_code != 0:
            detail = f" ({result.error})" if result.error else ""
            raise ExecutionFailure(f"the function exited with code {result.exit_code}{detail}")
        await workspace.register_outputs(outputs)
        await self.api.act(key, "done", self.config.runner_id)

    async def _function(self, key: str) -> dict[str, Any]:
        """A function, cached: functions never change once registered."""
        if key not in self._functions:
            self._functions[key] = await self.api.asset("functions", key)
        return self._functions[key]

    def _images_in_use(self) -> set[str]:
        return {self._images[key] for key in self._functions_in_use if key in self._images}

    async def _image(self, function: dict[str, Any], on_log: LogSink) -> str:
        """The function's image, prepared once per runner; a build's output goes to
        `on_log` (the log of the task that triggered it)."""
        key = function["key"]
        lock = self._image_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._images:
                return self._images[key]
            source = ImageSourceKind(function["image_source"])
            archive: Path | None = None
            checksum: str | None = None
            if source is not ImageSourceKind.IMAGE_REFERENCE:
                checksum = str(function["image"])
                archive = await self.cache.get(
                    checksum, lambda path: self.api.client.download_function_archive(
                        key, path, checksum=checksum))
            image = await self.backend.prepare_image(ImageSpec(
                function_key=key, source=source, checksum=checksum, archive_path=archive,
                reference=function["image"] if archive is None else None), on_log)
            self._images[key] = image
            return image

    async def _heartbeat(self, key: str, cancel: asyncio.Event) -> None:
        while not cancel.is_set():
            await asyncio.sleep(self.config.heartbeat_s)
            try:
                status = await self.api.renew(key, self.config.runner_id, self.config.lease_s)
            except (ConnectionFailed, ServerError) as exc:
                # The API is away or failing for a moment (a 503 database_unavailable):
                # the lease outlives a few beats, so try again at the next one.
                log.warning("task %s: lease not renewed (%s)", key, exc)
                continue
            except ApiError as exc:
                log.warning("task %s: lease lost (%s); stopping it", key, exc.code)
                cancel.set()
                return
            if status != "DOING":
                log.info("task %s is %s; stopping it", key, status)
                cancel.set()

    async def _hand_back(self, key: str) -> None:
        with contextlib.suppress(ApiError, httpx.HTTPError):
            await self.api.release(key, self.config.runner_id)

    async def _fail(self, run: _Run, logs: LogShipper, error_type: ErrorType, message: str
                    ) -> None:
        """Report a failure with the log stored as an artifact, if the task is ours."""
        if not await run.owned() or run.cancel.is_set():
            return  # refused, canceled or taken over: the task is not ours to fail
        await logs.write(f"[consort] {message}\n".encode())
        await logs.flush()
        checksum = None
        with contextlib.suppress(ApiError, httpx.HTTPError, OSError):
            checksum = await logs.store()
        try:
            await self.api.act(run.key, "fail", self.config.runner_id, error_type=error_type,
                               message=message[:10_000], logs_checksum=checksum)
        except (ApiError, httpx.HTTPError) as exc:
            # The lease will expire and the API retries or fails the task itself.
            log.warning("task %s: could not report the failure: %s", run.key, exc)


@dataclasses.dataclass
class _Run:
    """One attempt at a task by this runner, from the NATS message to its end."""

    key: str
    start: asyncio.Task[dict[str, Any] | None]
    fetched: float
    task: dict[str, Any] | None = None
    cancel: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    heartbeat: asyncio.Task[None] | None = None

    async def owned(self) -> bool:
        """Whether the API started the task for this runner (waits for its answer)."""
        try:
            return await asyncio.shield(self.start) is not None
        except Exception:  # noqa: BLE001 - a start that blew up is not a start
            return False


def _task_key(msg: Msg) -> str:
    return str(json.loads(msg.data)["task_key"])


class LogShipper:
    """Appends a task's stdout/stderr to its log through the API while it runs, in
    order, in pieces of at most 64 kB sent at most every 0.2 s.

    `allowed` is awaited before anything is sent: what was written while the start was
    being recorded (the image build's output) is sent once the task is ours, and dropped
    if it is not (another runner's task must not get our lines)."""

    PIECE = 64 * 1024

    def __init__(self, api: RunnerApi, key: str, every_s: float = 0.2, *,
                 allowed: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.api = api
        self.key = key
        self.every_s = every_s
        self._allowed = allowed
        self._pending = bytearray()
        self._copy = bytearray()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._ship())

    async def write(self, data: bytes) -> None:
        self._pending += data
        if len(self._copy) < LOG_COPY_MAX:
            self._copy += data[: LOG_COPY_MAX - len(self._copy)]
        if len(self._pending) >= self.PIECE:
            self._wake.set()

    async def flush(self) -> None:
        async with self._lock:
            if self._allowed is not None and not await self._allowed():
                self._pending.clear()
                return
            while self._pending:
                piece = bytes(self._pending[: self.PIECE])
                try:
                    await self.api.append_logs(self.key, piece)
                except (ApiError, httpx.HTTPError) as exc:
                    log.warning("task %s: log lost (%s)", self.key, exc)
                del self._pending[: len(piece)]

    async def store(self) -> str:
        """Upload the log as an artifact (for the failure report); returns its SHA-256."""
        with tempfile.TemporaryDirectory(prefix="consort-log-") as tmp:
            path = Path(tmp) / "log"
            path.write_bytes(bytes(self._copy))
            return await self.api.upload(path)

    async def _ship(self) -> None:
        while True:
            await wake_or_poll(self._wake, self.every_s)
            self._wake.clear()
            await self.flush()

    async def close(self) -> None:
        await stop_task(self._task)
        await self.flush()
