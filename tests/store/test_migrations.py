"""Migrations on every database kind: head, one head, no drift, down and up with data."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from scheduler.store import JobStore
from telemetry.store import (
    UPGRADE_HINT,
    SchemaError,
    SchemaOutdatedError,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    open_store,
    upgrade,
)
from telemetry.store.migrate import SCRIPT_LOCATION, alembic_config
from telemetry.store.models import Base
from tests.store.data import at, gpu_info, reading

TABLES = {"gpus", "samples", "gpu_processes", "rollups_1m"}

# A later migration, written only for these tests: adds a nullable column to samples.
EXTRA_MIGRATION = '''"""test: samples.note"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "test_extra"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.add_column(sa.Column("note", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.drop_column("note")
'''


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _fill(url: str) -> int:
    """Open the store, write a few samples and a rollup, return the sample count."""
    store = open_store(url)
    try:
        ids = store.register_gpus([gpu_info(0)], host="n", backend="simulated")
        store.insert_samples(
            [(ids[0], reading(at(t), energy_mj=1_000 * t)) for t in range(0, 90, 10)]
        )
        store.rollup(at(130))
        return store.sample_count()
    finally:
        store.close()


def _count(url: str, table: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


def test_exactly_one_head() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    assert head_revision() == script.get_current_head()
    assert (SCRIPT_LOCATION / "env.py").is_file()


def test_the_migrations_travel_with_the_package() -> None:
    """``telemetry/store/migrations`` is the top-level ``alembic/`` folder (a link), and the
    wheel's package data covers every file in it: an installed powertrain migrates its store."""
    repo = Path(__file__).resolve().parents[2]
    assert SCRIPT_LOCATION.resolve() == repo / "alembic"
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["telemetry"]
    covered = {path for pattern in globs for path in (repo / "telemetry").glob(pattern)}
    files = {
        path for path in SCRIPT_LOCATION.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert len(files) > 3 and files <= covered, sorted(map(str, files - covered))


def test_upgrade_empty_database_to_head(store_url: str) -> None:
    assert current_revision(store_url) is None
    upgrade(store_url)
    assert current_revision(store_url) == head_revision()
    assert _tables(store_url) >= TABLES


def test_models_and_migrations_do_not_drift(store_url: str) -> None:
    upgrade(store_url)
    engine = make_engine(store_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_open_store_creates_a_fresh_database_and_opens_one_at_head(store_url: str) -> None:
    open_store(store_url).close()
    assert current_revision(store_url) == head_revision()
    store = open_store(store_url)  # at head: opens as it is
    try:
        assert store.gpus() == []
    finally:
        store.close()


def test_downgrade_to_base_and_upgrade_with_data_present(store_url: str) -> None:
    assert _fill(store_url) == 9
    downgrade(store_url, "base")
    assert not (TABLES & _tables(store_url))
    assert current_revision(store_url) is None

    with pytest.raises(SchemaOutdatedError) as caught:
        open_store(store_url)
    assert UPGRADE_HINT in str(caught.value)
    assert "run `powertrain db upgrade`" in str(caught.value)

    upgrade(store_url)
    assert _fill(store_url) == 9
    upgrade(store_url)  # already at head: nothing to do, nothing lost
    assert _count(store_url, "samples") == 9


def test_data_survives_a_later_migration_down_and_up(store_url: str, tmp_path: Path) -> None:
    scripts = tmp_path / "alembic"
    shutil.copytree(SCRIPT_LOCATION, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    head = head_revision()
    (scripts / "versions" / "test_extra.py").write_text(EXTRA_MIGRATION.format(head=head))

    assert _fill(store_url) == 9
    with pytest.raises(SchemaOutdatedError, match="powertrain db upgrade"):
        open_store(store_url, script_location=scripts)

    upgrade(store_url, script_location=scripts)
    assert current_revision(store_url) == "test_extra"
    assert _count(store_url, "samples") == 9 and _count(store_url, "rollups_1m") == 2
    with pytest.raises(SchemaError, match="upgrade powertrain"):
        open_store(store_url)  # the database is newer than this code

    downgrade(store_url, "-1", script_location=scripts)
    assert current_revision(store_url) == head
    assert _count(store_url, "samples") == 9 and _count(store_url, "gpus") == 1
    store = open_store(store_url)
    try:
        assert store.sample_count() == 9
        assert store.insert_samples([(store.gpus()[0].id, reading(at(100)))]) == 1
    finally:
        store.close()


def test_tables_without_a_revision_are_refused(store_url: str) -> None:
    engine = make_engine(store_url)
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()
    with pytest.raises(SchemaError, match="no migration revision"):
        open_store(store_url)


def test_env_takes_the_url_from_the_settings(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alembic import command

    monkeypatch.setenv("POWERTRAIN_DB", store_url)
    command.upgrade(alembic_config(None), "head")
    assert current_revision(store_url) == head_revision()


JOB_TABLES = {"jobs", "job_gpus", "job_events", "job_progress"}


def test_a_store_at_0001_is_refused_then_upgraded_to_0002_with_samples_kept(
    store_url: str,
) -> None:
    upgrade(store_url, "0001")
    assert current_revision(store_url) == "0001"
    assert not (JOB_TABLES & _tables(store_url))
    engine = make_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO gpus (host, backend, gpu_index, uuid, name, has_energy_counter,"
                    " first_seen_at, last_seen_at) VALUES ('n', 'simulated', 0, 'GPU-0', 'H100',"
                    " true, 0, 0)"
                )
            )
            gpu_id = conn.execute(text("SELECT id FROM gpus")).scalar_one()
            for t in range(5):
                conn.execute(
                    text(
                        "INSERT INTO samples (gpu_id, sampled_at, power_mw, energy_mj)"
                        " VALUES (:g, :t, 300000, :e)"
                    ),
                    {"g": gpu_id, "t": t * 1_000_000, "e": t * 300_000},
                )
    finally:
        engine.dispose()

    with pytest.raises(SchemaOutdatedError) as caught:
        open_store(store_url)
    assert "0001" in str(caught.value) and UPGRADE_HINT in str(caught.value)

    upgrade(store_url, "0002")
    assert current_revision(store_url) == "0002"
    assert _tables(store_url) >= TABLES | JOB_TABLES
    assert _count(store_url, "samples") == 5 and _count(store_url, "jobs") == 0
    upgrade(store_url)  # and on to the latest revision
    assert current_revision(store_url) == head_revision()
    store = open_store(store_url)
    try:
        assert store.sample_count() == 5
        assert store.gpu_energy(store.gpus()[0].id).energy_mj == 1_200_000
        assert JobStore(store).list() == []
    finally:
        store.close()

    downgrade(store_url, "0001")
    assert not (JOB_TABLES & _tables(store_url))
    assert _count(store_url, "samples") == 5


def _cum(url: str) -> list[tuple[int, int, float]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT gpu_id, minute_start, energy_cum_mj FROM rollups_1m "
                     "ORDER BY gpu_id, minute_start")
            )
            return [(int(g), int(m), float(c)) for g, m, c in rows]
    finally:
        engine.dispose()


def test_0006_fills_the_running_energy_of_the_minutes_already_stored(store_url: str) -> None:
    upgrade(store_url, "0005")
    engine = make_engine(store_url)
    try:
        with engine.begin() as conn:
            for i in (0, 1):
                conn.execute(
                    text(
                        "INSERT INTO gpus (host, backend, gpu_index, uuid, name,"
                        " has_energy_counter, first_seen_at, last_seen_at)"
                        " VALUES ('n', 'simulated', :i, :uuid, 'H100', true, 0, 0)"
                    ),
                    {"i": i, "uuid": f"GPU-{i}"},
                )
            gpu_ids = list(conn.execute(text("SELECT id FROM gpus ORDER BY gpu_index")).scalars())
            # inserted out of time order: the running total follows minute_start, not rowid
            for gpu_id, minute, energy in [(gpu_ids[0], 2, 30.5), (gpu_ids[0], 0, 10.0),
                                           (gpu_ids[0], 1, 20.0), (gpu_ids[1], 5, 7.0),
                                           (gpu_ids[1], 9, 1.25)]:
                conn.execute(
                    text(
                        "INSERT INTO rollups_1m (gpu_id, minute_start, n_samples, energy_mj,"
                        " method) VALUES (:g, :m, 60, :e, 'counter')"
                    ),
                    {"g": gpu_id, "m": minute * 60_000_000, "e": energy},
                )
    finally:
        engine.dispose()
    expected = [
        (gpu_ids[0], 0, 10.0), (gpu_ids[0], 60_000_000, 30.0),
        (gpu_ids[0], 120_000_000, 60.5), (gpu_ids[1], 300_000_000, 7.0),
        (gpu_ids[1], 540_000_000, 8.25),
    ]
    upgrade(store_url)
    assert _cum(store_url) == expected
    assert "energy_marks" in _tables(store_url)
    store = open_store(store_url)
    try:
        assert [r.energy_cum_mj for r in store.rollups(gpu_ids[0])] == [10.0, 30.0, 60.5]
    finally:
        store.close()

    downgrade(store_url, "0005")
    assert "energy_marks" not in _tables(store_url)
    engine = make_engine(store_url)
    try:
        with engine.connect() as conn:
            columns = {c["name"] for c in inspect(conn).get_columns("rollups_1m")}
    finally:
        engine.dispose()
    assert "energy_cum_mj" not in columns
    assert _count(store_url, "rollups_1m") == 5
    upgrade(store_url)
    assert _cum(store_url) == expected
