"""The `consort` command: serve the API (embedded stack by default), replay views, verify ledgers.

Settings come from the environment (app/config.py). Without CONSORT_DATABASE_URL the
commands use the embedded PostgreSQL under $CONSORT_HOME (see app/embedded.py), starting it
if needed and stopping it afterwards if nobody else holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Generator
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg
import typer
import uvicorn
from rich.console import Console

from app.config import Settings
from app.embedded import EmbeddedError, EmbeddedPostgres, Stack, StartAborted
from app.runtime import Runtime

cli = typer.Typer(
    name="consort",
    help="Consort: an event-sourced orchestrator for federated learning across organizations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while the stack was still starting."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `_Stopper` decides what a signal means."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _Stopper:
    """SIGINT/SIGTERM for `consort serve`, whatever phase the process is in.

    Starting the embedded servers: finish the current step, then stop what started (a
    second signal aborts at once). Starting the runtime: cancel the main task. Serving:
    ask uvicorn to shut down (a second Ctrl-C forces it). Stopping: carry on in order.
    """

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None
        self.starting = True
        self.server: uvicorn.Server | None = None
        self.task: asyncio.Task[Any] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def stop_requested(self) -> bool:
        return self.requested is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        repeated = self.requested is not None
        self.requested = signal.Signals(signum)
        if self.server is not None:
            self.server.should_exit = True
            if repeated and signum == signal.SIGINT:
                self.server.force_exit = True
        elif self.task is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        elif self.starting and repeated:
            self.starting = False
            raise Interrupted(self.requested.name)
        elif self.starting:
            os.write(2, b"Stopping once the current step is done (again to abort it).\n")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (uvicorn[standard] brings it): a faster event loop."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _browsable(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _save_admin_token(home: Path, token: str) -> Path | None:
    """Write the generated admin token to <home>/admin-token, readable by its owner only."""
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = home / "admin-token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        path.chmod(0o600)
        return path
    except OSError as exc:
        err.print(f"[yellow]could not save the admin token under {home}: {exc}[/]")
        return None


def _announce_admin_token(runtime: Runtime, home: Path, saved: Path | None = None) -> None:
    token = runtime.generated_admin_token
    if token is None:
        return
    if saved is None:
        saved = _save_admin_token(home, token)
    out.print("\n[bold]Admin token[/] (generated on first start, shown once):")
    out.print(f"  {token}", markup=False)
    if saved is not None:
        out.print(f"  saved to {saved} (mode 0600)", markup=False)
    out.print("  Set CONSORT_ADMIN_TOKEN to choose your own instead.\n")


def _describe(stack: Stack) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    if stack.postgres is not None:
        lines.append(("PostgreSQL", f"embedded, data in {stack.postgres.pgdata}"))
    else:
        lines.append(("PostgreSQL", "CONSORT_DATABASE_URL"))
    if stack.nats is not None:
        lines.append(("NATS", f"embedded {stack.nats.url}, store in {stack.nats.dir}"))
    else:
        lines.append(("NATS", f"CONSORT_NATS_URL ({stack.nats_url})"))
    return lines


async def _announce_when_listening(
    server: uvicorn.Server, runtime: Runtime, stack: Stack, settings: Settings,
    host: str, port: int, saved_token: Path | None,
) -> None:
    while not server.started:
        if server.should_exit:
            return
        await asyncio.sleep(0.02)
    base = f"http://{_browsable(host)}:{port}"
    out.print(f"\n[bold green]Consort is up[/] at {base}")
    out.print(f"  API docs    {base}/docs", markup=False)
    for name, value in _describe(stack):
        out.print(f"  {name:<11} {value}", markup=False)
    _announce_admin_token(runtime, settings.home, saved_token)
    url = "" if port == 8000 and host in ("127.0.0.1", "localhost") else f" --url {base}"
    out.print(f"\nTry it, in another terminal: consort example oasis{url}", markup=False)
    out.print("Press Ctrl-C to stop.")


async def _serve(
    stack: Stack, settings: Settings, host: str, port: int, access_log: bool, stopper: _Stopper
) -> None:
    stopper.loop = asyncio.get_running_loop()
    stopper.task = asyncio.current_task()
    stopper.starting = False
    assert stack.database_url is not None
    runtime = Runtime(stack.database_url, stack.nats_url, settings.admin_token)
    await runtime.start()
    # Saved before the API answers, so that whoever sees /ready can read it.
    saved_token = (_save_admin_token(settings.home, runtime.generated_admin_token)
                   if runtime.generated_admin_token is not None else None)
    local = None
    try:
        if stopper.requested is not None:
            return
        from app.api.app import create_app

        if stack.nats_url is not None and settings.local_runners != "none":
            local = await _local_runners(runtime, stack.nats_url, settings, host, port)

        config = uvicorn.Config(
            create_app(runtime, manage_runtime=False), host=host, port=port,
            log_level="info", access_log=access_log, lifespan="on",
        )
        server = _Server(config)
        stopper.server, stopper.task = server, None
        announce = asyncio.create_task(
            _announce_when_listening(server, runtime, stack, settings, host, port, saved_token)
        )
        try:
            await server.serve()
        finally:
            stopper.server = None
            announce.cancel()
    finally:
        stopper.task = None
        if local is not None:
            await local.stop()
        await runtime.stop()


async def _local_runners(
    runtime: Runtime, nats_url: str, settings: Settings, host: str, port: int
) -> Any:
    """Runners for the organizations (CONSORT_LOCAL_RUNNERS), started once the API is up."""
    from runner.contract import BackendOptions, choose_backend
    from runner.local import LocalRunners

    # Runner messages (task lost, lease problems) beside uvicorn's own log lines.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s %(message)s")
    choice = await asyncio.to_thread(
        choose_backend, BackendOptions(prefer=settings.runner_backend,
                                       cache_dir=settings.home / "runners" / "functions"))
    out.print(f"Runners: {choice.backend.name} backend ({choice.reason}); one per organization"
              f" ({settings.local_runners})", markup=False)
    local = LocalRunners(runtime, f"http://{_browsable(host)}:{port}", nats_url,
                         settings.home, choice.backend, setting=settings.local_runners,
                         housekeeping_s=settings.runner_housekeeping_s,
                         max_images=settings.runner_max_images)
    local.start()
    return local


@cli.command()
def serve(
    port: int | None = typer.Option(
        None, "--port", help="HTTP port (default CONSORT_PORT or 8000)."
    ),
    host: str | None = typer.Option(
        None, "--host", help="Address to bind (default CONSORT_HOST or 127.0.0.1)."
    ),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request."),
) -> None:
    """Run the API. With no configuration, start PostgreSQL and NATS under CONSORT_HOME too."""
    settings = Settings.from_env()
    host = host if host is not None else settings.host
    port = port if port is not None else settings.port
    stopper = _Stopper()
    stopper.install()
    stack = Stack(settings.home, settings.database_url, settings.nats_url, with_nats=True)
    code = 0
    try:
        if stack.embeds_anything:
            out.print(f"Starting the embedded stack under {settings.home} ...", markup=False)
        stack.start(should_stop=stopper.stop_requested)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(stack, settings, host, port, access_log, stopper))
    except (Interrupted, StartAborted, asyncio.CancelledError):
        pass
    except EmbeddedError as exc:
        if stopper.requested is None:
            err.print(f"[red]error:[/] {exc}")
            code = 1
    except (OSError, asyncpg.PostgresError) as exc:
        err.print(f"[red]error:[/] {type(exc).__name__}: {exc}")
        code = 1
    finally:
        stopper.starting = False
        if stack.postgres is not None or stack.nats is not None:
            out.print("Stopping the embedded stack ...")
        stack.close()
    if stopper.requested is not None and code == 0:
        out.print(f"Stopped ({stopper.requested.name}).")
    raise typer.Exit(code)


def _stack_for_tools(settings: Settings) -> Stack | None:
    """The database for replay/verify; None when there is no embedded database yet."""
    if settings.database_url is None and not EmbeddedPostgres(
        settings.home.expanduser()
    ).initialized():
        return None
    return Stack(settings.home, settings.database_url)


def _terminate_as_interrupt() -> None:
    # SIGTERM unwinds like Ctrl-C, so an embedded PostgreSQL started here is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.default_int_handler(signum, frame))


async def _wait_for_sequencer(runtime: Runtime, timeout: float = 30.0) -> None:
    """Entries committed but not yet given a position (after a crash) are placed by the
    sequencer the runtime just started; wait for it so the replay includes them."""
    deadline = time.monotonic() + timeout
    while True:
        async with runtime.pool.acquire() as conn:
            committed = await conn.fetchval(
                "SELECT coalesce(sum(last_sequence), 0) FROM ledger_heads"
            )
            placed = await conn.fetchval("SELECT count(*) FROM ledger_positions")
        if placed >= committed:
            return
        if time.monotonic() > deadline:
            err.print(f"[yellow]{committed - placed} entries still wait for a position; "
                      "they will be projected by the live projector[/]")
            return
        await asyncio.sleep(0.1)


async def _replay(database_url: str, settings: Settings, resume: bool) -> None:
    runtime = Runtime(database_url, None, settings.admin_token, run_projector=False)
    await runtime.start()
    try:
        _announce_admin_token(runtime, settings.home)
        await _wait_for_sequencer(runtime)
        projector = runtime.projector
        if resume:
            out.print("Resuming: catching every view up with the ledger ...")
        else:
            out.print("Dropping every view and rebuilding it from the ledger ...")
            await projector.reset()
        started = last_report = time.perf_counter()

        def progress(total: int) -> None:
            nonlocal last_report
            now = time.perf_counter()
            if now - last_report >= 2.0:
                last_report = now
                err.print(f"  ... {total} entries, position {projector.position}")

        total = await projector.catch_up(progress)
        elapsed = time.perf_counter() - started
        rate = total / elapsed if elapsed > 0 else 0.0
        out.print(f"Replayed {total} entries in {elapsed:.2f} s ({rate:,.0f} events/s), "
                  f"views at position {projector.position}.", markup=False)
        async with runtime.pool.acquire() as conn:
            placed = await conn.fetchval("SELECT count(*) FROM ledger_positions")
            others = placed - total
            if not resume and others > 0:
                out.print(f"  ({others} more were folded in by another projector on this "
                          "database, e.g. a running consort serve)", markup=False)
            for projection in projector.projections:
                for table in projection.tables:
                    rows = await conn.fetchval(f"SELECT count(*) FROM {table}")
                    out.print(f"  {projection.name}.{table}: {rows} rows", markup=False)
    finally:
        await runtime.stop()


@cli.command()
def replay(
    resume: bool = typer.Option(
        False, "--resume", help="Only catch up (after a crash mid-replay); drop nothing."
    ),
) -> None:
    """Drop every view and rebuild it from the ledger."""
    settings = Settings.from_env()
    _on_database(settings, "replay", lambda url: _replay(url, settings, resume))


def _on_database(
    settings: Settings, what: str, work: Callable[[str], Coroutine[Any, Any, None]]
) -> None:
    """Run a tool's `work` on the configured or embedded database (started for it and
    stopped after when nobody else holds it); nothing to do when there is none yet."""
    _terminate_as_interrupt()
    stack = _stack_for_tools(settings)
    if stack is None:
        out.print(f"No database under {settings.home}: nothing to {what}.", markup=False)
        return
    try:
        with stack:
            assert stack.database_url is not None
            asyncio.run(work(stack.database_url))
    except EmbeddedError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


async def _verify(database_url: str, org: str | None) -> int:
    from app.events.reader import ledger_orgs
    from app.events.verify import verify_org

    conn = await asyncpg.connect(database_url, timeout=30)
    try:
        has_ledger = await conn.fetchval("SELECT to_regclass('ledger') IS NOT NULL")
        orgs = await ledger_orgs(conn) if has_ledger else []
        if org is not None:
            if org not in orgs:
                err.print(f"No ledger for organization {org!r}.", markup=False)
                return 2
            orgs = [org]
        if not orgs:
            out.print("No ledger entries yet: nothing to verify.")
            return 0
        broken = 0
        width = max(len(o) for o in orgs)
        for name in orgs:
            result = await verify_org(conn, name)
            if result.ok:
                head = (result.head_hash or "")[:16]
                out.print(f"{name:<{width}}  ok      {result.entries_checked} entries, "
                          f"head {head}", markup=False)
            else:
                broken += 1
                out.print(
                    f"{name:<{width}}  BROKEN  first bad entry: sequence "
                    f"{result.first_bad_sequence} (id {result.first_bad_entry_id}): "
                    f"{result.problem}; {result.entries_checked} entries verified before it",
                    markup=False,
                )
        if broken:
            out.print(f"{broken} of {len(orgs)} ledgers are broken.")
            return 1
        out.print(f"All {len(orgs)} ledgers verified.")
        return 0
    finally:
        await conn.close()


@cli.command()
def verify(
    org: str | None = typer.Option(None, "--org", help="Verify this organization's ledger only."),
) -> None:
    """Recompute every hash chain; exit 1 naming the first bad entry if one is broken."""
    code = 0

    async def work(url: str) -> None:
        nonlocal code
        code = await _verify(url, org)

    _on_database(Settings.from_env(), "verify", work)
    raise typer.Exit(code)


@cli.command("runner")
def runner_command(
    org: str = typer.Option(..., "--org", help="The organization whose tasks to run."),
    api_url: str = typer.Option(
        "http://127.0.0.1:8000", "--api-url", envvar="CONSORT_API_URL", help="The Consort API."),
    token: str = typer.Option(
        ..., "--token", envvar="CONSORT_RUNNER_TOKEN", help="An API token of the organization."),
    nats_url: str | None = typer.Option(
        None, "--nats-url", envvar="CONSORT_NATS_URL",
        help="NATS with JetStream (default: the embedded one under CONSORT_HOME)."),
    concurrency: int = typer.Option(2, "--concurrency", min=1, help="Tasks run at once."),
    backend: str | None = typer.Option(
        None, "--backend", envvar="CONSORT_RUNNER_BACKEND",
        help="docker or subprocess (default: docker when an engine answers)."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds before a task is killed."),
    cpus: float | None = typer.Option(None, "--cpus", help="CPU limit per task."),
    memory_mb: int | None = typer.Option(None, "--memory-mb", help="Memory limit per task."),
    lease_s: float = typer.Option(
        30.0, "--lease-seconds", help="How long a task stays ours without a renewal."),
    housekeeping_s: float = typer.Option(
        30.0, "--housekeeping-seconds", envvar="CONSORT_RUNNER_HOUSEKEEPING_SECONDS", min=0,
        help="Seconds between sweeps for what killed runners left (0: none)."),
    max_images: int = typer.Option(
        20, "--max-images", envvar="CONSORT_RUNNER_MAX_IMAGES", min=0,
        help="Prepared function images kept, least recently used removed (0: no bound)."),
    tasks_stream: str = typer.Option("CONSORT_TASKS", "--tasks-stream", hidden=True),
    tasks_prefix: str = typer.Option("consort.tasks", "--tasks-subject-prefix", hidden=True),
) -> None:
    """Run ORG's tasks: take them from NATS, run their containers, report back."""
    from app.execution.dispatcher import DispatchConfig
    from runner.contract import BackendOptions, choose_backend
    from runner.worker import Runner, RunnerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings.from_env()
    url = nats_url or _embedded_nats_url(settings.home)
    if url is None:
        err.print("[red]error:[/] no NATS: set CONSORT_NATS_URL or --nats-url")
        raise typer.Exit(1)
    choice = choose_backend(BackendOptions(prefer=backend,
                                           cache_dir=settings.home / "runner" / "functions"))
    config = RunnerConfig(
        api_url=api_url, token=token, org=org, nats_url=url,
        home=settings.home / "runner" / org, concurrency=concurrency, task_timeout_s=timeout,
        cpus=cpus, memory_bytes=memory_mb * 1024**2 if memory_mb else None, lease_s=lease_s,
        heartbeat_s=min(2.0, lease_s / 3), housekeeping_s=housekeeping_s,
        max_images=max_images,
        dispatch=DispatchConfig(stream=tasks_stream, subject_prefix=tasks_prefix))
    out.print(f"Runner {config.runner_id} for {org}: {choice.backend.name} backend "
              f"({choice.reason}), {concurrency} task(s) at a time. Ctrl-C stops it.",
              markup=False)
    _terminate_as_interrupt()

    async def run() -> None:
        runner = Runner(config, choice.backend)
        await runner.start()
        try:
            await asyncio.Event().wait()
        finally:
            out.print("Stopping: running tasks get 30 s to finish, then are handed back.")
            await runner.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


def _embedded_nats_url(home: Path) -> str | None:
    path = home / "nats" / "url"
    return path.read_text().strip() if path.exists() else None


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
