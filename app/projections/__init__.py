"""Views of the ledger: tables that are rebuilt at will by replaying it."""
