"""Compute-plan benchmark: register a 10,000-task plan, list it, read single tasks.

    python bench/plans.py [--tasks 10000] [--stored 100000]

Runs the real API under uvicorn (subprocess) on a fresh database `consort_bench_<random>`
(see `_common.py`), sets up a federation of three organizations — each with a data manager
and a data sample — and three functions (train, aggregate, test), then:

1. register: one `POST /compute_plans` with 10,000 tasks, rounds of federated learning:
   each org trains on its data from the previous aggregate, org-a aggregates the three
   models, each org tests the aggregate. The answer comes once every view shows the plan
   and its tasks (read-your-writes), so its time is the figure; the view is checked too.
2. list: `GET /tasks?compute_plan_key=…` page by page (limit 1000, cursor) until the end.
3. get: more plans until 100,000 tasks are stored, then `GET /tasks/{key}` for random
   keys (2 connections, 2,000 requests), latency p50/p99.

Prints figures as it goes and, as its last line, one JSON object:
`register_10k_task_plan_s`, `list_10k_tasks_s`, `get_task_p99_ms`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from typing import Any

import _common as common  # bench/ is sys.path[0] when run as a script

ORGS = ("org-a", "org-b", "org-c")
AGGREGATOR = "org-a"
TARGETS = {
    "register_10k_task_plan_s": ("<=", 3.0),
    "list_10k_tasks_s": ("<=", 1.0),
    "get_task_p99_ms": ("<=", 20.0),
}
ALL = {"public": False, "authorized_ids": list(ORGS)}


class Federation:
    """Three organizations, their data and the functions of a federated plan."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conns: dict[str, common.HttpConnection] = {}
        self.dm: dict[str, str] = {}
        self.sample: dict[str, str] = {}
        self.functions: dict[str, str] = {}

    async def setup(self) -> None:
        admin = common.HttpConnection(self.port, common.ADMIN_TOKEN)
        for org in ORGS:
            created = await admin.json("POST", "/organizations",
                                       {"id": org, "name": org.upper()}, expect=201)
            self.conns[org] = common.HttpConnection(self.port, created["token"]["token"])
        admin.close()
        for org in ORGS:
            conn = self.conns[org]
            opener = await conn.json("POST", "/files", raw=f"# opener of {org}\n".encode(),
                                     expect=201)
            dm = await conn.json("POST", "/data_managers", {
                "name": f"data of {org}", "opener_checksum": opener["checksum"],
                "permissions": {"process": ALL}}, expect=201)
            self.dm[org] = dm["key"]
            sample = await conn.json("POST", "/data_samples", {
                "data_manager_keys": [dm["key"]], "checksum": "0" * 64,
                "location": f"/data/{org}"}, expect=201)
            self.sample[org] = sample["key"]
        data = {"opener": {"kind": "DATA_MANAGER"},
                "datasamples": {"kind": "DATA_SAMPLE", "multiple": True}}
        specs = {
            "train": (data | {"model": {"kind": "MODEL", "optional": True}},
                      {"model": {"kind": "MODEL"}}),
            "aggregate": ({"models": {"kind": "MODEL", "multiple": True}},
                          {"model": {"kind": "MODEL"}}),
            "test": (data | {"model": {"kind": "MODEL"}},
                     {"performance": {"kind": "PERFORMANCE"}}),
        }
        for name, (inputs, outputs) in specs.items():
            function = await self.conns[AGGREGATOR].json("POST", "/functions", {
                "name": name, "permissions": {"process": {"public": True, "authorized_ids": []}},
                "inputs": inputs, "outputs": outputs, "image_source": "IMAGE_REFERENCE",
                "image": "busybox:latest", "command": ["sh", "-c", "true"]}, expect=201)
            self.functions[name] = function["key"]

    def _data(self, org: str) -> list[dict[str, Any]]:
        return [{"identifier": "opener", "asset_key": self.dm[org]},
                {"identifier": "datasamples", "asset_key": self.sample[org]}]

    def plan_tasks(self, count: int) -> list[dict[str, Any]]:
        """Rounds of train (each org) → aggregate → test (each org), `count` tasks."""
        tasks: list[dict[str, Any]] = []
        model_out = {"model": {"permissions": {"process": ALL}}}
        aggregate: str | None = None
        while len(tasks) < count:
            trains = []
            for org in ORGS:
                inputs = self._data(org)
                if aggregate is not None:
                    inputs.append({"identifier": "model", "parent_task_key": aggregate,
                                   "parent_output": "model"})
                trains.append({"key": str(uuid.uuid4()), "function_key": self.functions["train"],
                               "inputs": inputs, "outputs": model_out})
            aggregate = str(uuid.uuid4())
            round_tasks = [*trains, {
                "key": aggregate, "function_key": self.functions["aggregate"],
                "worker": AGGREGATOR, "outputs": model_out,
                "inputs": [{"identifier": "models", "parent_task_key": t["key"],
                            "parent_output": "model"} for t in trains]}]
            round_tasks += [{
                "key": str(uuid.uuid4()), "function_key": self.functions["test"],
                "inputs": [*self._data(org), {"identifier": "model", "parent_task_key": aggregate,
                                              "parent_output": "model"}]} for org in ORGS]
            tasks += round_tasks
        return tasks[:count]

    async def register(self, conn: common.HttpConnection, count: int) -> tuple[str, float]:
        key = str(uuid.uuid4())
        body = json.dumps({"key": key, "name": "bench plan",
                           "tasks": self.plan_tasks(count)}).encode()
        started = time.perf_counter()
        answer = await conn.json("POST", "/compute_plans", raw=body, expect=201)
        elapsed = time.perf_counter() - started
        if len(answer["task_keys"]) != count or answer["plan"]["task_count"] != count:
            raise RuntimeError(f"plan {key} answered {len(answer['task_keys'])} task keys")
        return key, elapsed


