"""What the backend tests of both kinds share: a task to run, a log sink, a shell command."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from runner.contract import Backend, IOEntry, RunResult, RunSpec

MODEL_KEY = "0b6cc0d4-0d0c-4c3f-9a55-7b0e0f4ad001"


class Logs:
    """An on_log sink remembering every chunk and when it arrived."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.arrivals: list[float] = []

    async def __call__(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.arrivals.append(time.monotonic())

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode()


def task(workdir: Path, command: list[str], image: str, **fields: object) -> RunSpec:
    """A task with one input model and a model + performance output."""
    values: dict[str, object] = {
        "task_key": f"task-{uuid.uuid4()}",
        "image": image,
        "command": command,
        "entrypoint": None,
        "environment": {},
        "gpu": False,
        "workdir": workdir,
        "inputs": [IOEntry("model", "MODEL", f"input/models/{MODEL_KEY}", key=MODEL_KEY)],
        "outputs": [
            IOEntry("model", "MODEL", "output/model"),
            IOEntry("performance", "PERFORMANCE", "output/performance"),
        ],
        "timeout_s": 30.0,
    }
    values.update(fields)
    return RunSpec(**values)  # type: ignore[arg-type]


def sh(script: str) -> list[str]:
    # The io.json path lands in $1 (the backend appends it; "sh" is $0).
    return ["sh", "-c", script, "sh"]


async def run(
    backend: Backend, spec: RunSpec, cancel: asyncio.Event | None = None
) -> tuple[RunResult, Logs]:
    logs = Logs()
    result = await backend.run(spec, logs, cancel or asyncio.Event())
    return result, logs
