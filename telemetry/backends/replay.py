"""The replay backend: GPUs that play measured power-limit traces, for benchmarks and demos.

A trace file (Zeus NSDI'23 format: ``dataset,network,batch_size,optimizer,power_limit,
time_per_epoch,average_power``; the measured A40 and P100 traces are bundled, see
``telemetry.backends.traces``) says, for each workload and batch size, how long an epoch took and
how much power the board drew under each power limit. ``ReplayBackend`` plays one (workload,
batch size) curve: the power limit set through ``set_power_limit`` selects the operating point,
linearly interpolated between the measured limits, and a driver advances the job with
``run_steps``. Readings carry NVML-like noise; the energy counter is the exact integral of the
power actually drawn and never goes back.

What the traces do not carry is emulated and documented as such: SM clocks (a locked clock acts
as the power limit at the same position of its range, see ``ReplayBackend``), temperature,
utilisation and memory.

**Micro-batches.** A trace measures every batch size of a workload on the same dataset at every
power limit, so time per epoch and energy per epoch are comparable across batch sizes. A job with
a global batch ``G`` trained in micro-batches of ``m`` (``G / m`` micro-batches per optimizer step,
gradients accumulated) is played from the curve measured at batch size ``m``: an optimizer step
takes ``G / m`` of that curve's iterations, at its power. The approximation: the trace's
iterations each include an optimizer update, which gradient accumulation does once per ``G``
samples, so the replay charges the update ``G / m`` times instead of once; it overstates the time
and energy of small micro-batches by the update's share of an iteration (the traces do not
separate it), and never favours them.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import math
import os
import random
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from energy.units import j_to_mj, mw_to_w, w_to_mw
from telemetry.backends.base import (
    BackendCapabilities,
    GpuInfo,
    GpuNotFoundError,
    GpuReading,
    InvalidSettingError,
    ThrottleReason,
    capabilities_from_info,
)
from telemetry.backends.traces import resolve_trace
from telemetry.clock import Clock, WallClock, to_datetime

__all__ = [
    "TRACE_COLUMNS",
    "TRAINING_SET_SAMPLES",
    "ReplayBackend",
    "ReplayNoise",
    "TraceCurve",
    "default_curve",
    "gpu_name_from_path",
    "load_trace",
    "micro_batches_of",
    "steps_per_epoch",
]

#: The columns a trace file must have (any order; extra columns are ignored).
TRACE_COLUMNS: Final = (
    "dataset",
    "network",
    "batch_size",
    "optimizer",
    "power_limit",
    "time_per_epoch",
    "average_power",
)

#: Training-set sizes (samples per epoch) of the public datasets in the Zeus traces. Used only to
#: turn seconds per epoch into seconds per step; an unknown dataset uses ``DEFAULT_SAMPLES``.
TRAINING_SET_SAMPLES: Final[dict[str, int]] = {
    "cifar100": 50_000,
    "imagenet": 1_281_167,
    "librispeech": 281_241,  # LibriSpeech 960 h training utterances
    "movielens-1m": 994_169,  # ratings less one held-out rating per user (6,040 users)
    "squad": 87_599,  # SQuAD v1.1 training questions
    "sentiment140": 1_600_000,
}

#: Samples per epoch assumed for a dataset not in ``TRAINING_SET_SAMPLES``.
DEFAULT_SAMPLES: Final = 100_000

#: Nominal SM clock range (MHz) reported for replayed GPUs: the traces carry no clock data.
NOMINAL_SM_CLOCK_RANGE_MHZ: Final = (210, 1740)
_NOMINAL_MEM_CLOCK_MHZ: Final = 7000
_AMBIENT_C: Final = 30.0
_C_PER_W: Final = 0.2  # nominal steady-state temperature rise per watt drawn
#: A power limit binds (``SW_POWER_CAP``) when the power drawn reaches this share of it...
_NEAR_CAP: Final = 0.8
#: ... and is below this share of the power drawn under the highest limit.
_BELOW_TOP: Final = 0.97


def steps_per_epoch(dataset: str, batch_size: int, samples: int | None = None) -> int:
    """Training steps in one epoch: ``ceil(samples / batch_size)``.

    Args:
        dataset: Dataset name as written in the trace (looked up in ``TRAINING_SET_SAMPLES``).
        batch_size: Samples per step.
        samples: Samples per epoch, overriding the table.

    Returns:
        Steps per epoch, at least 1.
    """
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    n = samples if samples is not None else TRAINING_SET_SAMPLES.get(dataset, DEFAULT_SAMPLES)
    return max(1, math.ceil(n / batch_size))


@dataclass(frozen=True, slots=True)
class TraceCurve:
    """One (workload, batch size) curve of a trace: epoch time and power against power limit.

    Attributes:
        gpu: GPU name, e.g. ``A40``.
        dataset / network / optimizer: As in the trace.
        batch_size: Samples per step.
        limits_w: Measured power limits, ascending (W).
        time_per_epoch_s: Seconds per epoch at each limit.
        average_power_w: Average board power at each limit (W).
    """

    gpu: str
    dataset: str
    network: str
    optimizer: str
    batch_size: int
    limits_w: tuple[float, ...]
    time_per_epoch_s: tuple[float, ...]
    average_power_w: tuple[float, ...]

    @property
    def workload(self) -> str:
        """``dataset/network``, the name the backend and the benchmark use."""
        return f"{self.dataset}/{self.network}"

    def at(self, limit_w: float) -> tuple[float, float]:
        """Seconds per epoch and average power (W) under a power limit.

        Linear interpolation between measured limits; outside them the nearest end holds.
        """
        xs = self.limits_w
        if limit_w <= xs[0]:
            return self.time_per_epoch_s[0], self.average_power_w[0]
        if limit_w >= xs[-1]:
            return self.time_per_epoch_s[-1], self.average_power_w[-1]
        hi = bisect.bisect_left(xs, limit_w)
        lo = hi - 1
        w = (limit_w - xs[lo]) / (xs[hi] - xs[lo])
        t = self.time_per_epoch_s[lo] + w * (self.time_per_epoch_s[hi] - self.time_per_epoch_s[lo])
        p = self.average_power_w[lo] + w * (self.average_power_w[hi] - self.average_power_w[lo])
        return t, p


def gpu_name_from_path(path: Path) -> str:
    """The GPU a trace file is for, from its name: ``summary_power_a40.csv`` gives ``A40``."""
    stem = path.stem
    return (stem.rsplit("_", 1)[-1] if "_" in stem else stem).upper()


def load_trace(path: Path | str, gpu: str | None = None) -> list[TraceCurve]:
    """Every (workload, batch size, optimizer) curve in a trace file.

    Rows measured more than once at the same limit are averaged.

    Args:
        path: A CSV file with the ``TRACE_COLUMNS``.
        gpu: GPU name (default: from the file name, see ``gpu_name_from_path``).

    Returns:
        Curves sorted by workload and batch size.

    Raises:
        ValueError: A column is missing, a value is not a number, or a time or power is not
            positive; the message names the file and line.
    """
    path = Path(path)
    gpu_name = gpu or gpu_name_from_path(path)
    groups: dict[tuple[str, str, int, str], dict[float, list[tuple[float, float]]]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: not a power trace, missing column(s) {', '.join(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                key = (row["dataset"], row["network"], int(row["batch_size"]), row["optimizer"])
                limit = float(row["power_limit"])
                t = float(row["time_per_epoch"])
                p = float(row["average_power"])
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}:{line}: bad value ({err})") from err
            if not (limit > 0 and t > 0 and p > 0) or not all(map(math.isfinite, (limit, t, p))):
                raise ValueError(f"{path}:{line}: limit, time and power must be positive numbers")
            groups.setdefault(key, {}).setdefault(limit, []).append((t, p))
    curves = []
    for (dataset, network, batch_size, optimizer), by_limit in groups.items():
        limits = sorted(by_limit)
        times = tuple(sum(t for t, _ in by_limit[x]) / len(by_limit[x]) for x in limits)
        powers = tuple(sum(p for _, p in by_limit[x]) / len(by_limit[x]) for x in limits)
        curves.append(
            TraceCurve(gpu_name, dataset, network, optimizer, batch_size, tuple(limits), times,
                       powers)
        )
    if not curves:
        raise ValueError(f"{path}: the trace has no rows")
    return sorted(curves, key=lambda c: (c.workload, c.batch_size, c.optimizer))


def _pick_curve(
    curves: Sequence[TraceCurve], workload: str, batch_size: int, optimizer: str | None
) -> TraceCurve:
    """The curve for a workload named ``dataset/network``, ``dataset`` or ``network``."""

    def named(c: TraceCurve) -> bool:
        return workload in (c.workload, c.dataset, c.network)

    found = [
        c for c in curves
        if named(c) and c.batch_size == batch_size and optimizer in (None, c.optimizer)
    ]
    if len(found) == 1:
        return found[0]
    choices = sorted({f"{c.workload} bs={c.batch_size} ({c.optimizer})" for c in curves
                      if named(c)} or {c.workload for c in curves})
    what = "is ambiguous" if found else "is not in the trace"
    raise LookupError(
        f"workload {workload!r} batch size {batch_size} {what}; choose one of: "
        + ", ".join(choices)
    )


def micro_batches_of(
    curves: Sequence[TraceCurve], workload: str, global_batch: int, optimizer: str | None = None
) -> tuple[int, ...]:
    """The micro-batches a job of ``global_batch`` can train ``workload`` in on a trace: the
    batch sizes measured for it (they ran, so they fit the GPU's memory) that divide the global
    batch, ascending.

    Args:
        curves: A trace's curves (``load_trace``).
        workload: ``dataset/network``, ``dataset`` or ``network``.
        global_batch: Samples per optimizer step.
        optimizer: The trace's optimizer column, when a workload has several.
    """
    if global_batch < 1:
        raise ValueError(f"the global batch must be positive, got {global_batch}")
    return tuple(sorted({
        c.batch_size for c in curves
        if workload in (c.workload, c.dataset, c.network) and optimizer in (None, c.optimizer)
        and global_batch % c.batch_size == 0
    }))


def default_curve(
    trace: str | os.PathLike[str], workload: str | None = None, batch_size: int | None = None
) -> tuple[str, int]:
    """The workload and batch size to play when they are not (both) given.

    The workload defaults to the first one in the file (its first row); the batch size to the
    largest the trace has for that workload.

    Args:
        trace: A bundled trace name or a trace file (see ``resolve_trace``).
        workload: ``dataset/network``, ``dataset`` or ``network``; None for the file's first.
        batch_size: Kept when given.

    Returns:
        ``(workload, batch_size)``, as ``ReplayBackend`` takes them.

    Raises:
        LookupError: Unknown trace, or no single workload of that name (the message lists
            the choices).
        ValueError: The file is not a power trace.
    """
    path = resolve_trace(trace)
    curves = load_trace(path)
    if workload is None:
        # load_trace sorts its curves: read the first row again for the file's own order
        with path.open(newline="", encoding="utf-8") as f:
            first = next(csv.DictReader(f))
        workload = f"{first['dataset']}/{first['network']}"
    if batch_size is None:
        named = [c for c in curves if workload in (c.workload, c.dataset, c.network)]
        # the largest batch size of two workloads that share a name would pick one silently
        if len({c.workload for c in named}) != 1:
            what = "is ambiguous" if named else "is not in the trace"
            raise LookupError(
                f"workload {workload!r} {what}; choose one of: "
                + ", ".join(sorted({c.workload for c in named or curves}))
            )
        batch_size = max(c.batch_size for c in named)
    return workload, batch_size


@dataclass(frozen=True, slots=True)
class ReplayNoise:
    """How noisy a replayed GPU is. Coefficients of variation (standard deviation / mean).

    Attributes:
        step_time_cv: Of one training step's duration (measured Zeus A40 windows suggest 3-5 %).
        power_cv: Of the power actually drawn during one step; the energy counter integrates it.
        sensor_cv: Of an instant power reading on top of that (NVML's sensor); the 1 s average
            reading has a tenth of the variance.
    """

    step_time_cv: float = 0.04
    power_cv: float = 0.03
    sensor_cv: float = 0.02

    @classmethod
    def off(cls) -> ReplayNoise:
        """No noise at all: every reading is the trace's value."""
        return cls(0.0, 0.0, 0.0)


_MASK64: Final = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class _StepNoise:
    """Two independent random walks over a job's step indices (step time, power): the sums of
    independent standard normal per-step noises, ``W(0) = 0``.

    Built lazily by midpoint refinement (a Brownian bridge on a dyadic grid over ``SPAN``
    steps), with every midpoint's draw a hash of its interval, so ``W(b) - W(a)``, the noise of
    steps ``a..b-1``, is the same however the steps were cut into runs: it is Normal(0, b - a),
    and runs that split a range add up to the range's noise. A query descends from the deepest
    interval of the previous one that still holds the step, so queries in step order cost a few
    hashes each.
    """

    SPAN: Final = 1 << 40

    def __init__(self, seed: int) -> None:
        self._seed = seed & _MASK64
        top = self._normals(0, self.SPAN)
        scale = math.sqrt(self.SPAN)
        #: The last descent: each level's interval and the walks at its ends.
        self._path: list[tuple[int, int, tuple[float, float], tuple[float, float]]] = [
            (0, self.SPAN, (0.0, 0.0), (top[0] * scale, top[1] * scale))
        ]

    def _normals(self, lo: int, hi: int) -> tuple[float, float]:
        """Two standard normals that belong to the interval ``lo..hi`` (Box-Muller)."""
        h = _mix64(self._seed ^ _mix64(lo * 0x100000001B3 ^ hi))
        u1 = ((h >> 11) + 0.5) / (1 << 53)
        u2 = ((_mix64(h) >> 11) + 0.5) / (1 << 53)
        r = math.sqrt(-2.0 * math.log(u1))
        return r * math.cos(2.0 * math.pi * u2), r * math.sin(2.0 * math.pi * u2)

    def at(self, step: int) -> tuple[float, float]:
        """``W(step)`` of both walks."""
        if not 0 <= step <= self.SPAN:
            raise ValueError(f"step {step} is outside 0..{self.SPAN}")
        path = self._path
        while not path[-1][0] <= step <= path[-1][1]:
            path.pop()
        lo, hi, w_lo, w_hi = path[-1]
        while step not in (lo, hi):
            mid = (lo + hi) // 2
            z = self._normals(lo, hi)
            sd = math.sqrt((hi - lo) / 4.0)
            w_mid = ((w_lo[0] + w_hi[0]) / 2.0 + sd * z[0], (w_lo[1] + w_hi[1]) / 2.0 + sd * z[1])
            if step < mid:
                hi, w_hi = mid, w_mid
            else:
                lo, w_lo = mid, w_mid
            path.append((lo, hi, w_lo, w_hi))
        return w_lo if step == lo else w_hi


@dataclass(slots=True)
class _Device:
    info: GpuInfo
    rng: random.Random
    noise: _StepNoise
    limit_mw: int
    clock_lock_mhz: tuple[int, int] | None = None
    energy_mj: float = 0.0
    integrated_to_s: float = 0.0
    #: Power drawn now (W), the trace's value times the current run's fluctuation.
    drawn_w: float = 0.0
    fluctuation: float = 1.0
    steps_run: int = 0


class ReplayBackend:
    """GPUs that replay one (workload, batch size) curve of a measured power trace.

    Every GPU plays the same curve (a data-parallel job) with its own noise. The power limit range
    is the trace file's (its lowest and highest measured limit); the default limit is the highest.

    Clocks are emulated, as the traces have no clock data: a locked top clock at share ``s`` of the
    nominal clock range caps the operating point as the power limit at share ``s`` of the limit
    range would, and the clock read back maps the same way. That keeps clock locking usable on
    replayed traces (the optimiser can search clocks on them); it is not a calibrated clock model.

    Args:
        trace: A bundled trace name (``a40``, any case) or a trace file (see ``load_trace`` and
            ``telemetry.backends.traces.resolve_trace``).
        workload: ``dataset/network`` (or a ``dataset`` or ``network`` name that is unique).
        batch_size: Batch size of the curve to play; with ``micro_batch``, the job's global
            batch (samples per optimizer step), which the trace need not have measured.
        micro_batch: Samples per micro-batch (gradient accumulation over ``batch_size /
            micro_batch`` of them; see the module's doc), a measured batch size that divides
            ``batch_size``; default ``batch_size`` (no accumulation). ``set_micro_batch``
            changes it.
        gpus: Number of GPUs.
        clock: Time source (default: the wall clock). With a ``VirtualClock``, ``run_steps``
            moves it.
        seed: Seed of the noise; the same seed replays the same noise.
        optimizer: The trace's optimizer column, when a workload has several.
        samples_per_epoch: Samples per epoch (default: ``TRAINING_SET_SAMPLES`` or 100,000).
        noise: Noise levels (``ReplayNoise.off()`` for exact traces).
        gpu_name: GPU name (default: from the file name).

    Raises:
        LookupError: Unknown trace name or missing file, or no single curve of that workload
            and batch size (the message lists the choices).
        ValueError: The file is not a power trace, or ``gpus`` is below 1.
    """

    name = "replay"

    def __init__(
        self,
        trace: str | os.PathLike[str],
        workload: str,
        batch_size: int,
        *,
        gpus: int = 1,
        clock: Clock | None = None,
        seed: int = 0,
        optimizer: str | None = None,
        samples_per_epoch: int | None = None,
        noise: ReplayNoise | None = None,
        gpu_name: str | None = None,
        micro_batch: int | None = None,
    ) -> None:
        if gpus < 1:
            raise ValueError(f"a replay backend needs at least one GPU, got {gpus}")
        self._path = resolve_trace(trace)
        self._curves = load_trace(self._path, gpu_name)
        self._samples_per_epoch = samples_per_epoch
        self._clock: Clock = clock if clock is not None else WallClock()
        self._noise = noise if noise is not None else ReplayNoise()
        self._lock = threading.RLock()
        #: Samples per optimizer step, and per micro-batch (the curve played).
        self.global_batch = batch_size
        self.micro_batch = batch_size if micro_batch is None else micro_batch
        if self.micro_batch < 1 or batch_size % self.micro_batch:
            raise ValueError(f"micro-batch {self.micro_batch} does not divide the global batch "
                             f"{batch_size}")
        self.curve = _pick_curve(self._curves, workload, self.micro_batch, optimizer)
        # One noise stream per (seed, job): jobs of different workloads are different runs,
        # and do not share one draw of noise; a job keeps its stream across micro-batches.
        c = self.curve
        self._seed = int.from_bytes(hashlib.sha256(
            f"{seed}|{self._path.name}|{c.gpu}|{c.workload}|{batch_size}|{c.optimizer}".encode()
        ).digest()[:8], "big")
        self.steps_per_epoch = steps_per_epoch(
            self.curve.dataset, batch_size, samples_per_epoch
        )
        self._epochs_per_step = self._step_share()
        min_w = min(c.limits_w[0] for c in self._curves)
        max_w = max(c.limits_w[-1] for c in self._curves)
        gpu = self.curve.gpu
        now = self._clock.now()
        self._devices: list[_Device] = []
        for i in range(gpus):
            digest = hashlib.sha256(
                f"{self._path.name}|{gpu}|{workload}|{batch_size}|{i}".encode()
            ).digest()
            info = GpuInfo(
                index=i,
                uuid=f"GPU-{uuid.UUID(bytes=digest[:16])}",
                name=f"{gpu} (replay)",
                min_limit_mw=round(w_to_mw(min_w)),
                max_limit_mw=round(w_to_mw(max_w)),
                default_limit_mw=round(w_to_mw(max_w)),
                min_sm_clock_mhz=NOMINAL_SM_CLOCK_RANGE_MHZ[0],
                max_sm_clock_mhz=NOMINAL_SM_CLOCK_RANGE_MHZ[1],
                memory_total_bytes=None,
                has_energy_counter=True,
            )
            dev = _Device(
                info=info,
                rng=random.Random(f"{self._seed}|{i}"),
                noise=_StepNoise(_mix64(self._seed ^ _mix64(i))),
                limit_mw=round(w_to_mw(max_w)),
                integrated_to_s=now,
            )
            dev.drawn_w = self._operating_point(dev)[1]
            self._devices.append(dev)
        # Every setting works on a replayed GPU (clocks emulated); the traces carry no clock
        # grid and no idle power, so those stay unknown.
        self._capabilities = BackendCapabilities(
            simulated=True,
            settings_need_privilege=False,
            gpus=tuple(
                capabilities_from_info(d.info, can_set_power_limit=True, can_lock_clocks=True)
                for d in self._devices
            ),
        )

    # -- the GpuBackend protocol -----------------------------------------------------------------

    def devices(self) -> list[GpuInfo]:
        """Every replayed GPU, in index order."""
        return [d.info for d in self._devices]

    def capabilities(self) -> BackendCapabilities:
        """Everything but a known clock grid and idle power (fixed at open)."""
        return self._capabilities

    def read(self, index: int) -> GpuReading:
        """Read one GPU now: the trace's power under the current cap, with sensor noise."""
        with self._lock:
            dev = self._device(index)
            self._integrate(dev)
            eff_w, binding = self._effective_cap(dev)
            _, trace_w = self.curve.at(eff_w)
            cv = self._noise.sensor_cv
            instant_w = dev.drawn_w * max(0.0, 1.0 + cv * dev.rng.gauss(0.0, 1.0))
            avg_w = trace_w * max(0.0, 1.0 + (cv / math.sqrt(10)) * dev.rng.gauss(0.0, 1.0))
            return GpuReading(
                index=index,
                sampled_at=to_datetime(self._clock.now()),
                power_mw=round(w_to_mw(instant_w)),
                power_avg_mw=round(w_to_mw(avg_w)),
                energy_mj=int(dev.energy_mj),
                sm_clock_mhz=self._sm_clock_mhz(dev, eff_w),
                mem_clock_mhz=_NOMINAL_MEM_CLOCK_MHZ,
                gpu_util_pct=100,
                mem_util_pct=0,
                temperature_c=round(_AMBIENT_C + _C_PER_W * trace_w),
                memory_used_bytes=0,
                power_limit_mw=dev.limit_mw,
                throttle_reasons=int(binding),
            )

    def set_power_limit(self, index: int, limit_mw: int) -> None:
        """Set the power limit; the operating point moves to the trace's at that limit.

        Raises:
            InvalidSettingError: Outside the trace's limit range (the message names it).
        """
        with self._lock:
            dev = self._device(index)
            lo, hi = dev.info.min_limit_mw, dev.info.max_limit_mw
            assert lo is not None and hi is not None
            if not lo <= limit_mw <= hi:
                raise InvalidSettingError(
                    f"GPU {index}: power limit {limit_mw} mW is outside the allowed range "
                    f"{lo}..{hi} mW"
                )
            self._integrate(dev)
            dev.limit_mw = int(limit_mw)
            dev.drawn_w = self._operating_point(dev)[1] * dev.fluctuation

    def reset_power_limit(self, index: int) -> None:
        """Put the power limit back to the default (the trace's highest limit)."""
        dev = self._device(index)
        assert dev.info.default_limit_mw is not None
        self.set_power_limit(index, dev.info.default_limit_mw)

    def lock_sm_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        """Lock SM clocks (emulated: ``max_mhz`` caps the operating point, see the class doc).

        Raises:
            InvalidSettingError: ``min_mhz > max_mhz`` or outside the nominal clock range.
        """
        lo, hi = NOMINAL_SM_CLOCK_RANGE_MHZ
        if not lo <= min_mhz <= max_mhz <= hi:
            raise InvalidSettingError(
                f"GPU {index}: clock lock {min_mhz}..{max_mhz} MHz is not an ordered range "
                f"inside the supported range {lo}..{hi} MHz"
            )
        with self._lock:
            dev = self._device(index)
            self._integrate(dev)
            dev.clock_lock_mhz = (int(min_mhz), int(max_mhz))
            dev.drawn_w = self._operating_point(dev)[1] * dev.fluctuation

    def reset_sm_clocks(self, index: int) -> None:
        """Undo ``lock_sm_clocks``."""
        with self._lock:
            dev = self._device(index)
            self._integrate(dev)
            dev.clock_lock_mhz = None
            dev.drawn_w = self._operating_point(dev)[1] * dev.fluctuation

    def close(self) -> None:
        """Nothing to release: the trace was read at construction."""

    # -- driving a replayed job --------------------------------------------------------------------

    def epoch_time_s(self, index: int = 0) -> float:
        """Seconds per epoch at the current setting and micro-batch, without noise (the trace's
        value)."""
        with self._lock:
            return self._operating_point(self._device(index))[0]

    def step_time_s(self, index: int = 0) -> float:
        """Seconds per training (optimizer) step at the current setting, without noise."""
        with self._lock:
            return self.epoch_time_s(index) * self._epochs_per_step

    def micro_batches(self) -> tuple[int, ...]:
        """The micro-batches this job can use (``micro_batches_of``), ascending."""
        c = self.curve
        return micro_batches_of(self._curves, c.workload, self.global_batch, c.optimizer)

    def set_micro_batch(self, micro_batch: int) -> None:
        """Train in micro-batches of ``micro_batch`` from the next step on (the global batch
        stays; the operating point moves to that batch size's curve).

        Raises:
            InvalidSettingError: Not one of ``micro_batches()`` (the message lists them).
        """
        allowed = self.micro_batches()
        if micro_batch not in allowed:
            raise InvalidSettingError(
                f"micro-batch {micro_batch} is not one of {', '.join(map(str, allowed))} "
                f"(measured batch sizes that divide the global batch {self.global_batch})"
            )
        with self._lock:
            c = self.curve
            curve = _pick_curve(self._curves, c.workload, micro_batch, c.optimizer)
            for dev in self._devices:
                self._integrate(dev)
            self.curve, self.micro_batch = curve, micro_batch
            self._epochs_per_step = self._step_share()
            for dev in self._devices:
                dev.drawn_w = self._operating_point(dev)[1] * dev.fluctuation

    def power_w(self, index: int = 0) -> float:
        """Average power (W) at the current setting, without noise (the trace's value)."""
        with self._lock:
            return self._operating_point(self._device(index))[1]

    def run_steps(self, steps: int) -> float:
        """Run ``steps`` training steps on every GPU at the current settings.

        Draws the steps' duration (each GPU's own noise; a synchronous data-parallel job waits for
        the slowest) and the power drawn meanwhile, then sleeps the clock for that long (a
        ``VirtualClock`` moves at once), so the energy counters accrue that power.

        Every step has its own noise, a function of the seed, the GPU and the step's index alone
        (``_StepNoise``), and a run's noise is the mean of its steps': two jobs replayed with the
        same seed see the same noise on the same steps, whatever settings they chose and however
        they cut the steps into runs (common random numbers, so comparisons of policies are not
        drowned in noise). A step's time and power are multiplied by their noise, so a step run
        at the same setting in two jobs takes the same time and energy.

        Args:
            steps: Number of steps, at least 1.

        Returns:
            Seconds the steps took.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        with self._lock:
            duration_s = 0.0
            for dev in self._devices:
                self._integrate(dev)
                epoch_s, power_w = self._operating_point(dev)
                step_s = epoch_s * self._epochs_per_step
                # The mean of n steps' noises, each of spread cv: spread cv / sqrt(n).
                t0, p0 = dev.noise.at(dev.steps_run)
                t1, p1 = dev.noise.at(dev.steps_run + steps)
                t_jitter = self._noise.step_time_cv * (t1 - t0) / steps
                p_jitter = self._noise.power_cv * (p1 - p0) / steps
                dev.fluctuation = max(0.05, 1.0 + p_jitter)
                dev.drawn_w = power_w * dev.fluctuation
                dev.steps_run += steps
                duration_s = max(duration_s, steps * step_s * max(0.05, 1.0 + t_jitter))
        self._clock.sleep(duration_s)
        return duration_s

    def power_limit_mw(self, index: int = 0) -> int:
        """The power limit in force (mW), as ``read(index).power_limit_mw`` without noise draws."""
        with self._lock:
            return self._device(index).limit_mw

    def energy_mj(self, index: int = 0) -> int:
        """The energy counter alone (mJ), as ``read(index).energy_mj`` without the other fields."""
        with self._lock:
            dev = self._device(index)
            self._integrate(dev)
            return int(dev.energy_mj)

    def play(self, workload: str, batch_size: int, optimizer: str | None = None) -> None:
        """Switch every GPU to another curve of the same trace file (a new phase of the job).

        Settings stay as they are; the operating point moves to the new curve's.
        """
        with self._lock:
            curve = _pick_curve(self._curves, workload, batch_size, optimizer)
            for dev in self._devices:
                self._integrate(dev)
            self.curve = curve
            self.global_batch = self.micro_batch = batch_size
            self.steps_per_epoch = steps_per_epoch(
                curve.dataset, curve.batch_size, self._samples_per_epoch
            )
            self._epochs_per_step = self._step_share()
            for dev in self._devices:
                dev.drawn_w = self._operating_point(dev)[1] * dev.fluctuation

    # -- internals -----------------------------------------------------------------------------

    def _step_share(self) -> float:
        """Epochs of the played curve per optimizer step: ``G / m`` iterations of a batch of
        ``m``, each ``1 / steps_per_epoch(m)`` of an epoch (``1 / steps_per_epoch`` without
        accumulation, as before micro-batches)."""
        if self.micro_batch == self.global_batch:
            return 1.0 / self.steps_per_epoch
        iterations = steps_per_epoch(self.curve.dataset, self.micro_batch, self._samples_per_epoch)
        return (self.global_batch // self.micro_batch) / iterations

    def _device(self, index: int) -> _Device:
        if not 0 <= index < len(self._devices):
            raise GpuNotFoundError(
                f"no GPU {index}: this replay backend has GPUs 0..{len(self._devices) - 1}"
            )
        return self._devices[index]

    def _integrate(self, dev: _Device) -> None:
        """Add the energy drawn since the last call to the counter."""
        now = self._clock.now()
        dt = now - dev.integrated_to_s
        if dt > 0:
            dev.energy_mj += j_to_mj(dev.drawn_w * dt)
        dev.integrated_to_s = max(now, dev.integrated_to_s)

    def _clock_cap_w(self, dev: _Device) -> float | None:
        """The power cap (W) a clock lock acts as, or None when clocks are free.

        A locked top clock at share ``s`` of the nominal clock range acts as the power limit at
        share ``s`` of the limit range.
        """
        if dev.clock_lock_mhz is None:
            return None
        lo, hi = NOMINAL_SM_CLOCK_RANGE_MHZ
        share = (dev.clock_lock_mhz[1] - lo) / (hi - lo)
        min_mw, max_mw = dev.info.min_limit_mw, dev.info.max_limit_mw
        assert min_mw is not None and max_mw is not None
        return mw_to_w(min_mw + share * (max_mw - min_mw))

    def _effective_cap(self, dev: _Device) -> tuple[float, ThrottleReason]:
        """The cap in force (W) and the throttle reason that reports it."""
        limit_w = mw_to_w(dev.limit_mw)
        clock_w = self._clock_cap_w(dev)
        if clock_w is not None and clock_w < limit_w:
            return clock_w, ThrottleReason.APPLICATIONS_CLOCKS_SETTING
        return limit_w, (
            ThrottleReason.SW_POWER_CAP if self._limit_binds(limit_w) else ThrottleReason.NONE
        )

    def _limit_binds(self, limit_w: float) -> bool:
        """A limit binds when the power drawn under it comes near it and fell clearly below the
        power drawn under the highest limit (the traces' averages sit 3-15 % under a cap)."""
        drawn = self.curve.at(limit_w)[1]
        return drawn >= _NEAR_CAP * limit_w and drawn < _BELOW_TOP * self.curve.average_power_w[-1]

    def _operating_point(self, dev: _Device) -> tuple[float, float]:
        """Seconds per epoch and power (W) under the cap in force, from the trace."""
        cap_w, _ = self._effective_cap(dev)
        return self.curve.at(cap_w)

    def _sm_clock_mhz(self, dev: _Device, cap_w: float) -> int:
        """Emulated SM clock: the locked top clock, else the top clock unless the power limit
        binds, then the clock at the limit's position of the range (see ``_clock_cap_w``)."""
        lo, hi = NOMINAL_SM_CLOCK_RANGE_MHZ
        if dev.clock_lock_mhz is not None and self._clock_cap_w(dev) == cap_w:
            return dev.clock_lock_mhz[1]
        if not self._limit_binds(cap_w):
            return hi
        min_mw, max_mw = dev.info.min_limit_mw, dev.info.max_limit_mw
        assert min_mw is not None and max_mw is not None
        share = (w_to_mw(cap_w) - min_mw) / max(1.0, max_mw - min_mw)
        return round(lo + min(1.0, max(0.0, share)) * (hi - lo))
