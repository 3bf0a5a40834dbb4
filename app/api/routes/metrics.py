"""GET /metrics in the Prometheus text format, and the middleware counting commands."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.api.deps import RuntimeDep
from app.domain.tasks import TaskStatus

router = APIRouter(tags=["health"])


def _outcome(status: int) -> str:
    if status < 400:
        return "accepted"
    if status in (401, 403):
        return "denied"
    if status == 409:
        return "conflict"
    return "rejected" if status < 500 else "error"


class CommandCounter:
    """Pure ASGI middleware counting commands by route and outcome (BaseHTTPMiddleware
    would add a task group and a stream per request: a third of a command's CPU)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _COMMAND_METHODS:
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.COMMANDS.labels(scope["method"], route, _outcome(status)).inc()


_COMMAND_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def install(app: FastAPI) -> None:
    app.add_middleware(CommandCounter)


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(runtime: RuntimeDep) -> Response:
    """Counters of this process, and the state of the whole deployment (from PostgreSQL).
    Unauthenticated, like /health: bind it to a private network in production."""
    async with runtime.pool.acquire() as conn:
        for row in await conn.fetch("SELECT org, last_sequence FROM ledger_heads"):
            metrics.LEDGER_ENTRIES.labels(row["org"]).set(row["last_sequence"])
        head = await conn.fetchval("SELECT coalesce(max(position), 0) FROM ledger_positions")
        for row in await conn.fetch("SELECT name, position FROM projection_tracking"):
            metrics.PROJECTION_LAG.labels(row["name"]).set(max(0, head - row["position"]))
        counts = {r["status"]: r["n"] for r in await conn.fetch(
            "SELECT status, count(*) AS n FROM compute_tasks GROUP BY status")}
        for status in TaskStatus:
            metrics.TASKS.labels(status.value).set(counts.get(status.value, 0))
        per_worker = await conn.fetch(
            "SELECT worker, count(*) FILTER (WHERE status = 'TODO') AS todo, "
            "count(*) FILTER (WHERE status = 'DOING') AS doing FROM compute_tasks "
            "WHERE status IN ('TODO', 'DOING') GROUP BY worker")
    metrics.QUEUE_DEPTH.clear()
    metrics.RUNNING.clear()
    for row in per_worker:
        metrics.QUEUE_DEPTH.labels(row["worker"]).set(row["todo"])
        metrics.RUNNING.labels(row["worker"]).set(row["doing"])
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
