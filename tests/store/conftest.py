"""The ``store_url`` fixture: every test runs on SQLite and on PostgreSQL alike.

PostgreSQL comes from ``POWERTRAIN_TEST_PG_URL`` (``source .ci/postgres.sh`` starts one); each
test gets a fresh schema of its own. Without the variable the PostgreSQL cases are skipped,
except under ``CI=true``, where they fail: CI must not pass with half the suite unrun.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from telemetry.store import Store, make_engine, open_store

PG_ENV = "POWERTRAIN_TEST_PG_URL"


@pytest.fixture(scope="session")
def _pg_admin() -> Iterator[Engine]:
    url = os.environ.get(PG_ENV)
    if not url:
        message = f"{PG_ENV} is not set: `source .ci/postgres.sh` starts a PostgreSQL for tests"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {message}", pytrace=False)
        pytest.skip(message)
    engine = make_engine(url, isolation_level="AUTOCOMMIT")
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store' / 'powertrain.db'}"
        return
    admin: Engine = request.getfixturevalue("_pg_admin")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(os.environ[PG_ENV]).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A store at the latest schema on each database kind."""
    s = open_store(store_url)
    try:
        yield s
    finally:
        s.close()
