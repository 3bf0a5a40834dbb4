"""The `consort` command: the server commands of `app.cli` plus the user commands.

`serve`, `replay` and `verify` (and whatever else `app.cli` registers) run the server
side; `login`, `org`, `token`, `function`, `data-manager`, `sample`, `dataset`, `model`,
`plan`, `task` and `ledger` talk to an API with a saved profile.
"""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli import cli as server_cli
from consort import profiles
from consort.cli import assets, compute, examples, ledger
from consort.cli._common import (
    JsonOption,
    State,
    client,
    handled,
    out,
    print_json,
    show_rows,
)
from consort.client import Client

app = typer.Typer(
    name="consort",
    help="Consort: an event-sourced orchestrator for federated learning across organizations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# The server's own commands, unchanged.
app.registered_commands += server_cli.registered_commands
app.registered_groups += server_cli.registered_groups


@app.callback()
def root(
    profile: Annotated[str | None, typer.Option(
        "--profile", "-p", envvar="CONSORT_PROFILE",
        help="Saved profile to use (default: the last one logged in).")] = None,
) -> None:
    """Consort: an event-sourced orchestrator for federated learning across organizations."""
    State.profile = profile


@app.command()
@handled
def login(
    url: Annotated[str, typer.Option("--url", help="The API, e.g. http://127.0.0.1:8000")],
    token: Annotated[str, typer.Option("--token", help="An API token")],
    profile: Annotated[str | None, typer.Option(
        "--profile", help="Profile name (default: the token's organization)")] = None,
) -> None:
    """Check a token against the API and save it as a profile (the current one)."""
    with Client(url, token) as api:
        who = api.me()
    name = profile or who.org or who.kind
    path = profiles.save(profiles.Profile(name, url.rstrip("/"), token, who.org))
    out.print(f"Logged in to {url} as {who.org or who.kind} (profile {name!r}, "
              f"saved in {path})", markup=False)


org = typer.Typer(help="Organizations.", no_args_is_help=True)
token = typer.Typer(help="API tokens.", no_args_is_help=True)
app.add_typer(org, name="org")
app.add_typer(token, name="token")


@org.command("add")
@handled
def org_add(
    org_id: Annotated[str, typer.Argument(metavar="ID", help="Short slug, e.g. org-a")],
    name: Annotated[str | None, typer.Option("--name", help="Display name")] = None,
    model_export: Annotated[bool, typer.Option(
        "--model-export", help="Allow other organizations to download its models")] = False,
    as_json: JsonOption = False,
) -> None:
    """Register an organization (administrator); prints its first token, once."""
    with client() as api:
        created = api.register_organization(org_id, name or org_id,
                                            model_export_enabled=model_export)
    if as_json:
        print_json(created)
        return
    out.print(f"Registered {created.organization.id}. Its first token (shown once):",
              markup=False)
    out.print(created.token.token, markup=False)


@org.command("list")
@handled
def org_list(as_json: JsonOption = False) -> None:
    """Every organization."""
    with client() as api:
        show_rows(api.iter_organizations(), ["id", "name", "model_export_enabled",
                                             "created_at"], as_json)


@token.command("add")
@handled
def token_add(
    name: Annotated[str, typer.Option("--name", help="What it is for")] = "",
    role: Annotated[str, typer.Option("--role", help="org or auditor")] = "org",
    for_org: Annotated[str | None, typer.Option(
        "--org", help="For this organization (administrator only)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Issue a token; prints it, once."""
    if role not in ("org", "auditor"):
        raise typer.BadParameter("--role is org or auditor")
    with client() as api:
        issued = api.issue_token(name, role="auditor" if role == "auditor" else "org",
                                 org=for_org)
    if as_json:
        print_json(issued)
        return
    out.print(f"Token {issued.info.id} ({issued.info.role}"
              f"{' of ' + issued.info.org if issued.info.org else ''}), shown once:",
              markup=False)
    out.print(issued.token, markup=False)


@token.command("list")
@handled
def token_list(as_json: JsonOption = False) -> None:
    """Tokens' metadata (never the tokens themselves)."""
    with client() as api:
        show_rows(api.iter_tokens(), ["id", "org", "role", "name", "issued_at", "revoked_at"],
                  as_json)


@token.command("revoke")
@handled
def token_revoke(token_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke a token."""
    with client() as api:
        info = api.revoke_token(token_id)
    out.print(f"Revoked {info.id} at {info.revoked_at}", markup=False)


assets.install(app)
compute.install(app)
ledger.install(app)
examples.install(app)


def main() -> None:
    app()
