"""`consort ledger tail|verify`: read, follow and verify ledgers through the API."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Annotated

import typer

from consort import models as m
from consort.cli._common import JsonOption, client, err, handled, out, print_json

ledger = typer.Typer(help="The hash-chained ledgers, through the API.", no_args_is_help=True)
OrgOption = Annotated[list[str], typer.Option("--org", help="Only this org (repeatable)")]


def _line(event: m.LedgerEvent, as_json: bool) -> None:
    if as_json:
        print(event.model_dump_json())
        return
    out.print(f"{event.position:>8} {event.time} {event.org:<12} #{event.sequence:<6} "
              f"{event.event_type:<24} {event.asset_kind}/{event.asset_key} by {event.actor}",
              markup=False)


@ledger.command("tail")
@handled
def tail(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep following")] = False,
    orgs: OrgOption = [],  # noqa: B006
    asset_kind: Annotated[list[str], typer.Option("--kind", help="Asset kind")] = [],  # noqa: B006
    event_type: Annotated[list[str], typer.Option("--type", help="Event type")] = [],  # noqa: B006
    lines: Annotated[int, typer.Option("--lines", "-n", min=0)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON entry per line")] = False,
) -> None:
    """The last entries of the ledgers you may read; with -f, then live ones."""
    with client() as api:
        def history() -> Iterator[m.LedgerEvent]:
            return api.iter_events(page_size=1000, org=orgs or None,
                                   asset_kind=asset_kind or None, event_type=event_type or None)

        last = collections.deque(history(), maxlen=lines)
        for event in last:
            _line(event, as_json)
        if not follow:
            return
        after = max((e.position or 0 for e in last), default=0)
        if not last:  # nothing printed yet: start at the end of what exists now
            for event in history():
                after = max(after, event.position or 0)
        try:
            for event in api.follow_events(after=after, org=orgs or None,
                                           asset_kind=asset_kind or None,
                                           event_type=event_type or None):
                _line(event, as_json)
        except KeyboardInterrupt:
            pass


@ledger.command("verify")
@handled
def verify(orgs: OrgOption = [], as_json: JsonOption = False) -> None:  # noqa: B006
    """Have the server recompute hash chains: yours, or --org, or (auditor, administrator)
    every organization's. Exit 1 if one is broken."""
    with client() as api:
        if not orgs:
            who = api.me()
            orgs = [who.org] if who.org else [o.id for o in api.iter_organizations()]
        results = [api.verify_ledger(org) for org in orgs]
    if as_json:
        print_json(results)
    for result in results if not as_json else []:
        if result.ok:
            out.print(f"{result.org:<16} ok      {result.entries_checked} entries, head "
                      f"{(result.head_hash or '')[:16]}", markup=False)
        else:
            out.print(f"{result.org:<16} BROKEN  first bad entry: sequence "
                      f"{result.first_bad_sequence} (id {result.first_bad_entry_id}): "
                      f"{result.problem}", markup=False)
    broken = [r.org for r in results if not r.ok]
    if broken:
        err.print(f"{len(broken)} of {len(results)} ledgers are broken.")
        raise typer.Exit(1)


def install(app: typer.Typer) -> None:
    app.add_typer(ledger, name="ledger")
