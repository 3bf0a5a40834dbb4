"""Saved connections: an API URL and a token per profile (usually one per organization).

Stored in `$XDG_CONFIG_HOME/consort/profiles.json` (default `~/.config/...`), mode 0600.
`CONSORT_PROFILE` picks the profile (else the one `consort login` used last);
`CONSORT_URL` and `CONSORT_TOKEN` override its fields, or stand in for a profile.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


class ProfileError(Exception):
    """No usable URL and token."""


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    url: str
    token: str
    org: str | None = None


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "consort" / "profiles.json"


def load() -> dict[str, Any]:
    path = config_path()
    if not path.exists():
        return {"current": None, "profiles": {}}
    data: dict[str, Any] = json.loads(path.read_text())
    data.setdefault("profiles", {})
    data.setdefault("current", None)
    return data


def save(profile: Profile, *, make_current: bool = True) -> Path:
    """Add or replace a profile; the file is created readable by its owner only."""
    data = load()
    data["profiles"][profile.name] = {"url": profile.url, "token": profile.token,
                                      "org": profile.org}
    if make_current or data["current"] is None:
        data["current"] = profile.name
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    path.chmod(0o600)
    return path


def resolve(name: str | None = None) -> Profile:
    """The profile to use: `name`, else CONSORT_PROFILE, else the current one; with
    CONSORT_URL / CONSORT_TOKEN applied on top."""
    data = load()
    chosen = name or os.environ.get("CONSORT_PROFILE") or data["current"]
    stored: dict[str, Any] = {}
    if chosen is not None:
        if chosen not in data["profiles"] and (name or os.environ.get("CONSORT_PROFILE")):
            raise ProfileError(f"no profile {chosen!r} in {config_path()}")
        stored = data["profiles"].get(chosen, {})
    url = os.environ.get("CONSORT_URL") or stored.get("url") or DEFAULT_URL
    token = os.environ.get("CONSORT_TOKEN") or stored.get("token")
    if not token:
        raise ProfileError("no API token: run `consort login --url URL --token TOKEN` "
                           "or set CONSORT_TOKEN")
    return Profile(chosen or "env", url, token, stored.get("org"))
