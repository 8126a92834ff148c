"""bench/gpu_check.py's plumbing, run as a real subprocess against the fake pynvml (--fake).

Its numbers mean nothing here; what is checked is that every phase runs and reports, that the
sampling phases read the energy counter on every read, and that nothing was set. Without a driver
it must say so and exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from telemetry.backends.nvml import nvml_available

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_every_phase_runs_on_the_fake_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--fake", "--seconds", "0.5", "--poll-seconds", "0.2",
         "--calls", "20", "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "no GPU setting was changed" in run.stdout
    report = json.loads(out.read_text())
    assert report["settings_changed"] is False and report["fake"] is True
    latency = report["call_latency"]
    assert {"NvmlBackend.read", "NvmlBackend.read (counter every call)"} <= latency.keys()
    assert set(report["phases"]) == {"10", "50", "100"}
    for phase in report["phases"].values():  # the exact backend: a counter reading every read
        assert phase["update_period"]["energy_mj"]["changes"] == phase["samples"] - 1
    daemon = report["daemon_way"]
    assert daemon["gpus_emulated"] == 8 and daemon["ticks"] >= 9
    assert daemon["cpu_share"] > 0 and daemon["counter_period_s"] is not None
    assert "nvmlDeviceGetTotalEnergyConsumption" in report["getters_10hz"]


@pytest.mark.skipif(nvml_available()[0], reason="an NVIDIA driver is present here")
def test_without_a_driver_it_says_so_and_exits_2() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--seconds", "0.1"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert run.stdout.startswith("no NVIDIA driver found:")
