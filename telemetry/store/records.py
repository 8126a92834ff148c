"""The plain frozen records the telemetry store returns: GPUs, samples, rollups, energy, power.

Times are aware UTC ``datetime`` objects (``SegmentEnergyUs``: epoch microseconds); units are
NVML's, named in every field (mW, mJ, MHz, percent, °C, bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from energy.counters import EnergyMethod


@dataclass(frozen=True, slots=True)
class GpuRecord:
    """A registered GPU: the backend's ``GpuInfo`` plus where and when it was seen.

    Attributes:
        id: Store key (``samples.gpu_id``).
        host / backend: The node and the backend that read it (``nvml``, ``simulated``, ...).
        index / uuid / name: As in ``GpuInfo``.
        min_limit_mw / max_limit_mw / default_limit_mw: Power limit range and default, mW.
        min_sm_clock_mhz / max_sm_clock_mhz: SM clock range, MHz.
        memory_total_bytes: Framebuffer size, bytes.
        has_energy_counter: Whether the GPU has a total energy counter.
        first_seen_at / last_seen_at: First registration; latest registration or stored sample
            (aware UTC).
    """

    id: int
    host: str
    backend: str
    index: int
    uuid: str
    name: str
    min_limit_mw: int | None
    max_limit_mw: int | None
    default_limit_mw: int | None
    min_sm_clock_mhz: int | None
    max_sm_clock_mhz: int | None
    memory_total_bytes: int | None
    has_energy_counter: bool
    first_seen_at: datetime
    last_seen_at: datetime


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """One stored reading of one GPU; ``None`` where the GPU did not report the field.

    Units as in ``GpuReading``: mW, mJ (counter since driver load), MHz, percent, °C, bytes.
    """

    gpu_id: int
    sampled_at: datetime
    power_mw: int | None
    power_avg_mw: int | None
    energy_mj: int | None
    sm_clock_mhz: int | None
    mem_clock_mhz: int | None
    gpu_util_pct: int | None
    mem_util_pct: int | None
    temperature_c: int | None
    memory_used_bytes: int | None
    power_limit_mw: int | None
    throttle_reasons: int | None


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """A compute process seen on a GPU at ``sampled_at`` (aware UTC); memory in bytes."""

    gpu_id: int
    sampled_at: datetime
    pid: int
    used_memory_bytes: int | None


@dataclass(frozen=True, slots=True)
class RollupRecord:
    """One GPU's minute.

    Attributes:
        gpu_id: The GPU.
        minute_start: Start of the minute (aware UTC).
        n_samples: Samples taken in the minute.
        energy_mj: Energy of the intervals that end in the minute, mJ (counter deltas where
            possible, so consecutive minutes add up to the counter delta over their span).
        mean_power_mw / min_power_mw / max_power_mw: Over the minute's samples (instant power,
            else the 1 s average), mW; ``None`` when no sample had power.
        method: ``counter``, ``trapezoid``, ``mixed`` or ``none`` (see ``energy.counters``).
        energy_cum_mj: The GPU's running total of ``energy_mj`` up to and including this
            minute, mJ.
    """

    gpu_id: int
    minute_start: datetime
    n_samples: int
    energy_mj: float
    mean_power_mw: float | None
    min_power_mw: int | None
    max_power_mw: int | None
    method: str
    energy_cum_mj: float


@dataclass(frozen=True, slots=True)
class BucketRecord:
    """One GPU's coarser rollup bucket: the exact sum of its minutes.

    Attributes:
        gpu_id: The GPU.
        level_s: Bucket width, s (one of ``ROLLUP_LEVELS_S``).
        start: Start of the bucket (aware UTC).
        n_samples: Samples taken in the bucket.
        energy_mj: Sum of the bucket's minute energies, mJ.
        mean_power_mw: Mean of the minutes' mean power weighted by their sample counts, mW.
        min_power_mw / max_power_mw: Lowest and highest reading in the bucket, mW.
        method: ``counter``, ``trapezoid``, ``mixed`` or ``none``.
    """

    gpu_id: int
    level_s: int
    start: datetime
    n_samples: int
    energy_mj: float
    mean_power_mw: float | None
    min_power_mw: int | None
    max_power_mw: int | None
    method: str


EnergySource = Literal["samples", "rollups"]


@dataclass(frozen=True, slots=True)
class SegmentEnergy:
    """One GPU's energy between two consecutive breakpoints (see ``Store.segment_energy``).

    Attributes:
        start / end: The segment, ``[start, end)`` (aware UTC).
        energy_mj: Energy, mJ.
        max_power_mw: Highest power reading, mW (from rollups: the highest of the minutes and
            buckets read, which may reach up to a minute beyond the segment); ``None``: none.
        method: How the energy was found: ``counter``, ``trapezoid``, ``mixed`` or ``none``.
        source: ``samples`` (raw) or ``rollups`` (minute edges, coarser buckets inside).
        counter_resets / gaps: Counter restarts and trapezoid gaps in the segment (raw samples
            only; rollups do not keep them).
    """

    start: datetime
    end: datetime
    energy_mj: float
    max_power_mw: int | None
    method: EnergyMethod
    source: EnergySource
    counter_resets: int = 0
    gaps: int = 0


@dataclass(frozen=True, slots=True)
class SegmentEnergyUs:
    """``SegmentEnergy`` with its ends as integer microseconds since the Unix epoch (what
    ``Store.segment_energy_us`` returns, for callers that do their own time arithmetic)."""

    start_us: int
    end_us: int
    energy_mj: float
    max_power_mw: int | None
    method: EnergyMethod
    source: EnergySource
    counter_resets: int = 0
    gaps: int = 0


@dataclass(frozen=True, slots=True)
class PowerPoint:
    """Power of one GPU over a bucket of a chart's time axis.

    Attributes:
        start / end: The bucket (aware UTC).
        mean_power_mw: Mean power, mW (from rollups: the bucket's energy over its width).
        max_power_mw: Highest reading, mW, or ``None``.
    """

    start: datetime
    end: datetime
    mean_power_mw: float
    max_power_mw: int | None
