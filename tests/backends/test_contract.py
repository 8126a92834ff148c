"""One suite, every backend: what the sampler and actuators rely on, proved alike for each."""

from __future__ import annotations

from datetime import UTC

import pytest

from telemetry.backends.base import (
    GpuBackend,
    GpuNotFoundError,
    GpuReading,
    InvalidSettingError,
    ThrottleReason,
)


def test_is_a_backend(backend: GpuBackend) -> None:
    assert isinstance(backend, GpuBackend)
    assert backend.name in {"nvml", "simulated", "replay"}


def test_devices_are_indexed_and_unique(backend: GpuBackend) -> None:
    devices = backend.devices()
    assert devices, "a backend under test has at least one GPU"
    assert [d.index for d in devices] == list(range(len(devices)))
    assert len({d.uuid for d in devices}) == len(devices)
    for d in devices:
        assert d.name
        assert d.min_limit_mw is not None and d.max_limit_mw is not None
        assert 0 < d.min_limit_mw <= (d.default_limit_mw or d.max_limit_mw) <= d.max_limit_mw


def test_read_gives_a_full_reading(backend: GpuBackend) -> None:
    r = backend.read(0)
    assert isinstance(r, GpuReading)
    assert r.index == 0
    assert r.sampled_at.tzinfo is not None and r.sampled_at.utcoffset() == UTC.utcoffset(None)
    for field in ("power_mw", "power_avg_mw", "energy_mj", "sm_clock_mhz", "mem_clock_mhz",
                  "gpu_util_pct", "mem_util_pct", "temperature_c", "memory_used_bytes",
                  "power_limit_mw", "throttle_reasons"):
        value = getattr(r, field)
        assert isinstance(value, int) and value >= 0, f"{field} = {value!r}"
    assert r.power_mw is not None and 10_000 < r.power_mw < 1_500_000  # 10 W .. 1.5 kW
    assert r.gpu_util_pct is not None and r.gpu_util_pct <= 100


def test_unknown_gpu_raises_lookup_error(backend: GpuBackend) -> None:
    with pytest.raises(GpuNotFoundError):
        backend.read(len(backend.devices()) + 5)
    with pytest.raises(LookupError):
        backend.read(-1)


def test_power_limit_set_and_reset(backend: GpuBackend) -> None:
    info = backend.devices()[0]
    assert info.min_limit_mw is not None and info.max_limit_mw is not None
    target = (info.min_limit_mw + info.max_limit_mw) // 2
    backend.set_power_limit(0, target)
    assert backend.read(0).power_limit_mw == target
    backend.reset_power_limit(0)
    assert backend.read(0).power_limit_mw == (info.default_limit_mw or info.max_limit_mw)


def test_power_limit_outside_range_names_the_range(backend: GpuBackend) -> None:
    info = backend.devices()[0]
    assert info.max_limit_mw is not None
    with pytest.raises(InvalidSettingError, match="range"):
        backend.set_power_limit(0, info.max_limit_mw + 1000)
    with pytest.raises(InvalidSettingError):
        backend.set_power_limit(0, 0)


def test_clock_lock_and_reset(backend: GpuBackend) -> None:
    info = backend.devices()[0]
    assert info.min_sm_clock_mhz is not None and info.max_sm_clock_mhz is not None
    backend.lock_sm_clocks(0, info.min_sm_clock_mhz, info.max_sm_clock_mhz)
    backend.reset_sm_clocks(0)
    with pytest.raises(InvalidSettingError):
        backend.lock_sm_clocks(0, info.max_sm_clock_mhz, info.min_sm_clock_mhz)


def test_energy_counter_is_monotonic(backend: GpuBackend) -> None:
    first = backend.read(0).energy_mj
    second = backend.read(0).energy_mj
    assert first is not None and second is not None and second >= first


def test_throttle_reasons_are_known_bits(backend: GpuBackend) -> None:
    reasons = backend.read(0).throttle_reasons
    assert reasons is not None
    assert reasons & ~int(sum(ThrottleReason)) == 0
