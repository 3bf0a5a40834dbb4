"""The ledger: append-only, hash-chained, per-organization event storage on PostgreSQL."""
