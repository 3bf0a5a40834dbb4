"""The FastAPI application: routers, error handlers, and the runtime's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import compute as compute_commands
from app.api import problems
from app.api.routes import assets, compute, datasets, health, ledger, metrics, organizations
from app.execution.sweeper import LeaseSweeper
from app.runtime import Runtime


def create_app(runtime: Runtime, *, manage_runtime: bool = True) -> FastAPI:
    """Build the app around a runtime; with manage_runtime the app starts and stops it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_runtime:
            await runtime.start()
        # Runners that die mid-task: their tasks are retried or failed (INTERNAL).
        sweeper = LeaseSweeper(runtime.leases,
                               lambda run: compute_commands.expire_lease(runtime, run))
        sweeper.start()
        try:
            yield
        finally:
            await sweeper.stop()
            if manage_runtime:
                await runtime.stop()

    app = FastAPI(
        title="Consort",
        version="0.1.0",
        description="Train and evaluate models across organizations without pooling data. "
        "Every change is an event on the acting organization's hash-chained ledger.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    problems.install(app)
    metrics.install(app)
    for module in (health, metrics, organizations, assets, compute, datasets, ledger):
        app.include_router(module.router)
    return app
