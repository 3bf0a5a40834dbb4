"""The `consort` command line (see `consort.cli.main`)."""

from consort.cli.main import app, main

__all__ = ["app", "main"]