async def list_plan(conn: common.HttpConnection, plan_key: str) -> list[str]:
    keys: list[str] = []
    cursor = None
    while True:
        path = f"/tasks?compute_plan_key={plan_key}&limit=1000"
        if cursor is not None:
            path += f"&cursor={cursor}"
        page = await conn.json("GET", path)
        keys += [t["key"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return keys


async def run(args: argparse.Namespace) -> dict[str, float | None]:
    results: dict[str, float] = {}
    common.say(f"machine: load average {common.load_average():.2f}")
    async with common.fresh_database() as database_url, \
            common.api_server(database_url) as (port, server):
        fed = Federation(port)
        await fed.setup()
        writer = fed.conns[AGGREGATOR]
        # Warm-up, not counted: the server's first plan (imports, statement caches).
        await fed.register(writer, 50)

        meter = common.CpuMeter(database_url, (server.pid,))
        await meter.start()
        plan_key, elapsed = await fed.register(writer, args.tasks)
        cpu = await meter.stop()
        common.say(f"register: POST /compute_plans with {args.tasks:,} tasks answered in "
            f"{elapsed:.2f} s (load average {common.load_average():.2f})")
        common.say(common.cpu_line(cpu, args.tasks, "API server").replace("per event", "per task"))
        results["register_10k_task_plan_s"] = elapsed

        reader = fed.conns["org-b"]
        started = time.perf_counter()
        keys = await list_plan(reader, plan_key)
        elapsed = time.perf_counter() - started
        if len(keys) != args.tasks or len(set(keys)) != args.tasks:
            raise RuntimeError(f"listing the plan gave {len(keys)} tasks")
        common.say(f"list: {len(keys):,} tasks in {elapsed:.2f} s, pages of 1000 "
            f"(load average {common.load_average():.2f})")
        results["list_10k_tasks_s"] = elapsed

        stored = args.tasks + 50
        started = time.perf_counter()
        fill = [common.HttpConnection(port, writer.token) for _ in range(2)]
        while stored < args.stored:
            batch = [min(args.tasks, args.stored - stored - i * args.tasks)
                     for i in range(len(fill))]
            batch = [n for n in batch if n > 0]
            await asyncio.gather(*(fed.register(c, n) for c, n in zip(fill, batch,
                                                                       strict=False)))
            stored += sum(batch)
        for c in fill:
            c.close()
        common.say(f"get: {stored:,} tasks stored ({time.perf_counter() - started:.1f} s to add "
            f"the rest in plans of {args.tasks:,}, 2 at a time)")

        sample = random.sample(keys, min(len(keys), 1000)) * 2
        latencies: list[float] = []

        async def get(conn: common.HttpConnection, part: list[str]) -> None:
            for key in part:
                sent = time.perf_counter()
                status, _ = await conn.request("GET", f"/tasks/{key}")
                latencies.append((time.perf_counter() - sent) * 1000)
                if status != 200:
                    raise RuntimeError(f"GET /tasks/{key}: {status}")

        getters = [common.HttpConnection(port, fed.conns[org].token) for org in ORGS[1:]]
        await asyncio.gather(*(get(c, sample[i::len(getters)]) for i, c in enumerate(getters)))
        p50, p99 = common.percentile(latencies, 50), common.percentile(latencies, 99)
        common.say(f"get: GET /tasks/{{key}} x {len(latencies):,} over {len(getters)} connections: "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (load average {common.load_average():.2f})")
        results["get_task_p99_ms"] = p99
        for conn in [*fed.conns.values(), *getters]:
            conn.close()
    for key, (op, target) in TARGETS.items():
        value = results[key]
        met = value >= target if op == ">=" else value <= target
        common.say(f"{key}: {value:,.2f} (target {op} {target:g}) {'met' if met else 'MISSED'}")
    return {k: round(results[k], 3) if k in results else None for k in TARGETS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks of the timed plan")
    parser.add_argument("--stored", type=int, default=100_000,
                        help="tasks stored when single tasks are read")
    args = parser.parse_args()
    summary = asyncio.run(run(args))
    common.say(json.dumps(summary))


if __name__ == "__main__":
    main()
