"""Errors the store raises."""

from __future__ import annotations

UPGRADE_HINT = "run `powertrain db upgrade`"


class StoreError(Exception):
    """Base of every store error."""


class StoreWriteError(StoreError):
    """A write failed and wrote nothing (its transaction was rolled back).

    Attributes:
        transient: The cause is likely to pass (database locked or busy, connection lost,
            serialisation failure); otherwise it needs a person (read-only file, disk full,
            a constraint violated). Callers may retry either way.
    """

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class SchemaError(StoreError):
    """The database's schema is not one this version of powertrain can use."""


class SchemaOutdatedError(SchemaError):
    """The database is at an older migration than this version of powertrain expects."""
