"""Readings and GPUs for the store tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from telemetry.backends.base import GpuInfo, GpuProcess, GpuReading

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def gpu_info(index: int, *, counter: bool = True) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000",
        name="NVIDIA H100 80GB HBM3",
        min_limit_mw=200_000,
        max_limit_mw=700_000,
        default_limit_mw=700_000,
        min_sm_clock_mhz=345,
        max_sm_clock_mhz=1980,
        memory_total_bytes=80 * 2**30,
        has_energy_counter=counter,
    )


def reading(
    at: datetime,
    *,
    index: int = 0,
    power_mw: int | None = 300_000,
    energy_mj: int | None = None,
    processes: tuple[GpuProcess, ...] = (),
) -> GpuReading:
    return GpuReading(
        index=index,
        sampled_at=at,
        power_mw=power_mw,
        power_avg_mw=power_mw,
        energy_mj=energy_mj,
        sm_clock_mhz=1980,
        mem_clock_mhz=2619,
        gpu_util_pct=97,
        mem_util_pct=40,
        temperature_c=61,
        memory_used_bytes=70 * 2**30,
        power_limit_mw=700_000,
        throttle_reasons=0x4,
        processes=processes,
    )


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)
