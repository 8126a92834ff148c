"""The store's engines: SQLite files in WAL mode, PostgreSQL via psycopg 3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

SQLITE_BUSY_TIMEOUT_MS = 10_000
"""How long a SQLite connection waits for another writer's lock before giving up."""
def normalise_url(url: str | URL) -> URL:
    """The URL with PostgreSQL pointed at psycopg 3 (``postgresql://`` means psycopg2 otherwise)."""
    parsed = make_url(url)
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(
    url: str | URL, *, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS, **kwargs: Any
) -> Engine:
    """An engine for the store.

    SQLite: the file's parent folder is created; every connection uses WAL
    (``journal_mode=WAL``, ``synchronous=NORMAL``), a busy timeout and foreign keys; transactions
    are begun by SQLAlchemy (``BEGIN``) rather than by the sqlite3 module, so that a transaction
    spans exactly one ``engine.begin()`` block and DDL is transactional too.
    PostgreSQL: ``postgresql://`` and ``postgresql+psycopg://`` both use psycopg 3.

    Args:
        url: Any SQLAlchemy URL.
        busy_timeout_ms: SQLite only: how long to wait for another writer's lock, ms.
        **kwargs: Passed to ``sqlalchemy.create_engine``.

    Returns:
        A new engine; the caller disposes of it.
    """
    parsed = normalise_url(url)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(parsed, **kwargs)

    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, **kwargs)
    in_memory = database in {"", ":memory:"}

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Leave transaction control to the "begin" hook below (the sqlite3 module would
        # otherwise open transactions lazily and commit before DDL).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A writer that first reads (rollups, retention) asks for the write lock up front, so
        # it waits on busy_timeout instead of failing when upgrading a read lock.
        immediate = connection.get_execution_options().get("sqlite_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine
