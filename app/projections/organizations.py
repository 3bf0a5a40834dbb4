"""Views of organizations and their API tokens (the tokens view is what auth reads)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from app.events.entries import LedgerEntry
from app.projections.framework import Projection, insert_rows, runs_by_type


class OrganizationsView(Projection):
    name = "organizations"
    tables = ("organizations", "api_tokens")
    ddl = """
    CREATE TABLE IF NOT EXISTS organizations (
        id                    text PRIMARY KEY,
        name                  text NOT NULL,
        model_export_enabled  boolean NOT NULL,
        created_at            timestamptz NOT NULL
    );
    CREATE TABLE IF NOT EXISTS api_tokens (
        id            text PRIMARY KEY,
        org           text,
        role          text NOT NULL,
        name          text NOT NULL,
        token_sha256  text NOT NULL UNIQUE,
        issued_at     timestamptz NOT NULL,
        issued_by     text NOT NULL,
        revoked_at    timestamptz
    );
    CREATE INDEX IF NOT EXISTS api_tokens_org ON api_tokens (org, issued_at);
    """

    async def apply(self, conn: asyncpg.Connection, entries: Sequence[LedgerEntry]) -> None:
        for event_type, run in runs_by_type(entries):
            if event_type == "OrganizationRegistered":
                await insert_rows(
                    conn, "organizations", ("id", "name", "model_export_enabled", "created_at"),
                    [(d["org_id"], d["name"], d["model_export_enabled"], e.recorded_at)
                     for e in run for d in (e.data,)],
                )
            elif event_type == "TokenIssued":
                await insert_rows(
                    conn, "api_tokens",
                    ("id", "org", "role", "name", "token_sha256", "issued_at", "issued_by"),
                    [(d["token_id"], d["org"], d["role"], d["name"], d["token_sha256"],
                      e.recorded_at, e.actor) for e in run for d in (e.data,)],
                )
            elif event_type == "TokenRevoked":
                await conn.executemany(
                    "UPDATE api_tokens SET revoked_at = $2 WHERE id = $1",
                    [(e.data["token_id"], e.recorded_at) for e in run],
                )
