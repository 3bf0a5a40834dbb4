"""Process-wide Prometheus metrics: what this process counts as it works.

Counters and histograms are updated where things happen (HTTP commands in the API's
middleware, container runs in in-process runners); gauges of state (tasks by status,
queue depth, projection lag, ledger size) are read from PostgreSQL when /metrics is
scraped, so every API replica reports the same truth.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

COMMANDS = Counter(
    "consort_commands", "HTTP commands (non-GET requests) by route and outcome",
    ["method", "route", "outcome"], registry=REGISTRY)
LEDGER_ENTRIES = Gauge(
    "consort_ledger_entries", "Entries appended to each organization's ledger", ["org"],
    registry=REGISTRY)
PROJECTION_LAG = Gauge(
    "consort_projection_lag_entries", "Ledger entries not yet folded into each view",
    ["projection"], registry=REGISTRY)
TASKS = Gauge("consort_tasks", "Compute tasks by status", ["status"], registry=REGISTRY)
QUEUE_DEPTH = Gauge(
    "consort_runner_queue_depth", "TODO tasks waiting for a runner, by worker organization",
    ["worker"], registry=REGISTRY)
RUNNING = Gauge(
    "consort_runner_running_tasks", "DOING tasks, by worker organization", ["worker"],
    registry=REGISTRY)
CONTAINER_SECONDS = Histogram(
    "consort_container_duration_seconds", "Run time of task processes/containers run by "
    "this process's runners", ["backend", "outcome"], registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, float("inf")))
