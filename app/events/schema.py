"""Tables of the write side: the ledger itself and the bookkeeping around it.

The ledger is insert-only, enforced by triggers that reject UPDATE, DELETE and TRUNCATE.
`ledger_positions` gives each entry its global replay position once it has committed
(see docs/adr/0002-ledger-ordering.md); it is insert-only too.
"""

from __future__ import annotations

import asyncpg

SCHEMA_LOCK = 72_001

DDL = """
CREATE TABLE IF NOT EXISTS ledger (
    org          text        NOT NULL,
    sequence     bigint      NOT NULL,
    id           uuid        NOT NULL UNIQUE,
    recorded_at  timestamptz NOT NULL,
    actor        text        NOT NULL,
    asset_kind   text        NOT NULL,
    asset_key    text        NOT NULL,
    version      integer     NOT NULL,
    event_type   text        NOT NULL,
    data         text        NOT NULL,
    reason       text        NOT NULL,
    prev_hash    bytea       NOT NULL,
    hash         bytea       NOT NULL,
    PRIMARY KEY (org, sequence)
);

CREATE TABLE IF NOT EXISTS ledger_positions (
    position  bigint PRIMARY KEY,
    org       text   NOT NULL,
    sequence  bigint NOT NULL,
    UNIQUE (org, sequence),
    FOREIGN KEY (org, sequence) REFERENCES ledger (org, sequence)
);

-- Head of each org's chain; its row lock serializes appends of one org only.
CREATE TABLE IF NOT EXISTS ledger_heads (
    org            text   PRIMARY KEY,
    last_sequence  bigint NOT NULL,
    last_hash      bytea  NOT NULL
);

-- How far the sequencer has placed each org's entries.
CREATE TABLE IF NOT EXISTS sequencer_marks (
    org                text   PRIMARY KEY,
    sequenced_through  bigint NOT NULL
);

-- Current version of each aggregate, for optimistic concurrency (derivable from the ledger).
CREATE TABLE IF NOT EXISTS aggregate_versions (
    aggregate  text    PRIMARY KEY,
    version    integer NOT NULL
);

CREATE TABLE IF NOT EXISTS admin_credentials (
    id            smallint PRIMARY KEY CHECK (id = 1),
    token_sha256  text     NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION consort_reject_ledger_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % on % is not allowed', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['ledger', 'ledger_positions'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = t || '_immutable_rows') THEN
            EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE OR DELETE ON %I '
                           'FOR EACH ROW EXECUTE FUNCTION consort_reject_ledger_change()',
                           t || '_immutable_rows', t);
            EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I '
                           'FOR EACH STATEMENT EXECUTE FUNCTION consort_reject_ledger_change()',
                           t || '_no_truncate', t);
        END IF;
    END LOOP;
END $$;
"""


async def create_schema(conn: asyncpg.Connection) -> None:
    """Create the write-side tables if missing; safe to run from several processes at once."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await conn.execute(DDL)
