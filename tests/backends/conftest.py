"""The ``backend`` fixture: every GPU backend, so one suite proves they all behave alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from telemetry.backends.base import GpuBackend
from telemetry.clock import VirtualClock


@pytest.fixture(params=["simulated", "nvml-fake", "replay"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GpuBackend]:
    impl: GpuBackend
    if request.param == "simulated":
        from telemetry.backends.simulated import SimulatedBackend

        impl = SimulatedBackend(
            gpus=2, sku="H100-SXM", clock=VirtualClock(), state_path=tmp_path / "sim.json", seed=0
        )
    elif request.param == "replay":
        from telemetry.backends.replay import ReplayBackend

        trace = (
            Path(__file__).resolve().parents[2].parent
            / "shared/traces/zeus/nsdi23_trace/summary_power_a40.csv"
        )
        impl = ReplayBackend(trace, "imagenet/resnet50", 256, gpus=2, clock=VirtualClock(), seed=0)
    else:
        from telemetry.backends.nvml import NvmlBackend
        from tests.fake_pynvml import FakePynvml

        impl = NvmlBackend(nvml=FakePynvml(gpus=2))
    try:
        yield impl
    finally:
        impl.close()
