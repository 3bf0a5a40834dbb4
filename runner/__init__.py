"""The Consort runner: executes the tasks of its organization next to its data.

runner.contract is the interface between the orchestration (runner.worker: leases, inputs,
outputs, API calls) and the execution backends (runner.backends: Docker or local
processes); runner.images prepares function images.
"""

from runner.contract import (
    Backend,
    BackendChoice,
    BackendOptions,
    BuildError,
    ImageGone,
    ImageSourceKind,
    ImageSpec,
    IOEntry,
    Leftover,
    RunResult,
    RunSpec,
    choose_backend,
)

__all__ = [
    "Backend",
    "BackendChoice",
    "BackendOptions",
    "BuildError",
    "IOEntry",
    "ImageGone",
    "ImageSourceKind",
    "ImageSpec",
    "Leftover",
    "RunResult",
    "RunSpec",
    "choose_backend",
]
