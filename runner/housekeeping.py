"""A runner's housekeeping: what killed runners left behind, and the bound on images.

A runner killed mid-task (SIGKILL, a host crash) leaves its container and its working
directory, and nothing else would ever remove them; prepared function images pile up
with every new function. So each runner sweeps, when it starts and then every few
seconds (RunnerConfig.housekeeping_s):

- the containers of its own organization (label `consort.org`; another organization's
  are never looked at, even on a shared engine) and the working directories under its
  home, removing those whose task is no longer being run;
- the prepared function images beyond the `max_images` most recently used (the backend
  only ever touches images it prepared itself).

Several runners may share one engine (or one home), and a live runner creates its
container before the API has accepted the start (the task is still TODO for a moment), so
a leftover is removed only when every rule below lets it go:

1. its task is one this runner process is running right now: kept;
2. it was made less than `grace_s` ago: kept (a live runner may be recording the start);
3. the API does not show the task (404, 403, unreachable), or the task is not this
   organization's to run: kept;
4. the task is DOING and became DOING no later than `grace_s` after the leftover was
   made: kept (that run may be another live runner's);
5. anything else (TODO, WAITING, DONE, FAILED, CANCELED, or DOING again in a later
   attempt) is abandoned: removed (a running container is killed), and logged.

Timestamps compare the API's clock (start_date) with the engine's or the filesystem's:
clocks further apart than `grace_s` could keep an orphan longer, never remove a live run
(rule 4 keeps whatever started before the leftover was made).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Collection
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from runner.api import ApiError, ConnectionFailed, RunnerApi
from runner.contract import Backend

log = logging.getLogger(__name__)

# A working dir is `<task key>-<8 hex digits>` (runner.worker).
WORKDIR_NAME = re.compile(r"^(?P<key>.+)-[0-9a-f]{8}$")


@dataclasses.dataclass
class Sweep:
    """What one sweep removed."""

    containers: list[str] = dataclasses.field(default_factory=list)
    workdirs: list[Path] = dataclasses.field(default_factory=list)
    images: list[str] = dataclasses.field(default_factory=list)


class Housekeeper:
    """Sweeps one organization's leftovers and bounds the images (module docstring)."""

    def __init__(
        self, *, org: str, backend: Backend, api: RunnerApi, workdirs: Path,
        running: Callable[[], Collection[str]], images_in_use: Callable[[], Collection[str]],
        grace_s: float = 60.0, max_images: int = 20,
    ) -> None:
        self.org = org
        self.backend = backend
        self.api = api
        self.workdirs = workdirs
        self.grace_s = grace_s
        self.max_images = max_images
        self._running = running
        self._images_in_use = images_in_use
        self._lock = asyncio.Lock()

    async def run_forever(self, every_s: float) -> None:
        """Sweep now, then every `every_s` seconds, until cancelled."""
        while True:
            await self.sweep()
            await asyncio.sleep(every_s)

    async def sweep(self) -> Sweep:
        """One pass over containers, working dirs and images; a failing part is logged
        and left for the next pass, the others still run."""
        async with self._lock:  # the periodic sweep and an explicit one never overlap
            done = Sweep()
            tasks: dict[str, dict[str, Any] | None] = {}  # one API read per task per sweep
            for part in (self._containers, self._workdirs, self._images):
                try:
                    await part(done, tasks)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("housekeeping of %s: %s failed", self.org, part.__name__)
            return done

    # -- the three parts --------------------------------------------------------------------

    async def _containers(self, done: Sweep, tasks: dict[str, dict[str, Any] | None]) -> None:
        for leftover in await self.backend.leftovers(self.org):
            why = await self._abandoned(leftover.task_key, leftover.created_at, tasks)
            if why is None:
                continue
            await self.backend.remove_leftover(leftover)
            log.info("housekeeping: removed the container %s: %s", leftover.describe(), why)
            done.containers.append(leftover.id)

    async def _workdirs(self, done: Sweep, tasks: dict[str, dict[str, Any] | None]) -> None:
        for path, key, made in await asyncio.to_thread(_list_workdirs, self.workdirs):
            why = await self._abandoned(key, made, tasks)
            if why is None:
                continue
            await asyncio.to_thread(remove_tree, path)
            log.info("housekeeping: removed the working dir %s: %s", path, why)
            done.workdirs.append(path)

    async def _images(self, done: Sweep, tasks: dict[str, dict[str, Any] | None]) -> None:
        if self.max_images <= 0:
            return  # unlimited
        removed = await self.backend.prune_images(
            self.max_images, protect=set(self._images_in_use()), grace_s=self.grace_s)
        for tag in removed:
            log.info("housekeeping: removed the image %s (least recently used beyond %d)",
                     tag, self.max_images)
        done.images += removed

    # -- the rule -----------------------------------------------------------------------

    async def _abandoned(
        self, key: str, made_at: float, tasks: dict[str, dict[str, Any] | None]
    ) -> str | None:
        """Why what was made for task `key` at `made_at` (epoch seconds) is abandoned, or
        None when it must stay (the rules of the module docstring, in order)."""
        if not key or key in self._running():
            return None
        if time.time() - made_at < self.grace_s:
            return None
        if key not in tasks:
            tasks[key] = await self._task(key)
        task = tasks[key]
        if task is None or task.get("worker") != self.org:
            return None
        status = task.get("status")
        if status != "DOING":
            return f"its task is {status}"
        started = _epoch(task.get("start_date"))
        if started is not None and started > made_at + self.grace_s:
            return "its task was started again since"
        return None

    async def _task(self, key: str) -> dict[str, Any] | None:
        try:
            return await self.api.task(key)
        except (ConnectionFailed, httpx.HTTPError) as exc:
            log.info("housekeeping: task %s left alone for now (%r)", key, exc)
        except ApiError as exc:
            log.debug("housekeeping: task %s left alone (%s)", key, exc)
        return None


def _list_workdirs(root: Path) -> list[tuple[Path, str, float]]:
    """(path, task key, mtime) of every working dir under `root`."""
    found: list[tuple[Path, str, float]] = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return found
    for entry in entries:
        match = WORKDIR_NAME.match(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            made = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue  # its runner removed it meanwhile
        found.append((Path(entry.path), match.group("key"), made))
    return found


def remove_tree(path: Path) -> None:
    """rmtree that also removes read-only directories (the subprocess backend leaves
    input/ without write permission when its runner dies before restoring it)."""

    def retry(function: Callable[..., Any], failed: str, _: Any) -> None:
        parent = os.path.dirname(failed)
        try:
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IWUSR | stat.S_IXUSR)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, stat.S_IMODE(os.lstat(failed).st_mode) | 0o700)
                shutil.rmtree(failed, onerror=retry)
            else:
                function(failed)
        except FileNotFoundError:
            pass

    shutil.rmtree(path, onerror=retry)


def _epoch(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
