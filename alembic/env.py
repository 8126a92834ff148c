"""Alembic's migration environment for powertrain's store.

The URL comes from the config attribute ``url`` (set by ``telemetry.store.migrate``), else from
``POWERTRAIN_DB`` / ``POWERTRAIN_HOME`` as the daemon reads them (``default_url``); never from a
file. A caller may also hand over an open ``connection`` attribute.
"""

from __future__ import annotations

from sqlalchemy import Connection

from alembic import context
from telemetry.paths import default_url
from telemetry.store.engine import make_engine, normalise_url
from telemetry.store.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url")
    return str(url) if url else default_url()


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade --sql``) without connecting."""
    url = normalise_url(_url())
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.get_backend_name() == "sqlite",
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate through a connection: the caller's, or a new engine's."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
