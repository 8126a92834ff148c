"""The ``store_url`` fixture: every test runs on SQLite and on PostgreSQL alike.

PostgreSQL comes from ``POWERTRAIN_TEST_PG_URL`` (``source .ci/postgres.sh`` starts one); each
test gets a fresh schema of its own (``pg_url``, tests/conftest.py). Without the variable the
PostgreSQL cases are skipped, except under ``CI=true``, where they fail: CI must not pass with
half the suite unrun.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from telemetry.store import Store, open_store


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL to an empty database: a SQLite file, or a fresh PostgreSQL schema (``pg_url``)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'powertrain.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A store at the latest schema on each database kind."""
    s = open_store(store_url)
    try:
        yield s
    finally:
        s.close()
