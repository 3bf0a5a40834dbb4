"""The rules of Consort, free of I/O and frameworks so they can be unit-tested alone.

Nothing here imports from the rest of `app`: the ledger, views and HTTP layer depend on
the domain, never the other way round.
"""
