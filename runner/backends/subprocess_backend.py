"""The subprocess backend: the function runs as a process of the runner's machine.

The fallback when no Docker engine answers, and a fast path for development. It honours
the contract as far as a plain process can:

- a Dockerfile archive cannot be built: it is unpacked once per checksum into the cache
  and its directory put first on PATH and PYTHONPATH and in `CONSORT_FUNCTION_DIR`; the
  command runs in the task working dir, and argv entries naming files of the function
  directory (`python train.py`) are made absolute; `python`/`python3` as argv[0] is the
  runner's own interpreter (its venv's packages are available). An image tarball needs a
  Docker engine (BuildError); an image reference runs the command on the host as is;
- input/ is made read-only with chmod (which does not stop root: give `user` when the
  runner is root), output/ belongs to the process's user;
- the environment is the function's plus a few harmless variables of the runner's
  (PATH, HOME, locale, TMPDIR): the runner's own secrets are not inherited;
- no network: as root, `unshare --net` gives the process a network namespace with only a
  loopback that is down; otherwise the network is NOT isolated (said at start-up);
- memory limit via `prlimit --as` (address space, a rough bound), no CPU limit, the
  host's GPUs as they are;
- the process is its own session and process group: timeout and cancel signal the whole
  group, and whatever it left running is killed when it exits.

Housekeeping: a runner killed mid-task leaves its function's process running, in its own
session, until it ends by itself (nothing enforces the timeout any more); its output goes
to a working dir that the runner's housekeeping removes later (runner/housekeeping.py).
The backend reports no leftovers: a bare process carries no label saying whose task it
runs, and guessing from the process table could kill a process that is not ours.
Unpacked function directories are not pruned either: they hold source files, not image
layers, and another runner sharing the cache may be running one (see ADR 0010).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

from runner import images
from runner.contract import (
    BUILD_LOG_PREFIX,
    INPUT_DIR,
    IO_ENV,
    STOP_GRACE_S,
    BuildError,
    Gate,
    ImageSourceKind,
    ImageSpec,
    Leftover,
    LogSink,
    RunResult,
    RunSpec,
    prepare_workdir,
    write_io_file,
)

log = logging.getLogger(__name__)

DIR_PREFIX = "dir:"
HOST_PREFIX = "host:"
FUNCTION_DIR_ENV = "CONSORT_FUNCTION_DIR"
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
PYTHON_NAMES = ("python", "python3")
READ_SIZE = 64 * 1024
LOG_DRAIN_TIMEOUT_S = 10.0


class SubprocessBackend:
    """Runs tasks as local processes (see the module docstring)."""

    name = "subprocess"

    def __init__(
        self,
        cache_dir: Path,
        *,
        user: tuple[int, int] | None = None,
        pass_env: tuple[str, ...] = (),
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.cache_dir = cache_dir
        self._user = user
        self._pass_env = pass_env
        self._stop_grace_s = stop_grace_s
        self._locks: dict[str, asyncio.Lock] = {}
        self.isolates_network = _can_unshare_network()

    async def prepare_image(self, spec: ImageSpec, on_log: LogSink | None = None) -> str:
        if spec.source is ImageSourceKind.IMAGE_TARBALL:
            raise BuildError(
                f"function {spec.function_key}: an image tarball needs a Docker engine, and "
                "this runner has none (subprocess backend)"
            )
        if spec.source is ImageSourceKind.IMAGE_REFERENCE:
            if not spec.reference:
                raise BuildError(f"function {spec.function_key}: image reference is empty")
            return HOST_PREFIX + spec.reference
        lock = self._locks.setdefault(f"{spec.function_key}/{spec.checksum}", asyncio.Lock())
        async with lock:
            unpacked = images.function_dir(self.cache_dir, spec).is_dir()
            directory = await asyncio.to_thread(images.unpack_function, self.cache_dir, spec)
        if not unpacked and on_log is not None:
            await on_log(f"{BUILD_LOG_PREFIX}unpacked the function's archive into {directory} "
                         "(subprocess backend: the Dockerfile is not built)\n".encode())
        return DIR_PREFIX + str(directory.resolve())

    async def run(self, spec: RunSpec, on_log: LogSink, cancel: asyncio.Event,
                  gate: Gate | None = None) -> RunResult:
        called = time.monotonic()
        if cancel.is_set():
            return RunResult(None, timed_out=False, canceled=True, duration_s=0.0,
                             started_at_monotonic=called)
        function_dir = _function_dir(spec.image)
        io_file = await asyncio.to_thread(self._prepare, spec)
        env = self._environment(spec, function_dir, io_file)
        argv = resolve_argv(
            [*(spec.entrypoint or []), *spec.command, str(io_file)], function_dir
        )
        if gate is not None and not await gate():
            await asyncio.to_thread(_restore_input_dirs, spec.workdir)
            return RunResult(None, timed_out=False, canceled=True, duration_s=0.0,
                             started_at_monotonic=time.monotonic())
        if not argv or _find_executable(argv[0], env["PATH"], spec.workdir) is None:
            message = f"command not found: {argv[0] if argv else '(empty command)'}"
            with contextlib.suppress(Exception):
                await on_log(f"consort: {message}\n".encode())
            await asyncio.to_thread(_restore_input_dirs, spec.workdir)
            return RunResult(127, timed_out=False, canceled=False, duration_s=0.0,
                             started_at_monotonic=called, error=message)
        try:
            return await self._execute(spec, self._wrap(spec, argv), env, on_log, cancel)
        finally:
            await asyncio.to_thread(_restore_input_dirs, spec.workdir)

    async def leftovers(self, org: str) -> list[Leftover]:
        return []  # see the module docstring

    async def remove_leftover(self, leftover: Leftover) -> None:
        return None

    async def prune_images(
        self, keep: int, *, protect: Collection[str] = (), grace_s: float = 0.0
    ) -> list[str]:
        return []  # see the module docstring

    async def close(self) -> None:
        return None

    # -- one process ---------------------------------------------------------------------

    def _prepare(self, spec: RunSpec) -> Path:
        prepare_workdir(spec, output_owner=self._user, input_mode="read-only")
        return write_io_file(spec, str(spec.workdir.resolve()))

    def _environment(
        self, spec: RunSpec, function_dir: Path | None, io_file: Path
    ) -> dict[str, str]:
        names = (*INHERITED_ENV, *self._pass_env)
        env = {name: os.environ[name] for name in names if name in os.environ}
        env.setdefault("PATH", os.defpath)
        env.update(spec.environment)
        env[IO_ENV] = str(io_file)
        if function_dir is not None:
            env[FUNCTION_DIR_ENV] = str(function_dir)
            env["PATH"] = os.pathsep.join([str(function_dir), env["PATH"]])
            python_path = [str(function_dir)]
            if spec.environment.get("PYTHONPATH"):
                python_path.append(spec.environment["PYTHONPATH"])
            env["PYTHONPATH"] = os.pathsep.join(python_path)
        return env

    def _wrap(self, spec: RunSpec, argv: list[str]) -> list[str]:
        """Prefix the command with the tools that apply the limits the kernel offers."""
        wrapped = list(argv)
        if spec.memory_bytes is not None and shutil.which("prlimit"):
            wrapped = ["prlimit", f"--as={spec.memory_bytes}", "--", *wrapped]
        if not spec.network and self.isolates_network:
            drop: list[str] = []
            if self._user is not None:
                # unshare needs root to make the namespace, so it drops the user itself.
                drop = ["--setuid", str(self._user[0]), "--setgid", str(self._user[1])]
            wrapped = ["unshare", "--net", *drop, "--", *wrapped]
        return wrapped

    async def _execute(
        self, spec: RunSpec, argv: list[str], env: dict[str, str], on_log: LogSink,
        cancel: asyncio.Event,
    ) -> RunResult:
        user: dict[str, object] = {}
        if self._user is not None and argv[0] != "unshare":
            user = {"user": self._user[0], "group": self._user[1], "extra_groups": []}
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=spec.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            # One pipe for both: the log keeps the order in which the process wrote.
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **user,  # type: ignore[arg-type]
        )
        started = time.monotonic()
        assert process.stdout is not None
        reader = asyncio.create_task(_pump(process.stdout, on_log))
        exited = asyncio.create_task(_exit_status(process))
        cancel_wait = asyncio.create_task(cancel.wait())
        canceled = timed_out = False
        try:
            remaining = max(0.0, spec.timeout_s - (time.monotonic() - started))
            done, _ = await asyncio.wait(
                {exited, cancel_wait}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if exited not in done:
                if cancel_wait in done:
                    canceled = True
                    _signal_group(process.pid, signal.SIGTERM)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(exited), self._stop_grace_s)
                else:
                    timed_out = True
                _signal_group(process.pid, signal.SIGKILL)
            returncode = await exited
            ended = time.monotonic()
            # Whatever it left behind in its group goes with it (and frees the pipe).
            _signal_group(process.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), LOG_DRAIN_TIMEOUT_S)
        finally:
            cancel_wait.cancel()
            if process.returncode is None:
                _signal_group(process.pid, signal.SIGKILL)
            if not exited.done():
                exited.cancel()
            if not reader.done():
                reader.cancel()
        return RunResult(
            # Killed by signal N reads 128+N, as from a shell or Docker.
            exit_code=returncode if returncode >= 0 else 128 - returncode,
            timed_out=timed_out,
            canceled=canceled,
            duration_s=ended - started,
            started_at_monotonic=started,
        )


def resolve_argv(argv: list[str], function_dir: Path | None) -> list[str]:
    """`python`/`python3` → the runner's interpreter; relative entries naming a file or
    directory of the function directory → its absolute path (the cwd is the task dir)."""
    resolved = list(argv)
    if resolved and resolved[0] in PYTHON_NAMES:
        resolved[0] = sys.executable
    if function_dir is None:
        return resolved
    root = function_dir.resolve()
    for index, arg in enumerate(resolved):
        if not arg or arg.startswith(("-", "/")) or (index == 0 and arg == sys.executable):
            continue
        candidate = root / arg
        with contextlib.suppress(OSError, RuntimeError):
            if candidate.exists() and candidate.resolve().is_relative_to(root):
                resolved[index] = str(candidate)
    return resolved


def _function_dir(image: str) -> Path | None:
    if image.startswith(DIR_PREFIX):
        return Path(image[len(DIR_PREFIX):])
    return None


def _find_executable(program: str, path: str, cwd: Path) -> str | None:
    if os.sep in program:
        target = program if os.path.isabs(program) else str(cwd / program)
        return target if os.path.isfile(target) and os.access(target, os.X_OK) else None
    return shutil.which(program, path=path)


async def _exit_status(process: asyncio.subprocess.Process) -> int:
    # Not Process.wait(): on 3.11 it also waits for the pipes to close, which a background
    # child still holding stdout delays for as long as it lives. The status is set as soon
    # as the process exits.
    while process.returncode is None:  # noqa: ASYNC110 - no event exists for this
        await asyncio.sleep(0.05)
    return process.returncode


async def _pump(stream: asyncio.StreamReader, on_log: LogSink) -> None:
    while chunk := await stream.read(READ_SIZE):
        try:
            await on_log(chunk)
        except Exception:
            # A failing sink must not stop the task nor leave the pipe full.
            log.exception("on_log failed; log chunk dropped")


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _restore_input_dirs(workdir: Path) -> None:
    """Give the owner back write permission on input/'s directories (files stay read-only)
    so the caller can delete the working dir even when it is not root."""
    root = workdir / INPUT_DIR
    if not root.is_dir():
        return
    for directory, _, _ in os.walk(root):
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(os.lstat(directory).st_mode)
            os.chmod(directory, mode | stat.S_IWUSR)


def _can_unshare_network() -> bool:
    """Whether `unshare --net` works here (root, or a kernel allowing it)."""
    if not shutil.which("unshare"):
        return False
    try:
        done = subprocess.run(
            ["unshare", "--net", "--", "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0
