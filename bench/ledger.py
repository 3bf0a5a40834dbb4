"""Ledger benchmark: append throughput, HTTP commands, projection lag and replay.

    python bench/ledger.py [--quick]

Creates a fresh database `consort_bench_<random>` through the admin connection
CONSORT_BENCH_PG (default postgresql://postgres@127.0.0.1:5432/test), runs every phase
against it with a real `Runtime`, drops it at the end, prints figures as it goes and,
as its last line, one JSON object with the headline numbers.

Phases, in order:
1. replay: 100,000 TokenIssued events over 4 orgs appended in big batches with the live
   projector off, then `projector.reset()` + `catch_up()` timed.
2. append: many concurrent `Appender.append` calls of one event each, 1 org then 8 orgs
   (sequencer and live projector running, as in production).
3. projection lag: paced appends at a steady rate; time from `append` returning to
   `ProjectionWaiter.wait` returning, p50/p99.
4. http: the real API under uvicorn in a subprocess, driven by load-generator
   processes issuing `POST /tokens` (append + read-your-writes); only 201s count.

The module is also the load generator's entry point (`python bench/ledger.py load ...`);
the server and its HTTP client are in `_common.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (  # bench/ is sys.path[0] when run as a script
    ADMIN_TOKEN,
    CpuMeter,
    HttpConnection,
    api_server,
    cpu_line,
    fresh_database,
    load_average,
    percentile,
    say,
)

SCRIPT = Path(__file__).resolve()

from app.domain.organizations import OrganizationRegistered, TokenIssued  # noqa: E402
from app.events.canonical import GENESIS_HASH, chain_hash  # noqa: E402
from app.events.codec import to_new_events  # noqa: E402
from app.events.entries import AppendRequest, NewEvent, hashed_fields  # noqa: E402
from app.events.verify import verify_org  # noqa: E402
from app.runtime import Runtime  # noqa: E402

TARGETS = {
    "append_events_per_s_8orgs": (">=", 10_000.0),
    "http_commands_per_s": (">=", 1_000.0),
    "projection_lag_p99_ms": ("<=", 50.0),
    "replay_events_per_s": (">=", 50_000.0),
}


async def wait_until(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def all_sequenced(runtime: Runtime) -> bool:
    async with runtime.pool.acquire() as conn:
        placed = await conn.fetchval("SELECT count(*) FROM ledger_positions")
        total = await conn.fetchval("SELECT count(*) FROM ledger")
    return bool(placed == total)


async def all_projected(runtime: Runtime) -> bool:
    async with runtime.pool.acquire() as conn:
        last = await conn.fetchval("SELECT coalesce(max(position), 0) FROM ledger_positions")
        done = await conn.fetchval("SELECT coalesce(min(position), 0) FROM projection_tracking")
    return bool(await all_sequenced(runtime) and done == last)


# --- phase 1: replay ---------------------------------------------------------------


async def bench_replay(database_url: str, events: int, orgs: int) -> float:
    runtime = Runtime(database_url, admin_token=ADMIN_TOKEN, run_projector=False)
    await runtime.start()
    try:
        org_ids = [f"replay-{i + 1}" for i in range(orgs)]
        for org in org_ids:
            registered = OrganizationRegistered(org_id=org, name=org, model_export_enabled=False)
            await runtime.appender.append(
                AppendRequest(org=org, actor="admin", events=to_new_events([registered]))
            )

        async def fill(org: str, count: int, per_request: int = 1000) -> None:
            done = 0
            while done < count:
                batch = [
                    TokenIssued(
                        token_id=str(uuid.uuid4()), org=org, role="org", name=f"t{done + k}",
                        token_sha256=hashlib.sha256(f"{org}/{done + k}".encode()).hexdigest(),
                    )
                    for k in range(min(per_request, count - done))
                ]
                await runtime.appender.append(
                    AppendRequest(org=org, actor=org, events=to_new_events(batch))
                )
                done += len(batch)

        started = time.perf_counter()
        share = events - orgs  # the registrations count too
        await asyncio.gather(
            *(fill(org, share // orgs + (1 if i < share % orgs else 0))
              for i, org in enumerate(org_ids))
        )
        await wait_until(lambda: all_sequenced(runtime), 120, "the sequencer")
        say(f"replay: {events} events appended and sequenced in "
            f"{time.perf_counter() - started:.1f} s")

        meter = CpuMeter(database_url)
        await meter.start()
        started = time.perf_counter()
        await runtime.projector.reset()
        applied = await runtime.projector.catch_up()
        elapsed = time.perf_counter() - started
        cpu = await meter.stop()
        async with runtime.pool.acquire() as conn:
            tokens = await conn.fetchval("SELECT count(*) FROM api_tokens")
        if applied != events or tokens != events - orgs:
            raise RuntimeError(f"replay applied {applied} entries, {tokens} tokens in the view")
        rate = applied / elapsed
        say(f"replay: reset + catch_up of {applied} events in {elapsed:.2f} s "
            f"= {rate:,.0f} events/s ({tokens} tokens in the view)")
        say(cpu_line(cpu, applied))
        # `consort verify` on the same ledger: reading it back with hashes, one org at a
        # time, recomputing every entry's canonical encoding and SHA-256.
        started = time.perf_counter()
        async with runtime.pool.acquire() as conn:
            results = [await verify_org(conn, org) for org in org_ids]
        elapsed = time.perf_counter() - started
        checked = sum(r.entries_checked for r in results)
        if not all(r.ok for r in results) or checked != events:
            raise RuntimeError(f"verify checked {checked} entries: {results}")
        say(f"verify: {checked} entries in {elapsed:.2f} s = {checked / elapsed:,.0f} entries/s")
        return rate
    finally:
        await runtime.stop()


# --- phase 2: append ---------------------------------------------------------------


async def bench_append(
    runtime: Runtime, orgs: int, concurrency: int, seconds: float, label: str
) -> float:
    org_ids = [f"{label}-{i + 1}" for i in range(orgs)]
    committed = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal committed
        org = org_ids[w % orgs]
        i = 0
        while time.perf_counter() < deadline:
            event = NewEvent(
                asset_kind="bench", asset_key=f"{w}-{i}", event_type="BenchEventRecorded",
                data={"worker": w, "n": i},
            )
            await runtime.appender.append(AppendRequest(org=org, actor=org, events=[event]))
            committed += 1
            i += 1

    meter = CpuMeter(runtime.database_url)
    await meter.start()
    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = await meter.stop()
    rate = committed / elapsed
    say(f"append {orgs} org(s), {concurrency} in flight: {committed} events in {elapsed:.2f} s "
        f"= {rate:,.0f} events/s")
    say(cpu_line(cpu, committed))
    return rate


# --- phase 3: projection lag -------------------------------------------------------


async def bench_lag(runtime: Runtime, rate: float, seconds: float) -> tuple[float, float]:
    org = "lag-1"
    lags: list[float] = []
    count = int(rate * seconds)

    async def one(i: int) -> None:
        event = NewEvent(asset_kind="bench", asset_key=f"lag-{i}",
                         event_type="BenchEventRecorded", data={"n": i})
        entries = await runtime.appender.append(AppendRequest(org=org, actor=org, events=[event]))
        committed = time.perf_counter()
        await runtime.waiter.wait(entries)
        lags.append((time.perf_counter() - committed) * 1000)

    tasks: list[asyncio.Task[None]] = []
    started = time.perf_counter()
    for i in range(count):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    p50, p99 = percentile(lags, 50), percentile(lags, 99)
    say(f"projection lag at {count / elapsed:,.0f} events/s over {elapsed:.1f} s: "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(lags):.1f} ms")
    return p50, p99


# --- phase 4: HTTP -----------------------------------------------------------------


async def load(port: int, tokens: list[str], concurrency: int, seconds: float,
               max_requests: int) -> dict[str, Any]:
    """Issue POST /tokens until the time or count runs out; count 201s and the rest."""
    ok = 0
    failed: dict[str, int] = {}
    issued = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal ok, issued
        conn = HttpConnection(port, tokens[w % len(tokens)])
        try:
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                sent = time.perf_counter()
                try:
                    status, _ = await conn.request("POST", "/tokens", {"name": "bench"})
                except OSError as exc:
                    key = type(exc).__name__
                    failed[key] = failed.get(key, 0) + 1
                    conn.close()
                    continue
                if status == 201:
                    ok += 1
                    latencies.append((time.perf_counter() - sent) * 1000)
                else:
                    failed[str(status)] = failed.get(str(status), 0) + 1
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"ok": ok, "failed": failed, "elapsed": elapsed, "latencies": latencies,
            "cpu": time.process_time()}


async def bench_http(database_url: str, workers: int, load_procs: int, concurrency: int,
                     seconds: float, max_requests: int) -> float:
    async with api_server(database_url, workers) as (port, server):
        admin = HttpConnection(port, ADMIN_TOKEN)
        tokens = []
        for i in range(8):
            created = await admin.json(
                "POST", "/organizations", {"id": f"http-{i + 1}", "name": f"HTTP {i + 1}"},
                expect=201,
            )
            tokens.append(created["token"]["token"])
        admin.close()
        # Warm-up: connections, caches, the server's first requests.
        await load(port, tokens, 16, 1.0, 500)

        per_proc = max(1, concurrency // load_procs)
        command = [sys.executable, str(SCRIPT), "load", "--port", str(port),
                   "--concurrency", str(per_proc), "--seconds", str(seconds),
                   "--max-requests", str(max_requests // load_procs),
                   "--tokens", ",".join(tokens)]
        meter = CpuMeter(database_url, (server.pid,))
        await meter.start()
        procs = [
            await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
            for _ in range(load_procs)
        ]
        outputs = [await p.communicate() for p in procs]
        cpu = await meter.stop()
        results = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
        ok = sum(r["ok"] for r in results)
        elapsed = max(r["elapsed"] for r in results)
        failed: dict[str, int] = {}
        for r in results:
            for key, n in r["failed"].items():
                failed[key] = failed.get(key, 0) + n
        latencies = [x for r in results for x in r["latencies"]]
        rate = float(ok / elapsed)
        say(f"http POST /tokens: {workers} uvicorn worker(s), {load_procs} load process(es) x "
            f"{per_proc} in flight: {ok} x 201 in {elapsed:.2f} s = {rate:,.0f} commands/s; "
            f"latency p50 {percentile(latencies, 50):.1f} ms, "
            f"p99 {percentile(latencies, 99):.1f} ms; failures {failed or 'none'} "
            f"(load average {load_average():.2f})")
        cpu["load generators"] = sum(r["cpu"] for r in results)
        say(cpu_line(cpu, ok, "API server") + f" (load generators {cpu['load generators']:.2f})")
        return rate


def calibrate() -> float:
    """Microseconds to build and hash one ledger entry: tells a slow or busy machine."""
    now = dt.datetime.now(dt.UTC)
    last = GENESIS_HASH
    started = time.perf_counter()
    for i in range(2000):
        fields = hashed_fields(
            id=str(uuid.uuid4()), org="o", sequence=i, recorded_at=now, actor="o",
            asset_kind="bench", asset_key=str(i), version=1, event_type="BenchEventRecorded",
            data={"n": i}, reason="",
        )
        last = chain_hash(last, fields)
    return (time.perf_counter() - started) / 2000 * 1e6


# --- main --------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, float | None]:
    results: dict[str, float] = {}
    say(f"machine: {os.cpu_count()} cores, load average {load_average():.2f}, "
        f"{calibrate():.1f} us to hash one ledger entry in pure Python")
    phases = set(args.phases.split(","))
    async with fresh_database() as database_url:
        if "replay" in phases:
            results["replay_events_per_s"] = await bench_replay(
                database_url, args.replay_events, orgs=4
            )

        if phases & {"append", "lag"}:
            runtime = Runtime(database_url, admin_token=ADMIN_TOKEN, pool_size=args.pool_size)
            await runtime.start()
            try:
                # Warm-up, not counted: fills the pool and asyncpg's type caches.
                await bench_append(runtime, 2, args.concurrency, 1.0, "warm")
                await wait_until(lambda: all_projected(runtime), 120, "the projector")
                if "append" in phases:
                    results["append_events_per_s_1org"] = await bench_append(
                        runtime, 1, args.concurrency, args.append_seconds, "one"
                    )
                    await wait_until(lambda: all_projected(runtime), 120, "the projector")
                    results["append_events_per_s_8orgs"] = await bench_append(
                        runtime, 8, args.concurrency, args.append_seconds, "eight"
                    )
                    await wait_until(lambda: all_projected(runtime), 120, "the projector")
                if "lag" in phases:
                    _, results["projection_lag_p99_ms"] = await bench_lag(
                        runtime, args.lag_rate, args.lag_seconds
                    )
            finally:
                await runtime.stop()

        if "http" in phases:
            results["http_commands_per_s"] = await bench_http(
                database_url, args.http_workers, args.load_procs, args.http_concurrency,
                args.http_seconds, args.http_max_requests,
            )
    say(f"load average at the end {load_average():.2f}")
    for key, (op, target) in TARGETS.items():
        if key not in results:
            continue
        value = results[key]
        met = value >= target if op == ">=" else value <= target
        say(f"{key}: {value:,.1f} (target {op} {target:,.0f}) {'met' if met else 'MISSED'}")
    return {k: round(results[k], 1) if k in results else None for k in (
        "append_events_per_s_1org", "append_events_per_s_8orgs", "http_commands_per_s",
        "projection_lag_p99_ms", "replay_events_per_s",
    )}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("load", help="internal: one HTTP load-generator process")
    gen.add_argument("--port", type=int, required=True)
    gen.add_argument("--tokens", required=True)
    gen.add_argument("--concurrency", type=int, default=32)
    gen.add_argument("--seconds", type=float, default=10)
    gen.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--phases", default="replay,append,lag,http",
                        help="comma-separated subset of replay,append,lag,http")
    parser.add_argument("--quick", action="store_true", help="short runs, smaller replay")
    parser.add_argument("--replay-events", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=400, help="appends in flight")
    parser.add_argument("--append-seconds", type=float, default=5)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--lag-rate", type=float, default=500)
    parser.add_argument("--lag-seconds", type=float, default=10)
    parser.add_argument("--http-workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--load-procs", type=int, default=1, help="load-generator processes")
    parser.add_argument("--http-concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--http-seconds", type=float, default=10)
    parser.add_argument("--http-max-requests", type=int, default=30_000)
    args = parser.parse_args()

    if args.command == "load":
        result = asyncio.run(load(args.port, args.tokens.split(","), args.concurrency,
                                  args.seconds, args.max_requests))
        print(json.dumps(result))
        return
    if args.quick:
        args.replay_events, args.append_seconds = 20_000, 2
        args.lag_seconds, args.http_seconds = 4, 4
    summary = asyncio.run(run(args))
    say(json.dumps(summary))


if __name__ == "__main__":
    main()
