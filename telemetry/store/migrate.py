"""Alembic migrations, driven from code: upgrade, downgrade, revisions, and ``open_store``.

The migration scripts live in the repository's top-level ``alembic/`` folder (reached as
``telemetry/store/migrations``, which a wheel carries); there is no
``alembic.ini`` (``pyproject.toml``'s ``[tool.alembic]`` serves the ``alembic`` command line).
The database URL reaches ``alembic/env.py`` as the config attribute ``url``.
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from alembic import command
from telemetry.store.engine import make_engine
from telemetry.store.errors import UPGRADE_HINT, SchemaError, SchemaOutdatedError
from telemetry.store.models import Base
from telemetry.store.repository import Store

SCRIPT_LOCATION = Path(__file__).resolve().parent / "migrations"
"""The migration environment. In a checkout ``migrations`` links to the top-level ``alembic/``
folder; a built wheel carries a copy of it there, so an installed powertrain migrates too."""


def alembic_config(url: str | None = None, *, script_location: Path | None = None) -> Config:
    """An Alembic config for ``url`` (``None``: ``env.py`` falls back to the settings' URL).

    Args:
        url: SQLAlchemy URL of the database to migrate.
        script_location: Another migration folder (tests); the repository's by default.
    """
    config = Config()
    config.set_main_option("script_location", str(script_location or SCRIPT_LOCATION))
    if url is not None:
        config.attributes["url"] = url
    return config


@functools.lru_cache(maxsize=8)
def _script_heads(script_location: Path) -> tuple[str, ...]:
    """The heads of a migration folder, read once per process (reading means importing every
    migration script: a few milliseconds, on every store opened for a report otherwise)."""
    script = ScriptDirectory.from_config(alembic_config(script_location=script_location))
    return tuple(script.get_heads())


def head_revision(*, script_location: Path | None = None) -> str:
    """The latest migration's revision id.

    Raises:
        SchemaError: The migrations have more than one head.
    """
    heads = _script_heads(script_location or SCRIPT_LOCATION)
    if len(heads) != 1:
        raise SchemaError(f"the migrations must have exactly one head (found {sorted(heads)})")
    return heads[0]


def upgrade(url: str, revision: str = "head", *, script_location: Path | None = None) -> None:
    """Migrate the database at ``url`` up to ``revision``."""
    command.upgrade(alembic_config(url, script_location=script_location), revision)


def downgrade(url: str, revision: str, *, script_location: Path | None = None) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``base`` drops every table)."""
    command.downgrade(alembic_config(url, script_location=script_location), revision)


def _current(engine: Engine) -> tuple[tuple[str, ...], set[str]]:
    """The database's revisions, and which of its tables are powertrain's (or Alembic's)."""
    with engine.connect() as conn:
        heads = MigrationContext.configure(conn).get_current_heads()
        tables = set(inspect(conn).get_table_names())
    return tuple(heads), tables & (set(Base.metadata.tables) | {"alembic_version"})


def _at_revision(engine: Engine) -> tuple[str, ...] | None:
    """The revisions in the database's ``alembic_version`` table (``None``: no such table)."""
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars()
            return tuple(str(r) for r in rows)
    except SQLAlchemyError:
        return None


def current_revision(url: str) -> str | None:
    """The database's revision (``None`` for an empty or unversioned database)."""
    engine = make_engine(url)
    try:
        heads, _tables = _current(engine)
    finally:
        engine.dispose()
    return heads[0] if heads else None


def open_store(url: str, *, script_location: Path | None = None) -> Store:
    """Open the store at ``url``, creating the schema in an empty database.

    An empty database is migrated to the latest revision; one at the latest revision opens as
    it is; any other raises.

    Raises:
        SchemaOutdatedError: The database is at an older revision (the message says to run
            ``powertrain db upgrade``).
        SchemaError: The database is newer than this powertrain, or holds powertrain's tables
            without a revision.
    """
    head = head_revision(script_location=script_location)
    engine = make_engine(url)
    where = engine.url.render_as_string(hide_password=True)
    try:
        if _at_revision(engine) == (head,):  # the common case, in one query
            return Store(engine)
        heads, tables = _current(engine)
        if not tables:
            upgrade(url, "head", script_location=script_location)
            heads, tables = _current(engine)
        if heads != (head,):
            script = ScriptDirectory.from_config(alembic_config(script_location=script_location))
            known = {rev.revision for rev in script.walk_revisions()}
            if not heads and "alembic_version" not in tables:
                raise SchemaError(
                    f"the store at {where} holds powertrain's tables but no migration revision: "
                    "it was not created by powertrain's migrations"
                )
            if any(h not in known for h in heads):
                raise SchemaError(
                    f"the store at {where} is at revision {', '.join(heads)}, which this version "
                    f"of powertrain does not know (expected {head}): upgrade powertrain"
                )
            shown = ", ".join(heads) or "base (empty)"
            raise SchemaOutdatedError(
                f"the store at {where} is at revision {shown}, older than {head}: {UPGRADE_HINT}"
            )
    except BaseException:
        engine.dispose()
        raise
    return Store(engine)
