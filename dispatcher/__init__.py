"""Loyalty webhook dispatcher: delivers outbox events as signed webhooks."""

__version__ = "0.1.0"
