"""``powertrain nodes`` through the CLI: the JSON shape, the table, bad stores in one error line,
and a real daemon that shows up, then stopped."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from scheduler import nodes_command
from scheduler.cli import app
from scheduler.daemon import package_version
from scheduler.nodes_command import age
from telemetry.store import open_store
from telemetry.store.nodes import DOWN_AFTER_S, HEARTBEAT_INTERVAL_S
from tests.cli_helpers import cli_runner, one_error_line
from tests.daemon_proc import DaemonProcess

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)

JSON_KEYS = {"name", "gpus", "backend", "version", "pid", "started_at", "heartbeat_at",
             "stopped_at", "up", "state"}


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("COLUMNS", "200")
    return cli_runner(monkeypatch, tmp_path)


@pytest.fixture
def three_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store under ``tmp_path`` with a node up, one down and one stopped, read at ``NOW``."""
    monkeypatch.setattr(nodes_command, "_now", lambda: NOW)
    store = open_store(f"sqlite:///{tmp_path / 'powertrain.db'}")
    try:
        started = NOW - timedelta(hours=2)
        for name, gpus, pid in (("alpha", 8, 101), ("beta", 4, 102), ("gamma", 2, 103)):
            store.register_node(name=name, gpu_count=gpus, backend="nvml", version="0.1.0",
                                pid=pid, at=started)
        store.heartbeat("alpha", NOW - timedelta(seconds=3))
        store.heartbeat("beta", NOW - timedelta(seconds=DOWN_AFTER_S + 45))
        store.heartbeat("gamma", NOW - timedelta(minutes=10))
        store.node_stopped("gamma", NOW - timedelta(minutes=10))
    finally:
        store.close()
    return tmp_path


def nodes_json(run: CliRunner, *args: str) -> dict[str, dict[str, Any]]:
    result = run.invoke(app, ["nodes", "--json", *args])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return {row["name"]: row for row in rows}


def _time(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def test_json_gives_every_node_and_its_state(run: CliRunner, three_nodes: Path) -> None:
    result = run.invoke(app, ["nodes", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["alpha", "beta", "gamma"]
    for row in rows:
        assert set(row) == JSON_KEYS
    alpha, beta, gamma = rows
    assert alpha == {
        "name": "alpha", "gpus": 8, "backend": "nvml", "version": "0.1.0", "pid": 101,
        "started_at": (NOW - timedelta(hours=2)).isoformat(),
        "heartbeat_at": (NOW - timedelta(seconds=3)).isoformat(),
        "stopped_at": None, "up": True, "state": "up",
    }
    assert (beta["up"], beta["state"], beta["stopped_at"]) == (False, "down", None)
    assert (gamma["up"], gamma["state"]) == (False, "stopped")
    assert datetime.fromisoformat(gamma["stopped_at"]) == NOW - timedelta(minutes=10)
    assert datetime.fromisoformat(gamma["heartbeat_at"]).tzinfo is not None


def test_db_option_names_the_store(run: CliRunner, three_nodes: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POWERTRAIN_HOME", str(tmp_path / "elsewhere"))
    assert set(nodes_json(run, "--db", f"sqlite:///{three_nodes / 'powertrain.db'}")) == {
        "alpha", "beta", "gamma"
    }
    assert set(nodes_json(run, "--home", str(three_nodes))) == {"alpha", "beta", "gamma"}


def test_table_shows_each_node_with_its_heartbeat_age_and_state(
    run: CliRunner, three_nodes: Path
) -> None:
    result = run.invoke(app, ["nodes"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()
             if line.split() and line.split()[0] in ("alpha", "beta", "gamma")}
    assert " ".join(lines["alpha"]) == "alpha 8 nvml 0.1.0 101 2 h ago 3 s ago up"
    assert " ".join(lines["beta"]) == "beta 4 nvml 0.1.0 102 2 h ago 1 min ago down"
    assert " ".join(lines["gamma"]) == "gamma 2 nvml 0.1.0 103 2 h ago 10 min ago stopped"
    for column in ("Node", "GPUs", "Backend", "Version", "PID", "Started", "Heartbeat",
                   "State"):
        assert column in result.stdout


def test_an_empty_registry(run: CliRunner, tmp_path: Path) -> None:
    open_store(f"sqlite:///{tmp_path / 'powertrain.db'}").close()
    assert nodes_json(run) == {}
    result = run.invoke(app, ["nodes"])
    assert result.exit_code == 0, result.output
    assert "no node has registered" in result.stdout


@pytest.mark.parametrize(
    ("db", "code", "says"),
    [
        ("sqlite:///{tmp}/missing/powertrain.db", 2, "no store at"),
        ("not a url", 1, "cannot open the store: Could not parse"),
        ("bogus://x", 1, "--db takes a SQLAlchemy URL"),
        ("/srv/powertrain.db", 1, "--db takes a SQLAlchemy URL"),
        ("postgresql+psycopg://nobody@127.0.0.1:1/none", 1, "cannot open the store"),
    ],
)
def test_a_bad_store_is_one_error_line(
    run: CliRunner, tmp_path: Path, db: str, code: int, says: str
) -> None:
    # report and nodes open the store the same way (scheduler/store_access.py)
    for args in (["nodes"], ["nodes", "--json"], ["report"], ["report", "--json"]):
        result = run.invoke(app, [*args, "--db", db.format(tmp=tmp_path)])
        assert result.exit_code == code, result.output
        assert says in one_error_line(result.stderr)
        assert result.stdout == ""


def test_a_file_that_is_no_database_is_one_error_line(run: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "powertrain.db").write_text("not a database\n" * 100)
    result = run.invoke(app, ["nodes"])
    assert result.exit_code == 1, result.output
    assert "cannot open the store" in one_error_line(result.stderr)


def test_help_says_when_a_node_is_down(run: CliRunner) -> None:
    result = run.invoke(app, ["nodes", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert f"every {HEARTBEAT_INTERVAL_S:g} s" in text
    assert f"at most {DOWN_AFTER_S:g} s old" in text
    for option in ("--json", "--db", "--home"):
        assert option in text


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(-4.0, "0 s ago"), (0.0, "0 s ago"), (59.9, "59 s ago"), (60.0, "1 min ago"),
     (3599.0, "59 min ago"), (3600.0, "1 h ago"), (86399.0, "23 h ago"), (2 * 86400.0, "2 d ago")],
)
def test_age(seconds: float, shown: str) -> None:
    assert age(seconds) == shown


@pytest.mark.slow
def test_a_real_daemon_is_up_then_stopped(run: CliRunner, tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, gpus=3)
    host = socket.gethostname()
    try:
        def registered() -> bool:
            return host in nodes_json(run)

        daemon.wait_for(registered)
        node = nodes_json(run)[host]
        assert (node["gpus"], node["backend"], node["pid"]) == (3, "simulated", daemon.proc.pid)
        assert node["version"] == package_version()
        assert (node["state"], node["up"], node["stopped_at"]) == ("up", True, None)

        def heartbeat_after_start() -> bool:
            row = nodes_json(run)[host]
            return bool(_time(row["heartbeat_at"]) > _time(row["started_at"])
                        and row["state"] == "up")

        daemon.wait_for(heartbeat_after_start)
    except BaseException:
        daemon.kill()
        raise
    assert daemon.terminate() == 0, daemon.log()
    node = nodes_json(run)[host]
    assert (node["state"], node["up"], node["pid"]) == ("stopped", False, daemon.proc.pid)
    assert _time(node["stopped_at"]) >= _time(node["heartbeat_at"])
