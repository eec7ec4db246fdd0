"""The fedistill exception hierarchy. Every message says what went wrong and what to do next."""

from __future__ import annotations


class FedistillError(Exception):
    """Base class of every error fedistill raises on purpose."""


class ConfigError(FedistillError):
    """A configuration value, option or file is invalid; the message names it."""


class DataError(FedistillError):
    """A dataset, partition or site file cannot be used as it is; the message names it."""


class UpdateRejected(FedistillError):
    """A model update or message failed validation and was not applied."""


class BudgetExhausted(FedistillError):
    """A site's privacy budget does not allow the requested work; ``details`` holds the site's decision."""

    def __init__(self, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class LedgerTampered(FedistillError):
    """A ledger or checkpoint does not verify."""


class ExternalToolError(FedistillError):
    """An external program fedistill needs (headless Chromium for PDF reports) is missing or failed."""
