"""What every user command shares: the client from the profile, errors, output, progress."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from consort.client import Client
from consort.errors import ConsortError
from consort.profiles import ProfileError

P = ParamSpec("P")
R = TypeVar("R")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class State:
    """Options of the root command (`consort --profile NAME ...`)."""

    profile: str | None = None


def client() -> Client:
    """A client for the chosen profile (or CONSORT_URL / CONSORT_TOKEN)."""
    return Client(profile=State.profile)


def handled(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn API and profile errors into a red line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ConsortError as exc:
            where = f" ({exc.code})" if exc.status else ""
            err.print(f"[red]error{where}:[/] {exc.detail}", markup=True)
            raise typer.Exit(1) from None
        except (ProfileError, ValueError, OSError) as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None

    return wrapper


def jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def print_json(value: Any) -> None:
    out.print_json(json.dumps(jsonable(value), default=str))


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def show_rows(rows: Iterable[BaseModel], columns: Sequence[str], as_json: bool,
              title: str | None = None) -> None:
    """A listing, as a table or a JSON array."""
    items = list(rows)
    if as_json:
        print_json(items)
        return
    table = Table(*columns, title=title, show_lines=False)
    for item in items:
        data = item.model_dump()
        table.add_row(*(cell(data.get(c)) for c in columns))
    out.print(table)
    if not items:
        out.print("(none)")


def show_one(item: BaseModel, as_json: bool) -> None:
    """One asset, as field/value lines or JSON."""
    if as_json:
        print_json(item)
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for name, value in item.model_dump().items():
        table.add_row(name, cell(value))
    out.print(table)


@contextmanager
def transfer(description: str) -> Iterator[Callable[[int, int | None], None]]:
    """A byte progress bar on stderr; yields the callback to give the client."""
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err,
                  transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextmanager
def counting(description: str) -> Iterator[Callable[[int, int | None], None]]:
    """A count progress bar (tasks registered) on stderr."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.completed}/{task.total}"), console=err,
                  transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def parse_pairs(values: Sequence[str], what: str) -> dict[str, str]:
    """K=V options into a dict."""
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{what} must look like KEY=VALUE, not {value!r}")
        pairs[name] = rest
    return pairs


WhereOption = Annotated[list[str], typer.Option(
    "--where", help="KEY=VALUE (metadata has that value) or KEY (metadata has that key); "
                    "repeat to require all")]


def parse_where(values: Sequence[str]) -> dict[str, str | None] | None:
    """--where options into the client's metadata filter."""
    where: dict[str, str | None] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not name:
            raise typer.BadParameter(f"--where must look like KEY=VALUE or KEY, not {value!r}")
        where[name] = rest if sep else None
    return where or None


def permissions(public: bool, authorized: Sequence[str]) -> dict[str, Any] | None:
    """The process permission from --public / --authorized options (None: server default)."""
    if not public and not authorized:
        return None
    ids = [i.strip() for a in authorized for i in a.split(",") if i.strip()]
    return {"process": {"public": public, "authorized_ids": ids}}
