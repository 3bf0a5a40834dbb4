"""Runner benchmark: dispatch overhead and trivial-task throughput on the real stack.

    python bench/runner.py [--tasks 200] [--trivial 1000] [--concurrency 4]
                           [--backend docker|subprocess]

The API runs under uvicorn in this process (lease sweeper included), on a fresh database
of the local PostgreSQL (`CONSORT_TEST_PG`), dispatching over the local NATS
(`CONSORT_TEST_NATS`) on a stream of its own; one runner of org-a runs the tasks.

- dispatch overhead: one task at a time, the time from its registration's answer (it is
  TODO in the views) to its container running, minus the time a bare start of the same
  image takes (docker SDK create + start, or a bare child process, measured just before
  each task), p50 minus p50 and p99 minus p99 over --tasks;
- trivial tasks/s: --trivial independent tasks in one plan, --concurrency at a time,
  from the registration's answer to the last one DONE.

The last line is one JSON object: dispatch_overhead_p50_ms, dispatch_overhead_p99_ms,
trivial_tasks_per_s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.contract import BackendOptions, choose_backend  # noqa: E402
from tests.conftest import PG_ADMIN_URL  # noqa: E402
from tests.stack import Stack, running_stack  # noqa: E402

IMAGE = "consort-test/busybox:1"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bare_start_s(kind: str) -> float:
    """Time to get the same image's process running with nothing of ours: a docker SDK
    create + start (as the Docker backend does), or a bare child process."""
    if kind == "docker":
        import docker

        client = docker.from_env()
        t0 = time.monotonic()
        container = client.containers.create(IMAGE, ["true"], network_mode="none")
        container.start()
        elapsed = time.monotonic() - t0
        container.remove(force=True)
        client.close()
        return elapsed
    import subprocess

    t0 = time.monotonic()
    proc = subprocess.Popen(["sh", "-c", "true"])
    elapsed = time.monotonic() - t0
    proc.wait()
    return elapsed


async def trivial_function(stack: Stack, kind: str) -> str:
    return await stack.function("org-a", "trivial", ["true"],
                                image=IMAGE if kind == "docker" else "host")


async def wait_done(stack: Stack, keys: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    remaining = set(keys)
    while remaining:
        async with stack.runtime.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT key, status FROM compute_tasks WHERE key = ANY($1)", list(remaining))
        for row in rows:
            if row["status"] in ("DONE", "FAILED", "CANCELED"):
                if row["status"] != "DONE":
                    raise SystemExit(f"task {row['key']} ended {row['status']}")
                remaining.discard(row["key"])
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(remaining)} tasks not done after {timeout} s")
        await asyncio.sleep(0.01)


async def bench(args: argparse.Namespace, database_url: str, home: Path) -> dict[str, Any]:
    async with running_stack(database_url, home) as stack:
        await stack.org("org-a")
        backend = choose_backend(BackendOptions(prefer=args.backend,
                                                cache_dir=home / "backend")).backend
        runner = await stack.runner("org-a", backend, concurrency=args.concurrency)
        function = await trivial_function(stack, args.backend)
        # The engine's speed drifts with the machine's load: a bare start is measured
        # before each task, and the overhead is ours minus the bare one, in distribution.
        bares: list[float] = []
        ours: list[float] = []
        phases: dict[str, list[float]] = {"fetched from NATS": [], "prepared": [],
                                          "start accepted": [], "process running": []}
        for i in range(args.tasks + 3):
            bare = await asyncio.to_thread(bare_start_s, args.backend)
            key = str(uuid.uuid4())
            await stack.plan("org-a", [{"key": key, "function_key": function,
                                        "worker": "org-a"}])
            todo_at = time.monotonic()
            await wait_done(stack, [key], 60)
            if i >= 3:  # the first runs warm the image and connections
                started = runner.results[key].started_at_monotonic
                bares.append(bare)
                ours.append(started - todo_at)
                seen = runner.phases[key]
                # The task is prepared (container created) while the API records its
                # start; the process starts once the start is accepted.
                marks = [todo_at, seen["fetched"], seen["prepared"], seen["started"], started]
                for name, (a, b) in zip(phases, zip(marks, marks[1:], strict=False), strict=True):
                    phases[name].append(b - a)
        bare50, bare99 = percentile(bares, 0.5), percentile(bares, 0.99)
        p50 = (percentile(ours, 0.5) - bare50) * 1000
        p99 = (percentile(ours, 0.99) - bare99) * 1000
        print(f"bare start of the image ({args.backend}): p50 {bare50 * 1000:.1f} ms, "
              f"p99 {bare99 * 1000:.1f} ms; TODO to running: p50 "
              f"{percentile(ours, 0.5) * 1000:.1f} ms, p99 {percentile(ours, 0.99) * 1000:.1f} ms")
        print(f"dispatch overhead over {args.tasks} tasks: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        print("  median time of each phase after the previous one: " + ", ".join(
            f"{name} +{statistics.median(v) * 1000:.1f} ms" for name, v in phases.items()))

        keys = [str(uuid.uuid4()) for _ in range(args.trivial)]
        await stack.plan("org-a", [{"key": k, "function_key": function, "worker": "org-a"}
                                   for k in keys])
        t0 = time.monotonic()
        await wait_done(stack, keys, 1800)
        elapsed = time.monotonic() - t0
        rate = args.trivial / elapsed
        print(f"{args.trivial} trivial tasks, {args.concurrency} at a time: {elapsed:.1f} s, "
              f"{rate:.1f} tasks/s")
        return {"dispatch_overhead_p50_ms": round(p50, 1),
                "dispatch_overhead_p99_ms": round(p99, 1),
                "trivial_tasks_per_s": round(rate, 2)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--trivial", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--backend", choices=["docker", "subprocess"], default="docker")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    admin = await asyncpg.connect(PG_ADMIN_URL)
    name = f"consort_bench_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        base = PG_ADMIN_URL.rpartition("/")[0]
        with tempfile.TemporaryDirectory(prefix="consort-bench-") as home:
            figures = await bench(args, f"{base}/{name}", Path(home))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
