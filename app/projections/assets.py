"""Views of the assets organizations register: data managers, samples, functions, datasets."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from app.events.canonical import canonical_text
from app.events.entries import LedgerEntry
from app.projections.framework import Projection, insert_rows, runs_by_type


def j(value: object) -> str:
    """JSON text for a jsonb column (one shared encoder: json.dumps builds one per call)."""
    return canonical_text(value)


class AssetsView(Projection):
    name = "assets"
    tables = ("data_managers", "data_samples", "functions", "datasets")
    ddl = """
    CREATE TABLE IF NOT EXISTS data_managers (
        key text PRIMARY KEY, owner text NOT NULL, name text NOT NULL, description text NOT NULL,
        opener_checksum text NOT NULL, permissions jsonb NOT NULL, logs_permission jsonb NOT NULL,
        metadata jsonb NOT NULL, created_at timestamptz NOT NULL, position bigint NOT NULL
    );
    CREATE INDEX IF NOT EXISTS data_managers_owner ON data_managers (owner, position);
    CREATE TABLE IF NOT EXISTS data_samples (
        key text PRIMARY KEY, owner text NOT NULL, data_manager_keys text[] NOT NULL,
        checksum text NOT NULL, location text NOT NULL, metadata jsonb NOT NULL,
        created_at timestamptz NOT NULL, position bigint NOT NULL
    );
    CREATE INDEX IF NOT EXISTS data_samples_dm ON data_samples USING gin (data_manager_keys);
    CREATE TABLE IF NOT EXISTS functions (
        key text PRIMARY KEY, owner text NOT NULL, name text NOT NULL, description text NOT NULL,
        permissions jsonb NOT NULL, inputs jsonb NOT NULL, outputs jsonb NOT NULL,
        image_source text NOT NULL, image text NOT NULL, command jsonb NOT NULL,
        entrypoint jsonb, environment jsonb NOT NULL, gpu boolean NOT NULL,
        metadata jsonb NOT NULL, created_at timestamptz NOT NULL, position bigint NOT NULL
    );
    CREATE TABLE IF NOT EXISTS datasets (
        key text PRIMARY KEY, owner text NOT NULL, name text NOT NULL, files jsonb NOT NULL,
        total_size bigint NOT NULL, permissions jsonb NOT NULL, metadata jsonb NOT NULL,
        compute_task_key text, identifier text, created_at timestamptz NOT NULL,
        position bigint NOT NULL
    );
    CREATE INDEX IF NOT EXISTS datasets_task ON datasets (compute_task_key);
    """

    async def apply(self, conn: asyncpg.Connection, entries: Sequence[LedgerEntry]) -> None:
        for event_type, run in runs_by_type(entries):
            if event_type == "DataManagerRegistered":
                await insert_rows(
                    conn, "data_managers", ("key", "owner", "name", "description",
                                            "opener_checksum", "permissions", "logs_permission",
                                            "metadata", "created_at", "position"),
                    [(d["key"], d["owner"], d["name"], d["description"], d["opener_checksum"],
                      j(d["permissions"]), j(d["logs_permission"]), j(d["metadata"]),
                      e.recorded_at, e.position) for e in run for d in (e.data,)],
                )
            elif event_type == "DataSampleRegistered":
                await insert_rows(
                    conn, "data_samples", ("key", "owner", "data_manager_keys", "checksum",
                                           "location", "metadata", "created_at", "position"),
                    [(d["key"], d["owner"], d["data_manager_keys"], d["checksum"], d["location"],
                      j(d["metadata"]), e.recorded_at, e.position) for e in run for d in (e.data,)],
                )
            elif event_type == "DataSampleLinked":
                await conn.executemany(
                    "UPDATE data_samples SET data_manager_keys = data_manager_keys || $2 "
                    "WHERE key = $1",
                    [(e.data["key"], e.data["data_manager_keys"]) for e in run],
                )
            elif event_type == "FunctionRegistered":
                await insert_rows(
                    conn, "functions", ("key", "owner", "name", "description", "permissions",
                                        "inputs", "outputs", "image_source", "image", "command",
                                        "entrypoint", "environment", "gpu", "metadata",
                                        "created_at", "position"),
                    [(d["key"], d["owner"], d["name"], d["description"], j(d["permissions"]),
                      j(d["inputs"]), j(d["outputs"]), d["image_source"], d["image"],
                      j(d["command"]), None if d["entrypoint"] is None else j(d["entrypoint"]),
                      j(d["environment"]), d["gpu"], j(d["metadata"]), e.recorded_at, e.position)
                     for e in run for d in (e.data,)],
                )
            elif event_type == "DatasetRegistered":
                await insert_rows(
                    conn, "datasets", ("key", "owner", "name", "files", "total_size",
                                       "permissions", "metadata", "compute_task_key",
                                       "identifier", "created_at", "position"),
                    [(d["key"], d["owner"], d["name"], j(d["files"]), d["total_size"],
                      j(d["permissions"]), j(d["metadata"]), d.get("compute_task_key"),
                      d.get("identifier"), e.recorded_at, e.position)
                     for e in run for d in (e.data,)],
                )
