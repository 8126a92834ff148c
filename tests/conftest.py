"""Fixtures shared by the test modules, and the optional servers of a test run.

When PostgreSQL's server binaries are installed and ``POWERTRAIN_TEST_PG_URL`` is not set, the
run starts a throwaway server itself (``.ci/postgres.sh``) before any test and stops it at the
end; pytest-xdist's workers inherit its URL. Tests that need a server or a browser this machine
lacks are skipped, and the run ends with one line per missing server: how many tests it cost and
the command that installs it (under ``CI=true`` they fail instead: CI skips nothing).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from telemetry.store import make_engine

REPO = Path(__file__).resolve().parents[1]
PG_ENV = "POWERTRAIN_TEST_PG_URL"

#: Skip reasons of the optional servers (the fixtures that skip use these texts) and the command
#: that installs each.
OPTIONAL_SERVERS = {
    "PostgreSQL": (f"{PG_ENV} is not set", "apt-get install postgresql"),
    "Chromium": ("chromium is not installed", "apt-get install chromium"),
    "Slurm": ("Slurm is not installed", "bash .ci/slurm.sh"),
}

_pg_stop: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """Start a throwaway PostgreSQL when its binaries are here and no server was given."""
    if hasattr(config, "workerinput") or os.environ.get(PG_ENV):
        return  # an xdist worker (the controller started it), or a server named on purpose
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return
    done = subprocess.run(["bash", str(REPO / ".ci" / "postgres.sh")], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    if done.returncode != 0:
        raise pytest.UsageError(f"could not start a PostgreSQL for the tests: {done.stderr}")
    for line in done.stdout.splitlines():
        if line.startswith("export "):
            os.environ[PG_ENV] = line.split("=", 1)[1].strip("'")
        elif line.startswith("# to stop it: "):
            _pg_stop.append(line.removeprefix("# to stop it: "))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the PostgreSQL ``pytest_configure`` started."""
    while _pg_stop:
        subprocess.run(["bash", "-c", _pg_stop.pop()], capture_output=True, timeout=60)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per optional server that is missing: tests skipped, why, what installs it."""
    skipped: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else ""
        for server, (why, _) in OPTIONAL_SERVERS.items():
            if why in str(reason):
                skipped[server] = skipped.get(server, 0) + 1
    for server, count in skipped.items():
        why, install = OPTIONAL_SERVERS[server]
        tests = "1 test" if count == 1 else f"{count} tests"
        terminalreporter.write_line(
            f"{tests} skipped: no {server} on this machine ({why}); as root, "
            f"`{install}` installs it and the next `make test` runs them", yellow=True
        )


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short, world-traversable folder for an API socket (tmp_path is deep and private)."""
    path = Path(tempfile.mkdtemp(prefix="pt-sock-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


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


@pytest.fixture
def pg_url(_pg_admin: Engine) -> Iterator[str]:
    """A URL to a fresh, empty PostgreSQL schema of this test's own (dropped afterwards)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with _pg_admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(os.environ[PG_ENV]).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with _pg_admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
