"""The CLI: output for people and scripts, and one clear line for every mistake."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scheduler.cli import _reading_json, app
from telemetry.store import current_revision, head_revision
from tests.cli_helpers import cli_runner, one_error_line
from tests.store.data import at, reading


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    return cli_runner(monkeypatch, tmp_path)


def test_gpus_json_lists_every_gpu(run: CliRunner) -> None:
    result = run.invoke(app, ["gpus", "--json", "--backend", "simulated", "--sim-gpus", "3"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["index"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert {"index", "uuid", "name", "power_w", "power_limit_w", "energy_j"} <= row.keys()
        assert row["power_limit_w"] == 700.0 and 50 < row["power_w"] < 120  # an idle H100
        # power_w is the 1 s average everywhere (as in the API and `jobs`); the instant power
        # has its own name, and every other reading field is there in W, J, MiB or as read
        assert 50 < row["power_instant_w"] < 120 and "power_avg_w" not in row
        assert {"sm_clock_mhz", "mem_clock_mhz", "gpu_util_pct", "mem_util_pct", "temperature_c",
                "memory_used_mib", "memory_total_mib", "throttle_reasons"} <= row.keys()


def test_gpus_json_power_w_is_the_1s_average() -> None:
    r = replace(reading(at(0), power_mw=612_345, energy_mj=1_500), power_avg_mw=600_000)
    row = _reading_json("H100", "GPU-x", r, 80 * 2**30)
    assert (row["power_w"], row["power_instant_w"]) == (600.0, 612.345)
    assert (row["energy_j"], row["memory_total_mib"]) == (1.5, 80 * 1024)
    assert row["throttle_reasons"] == ["sw_power_cap"]


def test_gpus_table_says_which_backend(run: CliRunner) -> None:
    result = run.invoke(app, ["gpus", "--backend", "auto", "--sim-sku", "A40"])
    assert result.exit_code == 0, result.output
    assert "no NVIDIA driver found" in result.stderr
    assert "A40" in result.stdout


def test_simulated_node_keeps_its_shape(run: CliRunner) -> None:
    assert run.invoke(app, ["gpus", "--backend", "simulated", "--sim-gpus", "2"]).exit_code == 0
    again = run.invoke(app, ["gpus", "--json", "--backend", "simulated"])
    assert len(json.loads(again.stdout)) == 2
    clash = run.invoke(app, ["gpus", "--backend", "simulated", "--sim-gpus", "8"])
    assert clash.exit_code == 1
    assert "has 2 × H100-SXM" in one_error_line(clash.stderr)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["gpus", "--sim-gpus", "0"], "--sim-gpus"),
        (["gpus", "--sim-gpus", "-3"], "--sim-gpus"),
        (["gpus", "--backend", "simulated", "--sim-sku", "B9000"], "B9000"),
        (["daemon", "--interval-ms", "-5"], "--interval-ms"),
        (["daemon", "--interval-ms", "0"], "--interval-ms"),
        # what the parser itself refuses: once a box of six lines with the usage above it
        (["jobs", "--limit", "3"], "No such option: --limit"),
        (["submit", "--gpus", "two", "--", "true"], "'--gpus'"),
        (["submit", "--gpus", "1"], "Missing argument"),
        (["no-such-command"], "No such command"),
        (["report", "--by", "week"], "--by"),
        # names are shown on one line: no newline or terminal escape gets into one
        (["submit", "--socket", "/nonexistent", "--name", "a\nb", "--", "true"], "--name"),
        (["submit", "--socket", "/nonexistent", "--name", "\x1b[2Jx", "--", "true"], "--name"),
        (["submit", "--socket", "/nonexistent", "--", "a\x00b"], "command"),
        (["submit", "--socket", "/nonexistent", "--gpu-ids", "0,1,1", "--", "true"], "repeats"),
        (["submit", "--socket", "/nonexistent", "--gpu-ids", "0,,x", "--", "true"], "--gpu-ids"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(
    run: CliRunner, args: list[str], needle: str
) -> None:
    result = run.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in one_error_line(result.stderr)
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_nvml_without_a_driver_is_one_line(run: CliRunner) -> None:
    result = run.invoke(app, ["gpus", "--backend", "nvml"])
    assert result.exit_code == 1
    assert "NVIDIA" in one_error_line(result.stderr) or "NVML" in result.stderr


def test_db_upgrade_and_current(run: CliRunner, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = run.invoke(app, ["db", "upgrade", "--db", url])
    assert result.exit_code == 0, result.output
    assert current_revision(url) == head_revision()
    current = run.invoke(app, ["db", "current", "--db", url])
    assert f"current: {head_revision()}" in current.stdout


def test_help_explains_every_command(run: CliRunner) -> None:
    result = run.invoke(app, ["--help"])
    for command in ("daemon", "gpus", "db", "demo"):
        assert command in result.stdout
    daemon_help = run.invoke(app, ["daemon", "--help"]).stdout
    for flag in ("--backend", "--sim-gpus", "--sim-sku", "--db", "--interval-ms"):
        assert flag in daemon_help
