"""Opening the store from a command that reads it directly (``report``, ``nodes``), so that it
works from any machine that reaches the store, with no daemon of its own.

Every way of failing ends in one ``error: ...`` line on stderr and a non-zero exit: no store at
the path, a URL SQLAlchemy cannot parse or has no driver for, a server that does not answer, a
file that is not a store, a schema older than this powertrain.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from telemetry.store import SchemaOutdatedError, Store, StoreError, default_url, open_store

EXIT_ERROR = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """A command-line value that cannot be used (the message is the one line shown)."""


def fail(message: str, code: int) -> NoReturn:
    """One ``error:`` line on stderr, and exit with ``code``."""
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False,
                               soft_wrap=True)
    raise typer.Exit(code)


def reason(exc: Exception) -> str:
    """A database failure's cause on one line (the driver's message, without SQLAlchemy's
    statement and background link)."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    return " ".join(str(cause).split()) or type(exc).__name__


def store_url(db: str | None, home: Path | None) -> str:
    """The store's URL as the daemon resolves it (options, then ``POWERTRAIN_DB``/``_HOME``).

    Raises:
        UsageError: It names a SQLite file that does not exist.
    """
    url = default_url(db, home)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise UsageError(
                f"no store at {path}: run the daemon first, or name one with --db/--home"
            )
    return url


def open_or_fail(url: str) -> Store:
    """The store at ``url``, or one ``error:`` line and exit 1."""
    try:
        return open_store(url)
    except SchemaOutdatedError as exc:
        fail(str(exc), EXIT_ERROR)
    except ArgumentError as exc:  # no URL, or no driver for it
        fail(f"cannot open the store: {reason(exc)} (--db takes a SQLAlchemy URL, such as "
             "sqlite:////path/to/powertrain.db)", EXIT_ERROR)
    except (StoreError, SQLAlchemyError, OSError, ValueError) as exc:
        fail(f"cannot open the store: {reason(exc)}", EXIT_ERROR)


@contextmanager
def opened_store(db: str | None, home: Path | None) -> Iterator[Store]:
    """The store named by ``--db``/``--home`` (one ``error:`` line and an exit when it cannot
    be opened), closed after the block."""
    try:
        url = store_url(db, home)
    except UsageError as exc:
        fail(str(exc), EXIT_USAGE)
    store = open_or_fail(url)
    try:
        yield store
    finally:
        store.close()


def who_am_i() -> str:
    """This process's login name (its uid as text when it has none)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())
