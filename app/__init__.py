"""Consort: an event-sourced orchestrator for federated learning across organizations."""
