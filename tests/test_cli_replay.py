"""The CLI on the replay backend: bundled traces by name, trace files by path, and one clear line
(exit 2) for every replay option that names something that is not there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scheduler.cli import EXIT_ERROR, EXIT_USAGE, app
from telemetry.backends.traces import resolve_trace
from tests.cli_helpers import cli_runner, one_error_line

NOT_A_TRACE = str(Path(__file__).resolve().parents[1] / "pyproject.toml")


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    return cli_runner(monkeypatch, tmp_path / "home")


def test_gpus_json_replays_a_bundled_trace(run: CliRunner) -> None:
    result = run.invoke(app, ["gpus", "--json", "--backend", "replay", "--trace", "a40"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]  # the default count
    for row in rows:
        assert row["name"] == "A40 (replay)"
        assert row["power_limit_w"] == 300.0  # the top of the A40 trace's 100-300 W
        assert 50 < row["power_w"] <= 330


def test_gpus_table_says_what_it_replays(run: CliRunner) -> None:
    result = run.invoke(
        app,
        ["gpus", "--backend", "replay", "--trace", "A40", "--trace-workload", "imagenet/resnet50",
         "--trace-batch-size", "256", "--sim-gpus", "2"],
    )
    assert result.exit_code == 0, result.output
    assert "replaying A40 (imagenet/resnet50 bs=256): 2 × A40" in " ".join(result.stderr.split())
    assert "A40" in result.stdout


def test_a_trace_file_by_path_and_the_settings_from_the_environment(
    run: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POWERTRAIN_BACKEND", "replay")
    monkeypatch.setenv("POWERTRAIN_TRACE", str(resolve_trace("p100")))
    monkeypatch.setenv("POWERTRAIN_TRACE_WORKLOAD", "squad")
    monkeypatch.setenv("POWERTRAIN_SIM_GPUS", "1")
    result = run.invoke(app, ["gpus", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["name"] == "P100 (replay)" and row["power_limit_w"] == 250.0


@pytest.mark.parametrize(
    ("args", "needle", "code"),
    [
        ([], "needs --trace", EXIT_USAGE),
        (["--trace", "h100"], "a40, p100", EXIT_USAGE),
        (["--trace", "no/such.csv"], "no/such.csv", EXIT_USAGE),
        (["--trace", "a40", "--trace-workload", "mnist"], "mnist", EXIT_USAGE),
        (["--trace", "a40", "--trace-workload", "bert_base_uncased"], "ambiguous", EXIT_USAGE),
        (["--trace", "a40", "--trace-workload", "squad", "--trace-batch-size", "7"], "squad",
         EXIT_USAGE),
        (["--trace", "a40", "--trace-batch-size", "0"], "--trace-batch-size", EXIT_USAGE),
        (["--trace", NOT_A_TRACE], "not a power trace", EXIT_ERROR),
    ],
)
def test_bad_replay_options_are_one_line(
    run: CliRunner, args: list[str], needle: str, code: int
) -> None:
    result = run.invoke(app, ["gpus", "--backend", "replay", *args])
    assert result.exit_code == code, result.output
    assert needle in one_error_line(result.stderr)
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args", [[], ["--trace", "h100"]])
def test_the_daemon_refuses_a_missing_trace_before_touching_the_store(
    run: CliRunner, tmp_path: Path, args: list[str]
) -> None:
    result = run.invoke(app, ["daemon", "--backend", "replay", *args])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "--trace" in one_error_line(result.stderr)
    assert not (tmp_path / "home").exists()


def test_help_documents_the_replay_options(run: CliRunner) -> None:
    for command in ("gpus", "daemon"):
        text = run.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).stdout
        for flag in ("replay", "--trace", "--trace-workload", "--trace-batch-size", "a40"):
            assert flag in text, (command, flag)
