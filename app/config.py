"""Settings, read once from the environment (every variable is listed in the README)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


def default_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "consort"


@dataclasses.dataclass(frozen=True)
class Settings:
    # None means: start an embedded server under `home` (see app/embedded.py).
    database_url: str | None
    nats_url: str | None
    home: Path
    admin_token: str | None
    host: str = "127.0.0.1"
    port: int = 8000
    # Organizations `consort serve` runs a runner for: "all", "none" or "org-a,org-b".
    local_runners: str = "all"
    # "docker" or "subprocess"; None: docker when an engine answers, else subprocess.
    runner_backend: str | None = None
    # Runners' housekeeping (runner/housekeeping.py): seconds between sweeps (0: none),
    # prepared function images kept per engine (0: no bound).
    runner_housekeeping_s: float = 30.0
    runner_max_images: int = 20

    @classmethod
    def from_env(cls) -> Settings:
        home = os.environ.get("CONSORT_HOME")
        return cls(
            database_url=os.environ.get("CONSORT_DATABASE_URL") or None,
            nats_url=os.environ.get("CONSORT_NATS_URL") or None,
            home=Path(home) if home else default_home(),
            admin_token=os.environ.get("CONSORT_ADMIN_TOKEN") or None,
            host=os.environ.get("CONSORT_HOST", "127.0.0.1"),
            port=int(os.environ.get("CONSORT_PORT", "8000")),
            local_runners=os.environ.get("CONSORT_LOCAL_RUNNERS", "all"),
            runner_backend=os.environ.get("CONSORT_RUNNER_BACKEND") or None,
            runner_housekeeping_s=float(
                os.environ.get("CONSORT_RUNNER_HOUSEKEEPING_SECONDS") or 30.0),
            runner_max_images=int(os.environ.get("CONSORT_RUNNER_MAX_IMAGES") or 20),
        )
