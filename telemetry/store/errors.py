"""Errors the store raises, and the one place a database failure is judged transient or not."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

UPGRADE_HINT = "run `powertrain db upgrade`"

# PostgreSQL SQLSTATEs worth retrying: serialisation failure, deadlock, lock not available,
# shutdown/crash/cannot connect now, too many connections (class 08 = connection exceptions).
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"}
_TRANSIENT_SQLITE = {"SQLITE_BUSY", "SQLITE_LOCKED"}


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


def is_transient(exc: SQLAlchemyError) -> bool:
    """Whether a database failure is likely to pass if the write is tried again: SQLite busy or
    locked, a PostgreSQL serialisation failure, deadlock or lost connection."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    sqlite_name = getattr(orig, "sqlite_errorname", None)
    if sqlite_name is not None:
        return sqlite_name in _TRANSIENT_SQLITE
    if hasattr(orig, "sqlstate"):  # psycopg
        sqlstate = getattr(orig, "sqlstate", None)
        if sqlstate is None:
            # no server answer at all: the connection failed
            return isinstance(exc, OperationalError)
        return str(sqlstate).startswith("08") or sqlstate in _TRANSIENT_SQLSTATES
    message = str(orig).lower()
    return "locked" in message or "busy" in message


def write_error(what: str, exc: SQLAlchemyError) -> StoreWriteError:
    """The ``StoreWriteError`` to raise (``from exc``) when ``what`` failed with ``exc``: its
    message names the cause and whether it is transient."""
    transient = is_transient(exc)
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    kind = "transient" if transient else "permanent"
    return StoreWriteError(f"{what} failed ({kind}): {cause}", transient=transient)
