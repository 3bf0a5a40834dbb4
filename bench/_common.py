"""Helpers shared by the benchmarks: a throw-away database, the API under uvicorn in a
subprocess, CPU accounting, percentiles, and a lean HTTP/1.1 client.

The client is deliberately minimal (keep-alive, Content-Length bodies only): httpx's
connection pool costs the load generator more CPU per request than the API server
spends answering it (httpcore scans every pooled connection on each request), so with it
the figure measured the load generator, not Consort.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/x.py` from a checkout without install
    sys.path.insert(0, str(REPO))

from app.runtime import Runtime  # noqa: E402

ADMIN_PG = os.environ.get("CONSORT_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
ADMIN_TOKEN = "bench-admin-token"
DB_ENV = "CONSORT_BENCH_DATABASE_URL"
TICKS = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    print(message, flush=True)


def load_average() -> float:
    return os.getloadavg()[0]


def with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    admin = await asyncpg.connect(ADMIN_PG, timeout=10)
    name = f"consort_bench_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    say(f"database {name} created")
    try:
        yield with_database(ADMIN_PG, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        say(f"database {name} dropped")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


class CpuMeter:
    """CPU seconds spent by this process, PostgreSQL's backends of the bench database and
    any extra processes: on a shared machine these say more than wall time does."""

    def __init__(self, database_url: str, extra_pids: tuple[int, ...] = ()) -> None:
        self._url = database_url
        self._extra = extra_pids
        self._start: dict[str, float] = {}

    async def _backends(self) -> list[int]:
        conn = await asyncpg.connect(self._url)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
        return [r["pid"] for r in rows]

    async def _sample(self) -> dict[str, float]:
        backends = await self._backends()
        return {
            "self": time.process_time(),
            "postgres": sum(proc_cpu(pid) for pid in backends),
            "other": sum(proc_cpu(pid) for pid in self._extra),
        }

    async def start(self) -> None:
        self._start = await self._sample()

    async def stop(self) -> dict[str, float]:
        end = await self._sample()
        return {k: end[k] - self._start.get(k, 0.0) for k in end}


def cpu_line(cpu: dict[str, float], events: int, other: str = "") -> str:
    parts = [f"bench process {cpu['self']:.2f}", f"PostgreSQL {cpu['postgres']:.2f}"]
    if other:
        parts.append(f"{other} {cpu['other']:.2f}")
    total = sum(cpu.values())
    per = total / events * 1e6 if events else float("nan")
    return f"  CPU s: {', '.join(parts)}; {per:,.0f} us of CPU per event"


# --- the API under uvicorn ---------------------------------------------------------


def make_app() -> Any:
    """uvicorn factory for the server subprocess (`--app-dir bench _common:make_app`)."""
    from app.api.app import create_app

    return create_app(Runtime(os.environ[DB_ENV], admin_token=ADMIN_TOKEN))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HttpConnection:
    """One keep-alive HTTP/1.1 connection; answers must carry a Content-Length."""

    def __init__(self, port: int, token: str, host: str = "127.0.0.1") -> None:
        self._host, self._port = host, port
        self.token = token
        self._auth = f"authorization: Bearer {token}\r\n"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, bytes]:
        """Send `body` as JSON (or `raw` bytes as they are); returns (status, body)."""
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self._host, self._port, limit=2**24)
        payload = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nhost: {self._host}\r\n{self._auth}"
                f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n")
        self._writer.write(head.encode() + payload)
        answer = await self._reader.readuntil(b"\r\n\r\n")
        status, length = int(answer[9:12]), 0
        for line in answer.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self._reader.readexactly(length)

    async def json(self, method: str, path: str, body: Any = None,
                   expect: int = 200, raw: bytes | None = None) -> Any:
        status, data = await self.request(method, path, body, raw)
        if status != expect:
            raise RuntimeError(f"{method} {path}: {status} {data[:500]!r}")
        return json.loads(data)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


@contextlib.asynccontextmanager
async def api_server(database_url: str, workers: int = 1) -> AsyncIterator[
    tuple[int, asyncio.subprocess.Process]
]:
    """The real API (uvicorn, free port) on the bench database; yields (port, process)."""
    port = free_port()
    home = tempfile.TemporaryDirectory(prefix="consort-bench-")  # the artifact store
    env = dict(os.environ, **{DB_ENV: database_url, "XDG_DATA_HOME": home.name})
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uvicorn", "--factory", "--app-dir", str(REPO / "bench"),
        "_common:make_app", "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers), "--log-level", "warning", "--no-access-log",
        "--timeout-keep-alive", "600",  # the bench keeps idle connections between phases
        env=env, cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                probe = HttpConnection(port, ADMIN_TOKEN)
                status, _ = await probe.request("GET", "/health")
                probe.close()
                if status == 200:
                    break
            except OSError:
                pass
            if server.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            await asyncio.sleep(0.1)
        yield port, server
    finally:
        if server.returncode is None:
            server.terminate()
        try:
            await asyncio.wait_for(server.wait(), 15)
        except TimeoutError:
            server.kill()
            await server.wait()
        home.cleanup()
