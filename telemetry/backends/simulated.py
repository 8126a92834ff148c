"""The simulated GPU backend: the power/clock model behind the ``GpuBackend`` protocol.

Each GPU runs a settable workload (or sits idle) under a power limit and optional clock locks;
``energy.gpu_model`` gives its clock and power. True power is piecewise constant between events
(a workload, limit or lock change; a limit takes effect ``LIMIT_RESPONSE_S`` after it is set), so
energy and temperature are integrated analytically and are exact with respect to time.

Sensors behave like NVML's: values update every ``SENSOR_PERIOD_S``; instant power carries a few
percent of noise that depends only on (seed, GPU, 100 ms window), so two processes reading the same
window agree; the 1 s average is the exact mean of true power over the last second; the energy
counter (mJ) is the exact integral since the GPU's counter origin.

Like a real node, the simulated GPUs outlive the process: settings, workloads, faults and energy
counters live in a small JSON state file, rewritten atomically (temporary file and rename, under an
``fcntl`` lock) on every change. Energy keeps accruing while no process runs, and another process
can change the state (set a workload, inject a fault): the backend notices by a cheap ``stat``
at most every ``STATE_CHECK_S``.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from energy.gpu_model import (
    GpuModel,
    at_micro_batch,
    operating_point,
    step_slowdown,
    supported_clocks_mhz,
)
from energy.optimizer import Knob
from energy.units import j_to_mj, mw_to_w, w_to_mw
from telemetry.backends.base import (
    READING_FIELDS,
    BackendCapabilities,
    GpuCapabilities,
    GpuInfo,
    GpuLostError,
    GpuNotFoundError,
    GpuPermissionError,
    GpuProcess,
    GpuReading,
    InvalidSettingError,
    NotSupportedError,
    ThrottleReason,
    capabilities_from_info,
)
from telemetry.backends.profiles import (
    SkuProfile,
    Workload,
    get_sku,
    get_workload,
    workload_to_json,
)
from telemetry.clock import Clock, WallClock, to_datetime

__all__ = [
    "FAULT_FIELDS",
    "LIMIT_RESPONSE_S",
    "NOISE_FRACTION",
    "SENSOR_PERIOD_S",
    "STATE_CHECK_S",
    "FaultKind",
    "SimulatedBackend",
]

_log = logging.getLogger(__name__)

#: How often sensor values change, s (NVML's power and energy update about every 100 ms).
SENSOR_PERIOD_S: Final = 0.1
#: Window of the averaged power (``power.draw.average``), s.
POWER_AVG_WINDOW_S: Final = 1.0
#: Delay between setting a power limit and the power responding, s.
LIMIT_RESPONSE_S: Final = 0.05
#: Instant power noise: uniform within ±this share of true power.
NOISE_FRACTION: Final = 0.03
#: The state file is checked for changes by other processes at most this often, s.
STATE_CHECK_S: Final = 0.25
#: Power history kept for the 1 s average, s.
_HISTORY_S: Final = 2.0 * POWER_AVG_WINDOW_S
_IDLE_MEMORY_BYTES: Final = 4 * 1024 * 1024
_STATE_FORMAT: Final = 1

#: Fields of ``GpuReading`` a ``NOT_SUPPORTED`` fault can turn off: every measured value, and
#: the processes.
FAULT_FIELDS: Final = (*READING_FIELDS, "processes")


class FaultKind(enum.StrEnum):
    """Faults ``SimulatedBackend.inject_fault`` can put on a GPU.

    - ``GPU_LOST``: every call on the GPU raises ``GpuLostError`` (``NVML_ERROR_GPU_IS_LOST``).
    - ``NOT_SUPPORTED``: the named reading fields read ``None`` (``processes`` reads ``()``);
      naming ``power_limit_mw`` / ``sm_clock_mhz`` also makes the power-limit / clock setters
      raise ``NotSupportedError``.
    - ``PERMISSION_DENIED``: setters raise ``GpuPermissionError`` (``NVML_ERROR_NO_PERMISSION``).
    - ``SLOW``: every call on the GPU first takes ``seconds`` (``clock.sleep``).
    """

    GPU_LOST = "gpu_lost"
    NOT_SUPPORTED = "not_supported"
    PERMISSION_DENIED = "permission_denied"
    SLOW = "slow"


class _Segment:
    """A stretch of constant true power starting at ``t0`` (everything a reading needs)."""

    __slots__ = (
        "clock_mhz",
        "e0_j",
        "gpu_util_pct",
        "mem_clock_mhz",
        "mem_util_pct",
        "memory_used_bytes",
        "power_w",
        "reasons",
        "t0",
        "temp0_c",
        "temp_ss_c",
    )

    def __init__(
        self,
        t0: float,
        e0_j: float,
        temp0_c: float,
        power_w: float,
        clock_mhz: float,
        mem_clock_mhz: int,
        reasons: int,
        gpu_util_pct: int,
        mem_util_pct: int,
        memory_used_bytes: int,
        temp_ss_c: float,
    ) -> None:
        self.t0 = t0
        self.e0_j = e0_j
        self.temp0_c = temp0_c
        self.power_w = power_w
        self.clock_mhz = clock_mhz
        self.mem_clock_mhz = mem_clock_mhz
        self.reasons = reasons
        self.gpu_util_pct = gpu_util_pct
        self.mem_util_pct = mem_util_pct
        self.memory_used_bytes = memory_used_bytes
        self.temp_ss_c = temp_ss_c

    def to_json(self) -> list[float | int]:
        return [
            self.t0,
            self.e0_j,
            self.temp0_c,
            self.power_w,
            self.clock_mhz,
            self.mem_clock_mhz,
            self.reasons,
            self.gpu_util_pct,
            self.mem_util_pct,
            self.memory_used_bytes,
            self.temp_ss_c,
        ]

    @classmethod
    def from_json(cls, raw: Sequence[Any]) -> _Segment:
        return cls(
            float(raw[0]),
            float(raw[1]),
            float(raw[2]),
            float(raw[3]),
            float(raw[4]),
            int(raw[5]),
            int(raw[6]),
            int(raw[7]),
            int(raw[8]),
            int(raw[9]),
            float(raw[10]),
        )


@dataclass(slots=True)
class _GpuState:
    """One GPU's settings and power timeline (what the state file holds)."""

    origin_s: float
    limit_mw: int
    applied_limit_mw: int
    lock: tuple[int, int] | None = None
    workload: Workload | None = None
    pids: tuple[int, ...] = ()
    # Share of time the workload is busy (paced jobs); the rest of the time the GPU idles.
    duty: float = 1.0
    # Micro-batch as a multiple of the workload's own (global batch unchanged; energy.gpu_model).
    micro_batch_scale: float = 1.0
    faults: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Limits set but not yet in force: (effective time s, limit mW), in time order.
    pending: list[tuple[float, int]] = field(default_factory=list)
    # Power history (last ``_HISTORY_S``), the segment in force and segments scheduled ahead.
    segments: list[_Segment] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "origin_s": self.origin_s,
            "limit_mw": self.limit_mw,
            "applied_limit_mw": self.applied_limit_mw,
            "lock": list(self.lock) if self.lock else None,
            "workload": (
                None
                if self.workload is None
                else {"name": self.workload.name, **workload_to_json(self.workload)}
            ),
            "pids": list(self.pids),
            "duty": self.duty,
            "micro_batch_scale": self.micro_batch_scale,
            "faults": self.faults,
            "pending": [list(p) for p in self.pending],
            "segments": [s.to_json() for s in self.segments],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> _GpuState:
        wl = raw.get("workload")
        workload = None
        if wl is not None:
            wl = dict(wl)
            workload = Workload(
                name=str(wl.pop("name")),
                **{k: v for k, v in wl.items() if k in Workload.__dataclass_fields__},
            )
        lock = raw.get("lock")
        scale = float(raw.get("micro_batch_scale", 1.0))
        if not (math.isfinite(scale) and scale > 0.0):
            raise ValueError(f"bad micro_batch_scale {scale!r}")
        return cls(
            origin_s=float(raw["origin_s"]),
            limit_mw=int(raw["limit_mw"]),
            applied_limit_mw=int(raw["applied_limit_mw"]),
            lock=(int(lock[0]), int(lock[1])) if lock else None,
            workload=workload,
            pids=tuple(int(p) for p in raw.get("pids", ())),
            duty=float(raw.get("duty", 1.0)),
            micro_batch_scale=scale,
            faults={str(k): dict(v) for k, v in raw.get("faults", {}).items()},
            pending=[(float(t), int(mw)) for t, mw in raw.get("pending", ())],
            segments=[_Segment.from_json(s) for s in raw["segments"]],
        )


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a fast, well-spread 64-bit hash."""
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def saved_node_shape(state_path: Path) -> tuple[int, str] | None:
    """GPU count and SKU of the simulated node saved at ``state_path`` (None: no usable file)."""
    try:
        raw = json.loads(state_path.read_text(encoding="utf-8"))
        return len(raw["gpus"]), str(raw["sku"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class SimulatedBackend:
    """Simulated GPUs of one SKU, on the wall clock or an injected (virtual) clock.

    Args:
        gpus: How many GPUs.
        sku: SKU profile key in ``profiles/skus.json`` (``H100-SXM``, ``A100-SXM``, ``A40``,
            ``V100``, ``P100``).
        clock: Time source; default the wall clock. Tests pass a ``VirtualClock``.
        state_path: The node's state file (``Settings.sim_state_path``); None keeps state in
            memory only. A file written for another SKU is replaced.
        seed: Seeds sensor noise and GPU UUIDs.

    Raises:
        ValueError: Unknown SKU (the message lists the known ones) or ``gpus < 1``.
    """

    name = "simulated"

    def __init__(
        self,
        gpus: int = 4,
        sku: str = "H100-SXM",
        *,
        clock: Clock | None = None,
        state_path: Path | None = None,
        seed: int = 0,
    ) -> None:
        if gpus < 1:
            raise ValueError(f"a simulated node has at least 1 GPU, got {gpus}")
        self._sku: SkuProfile = get_sku(sku)
        self._model: GpuModel = self._sku.model
        self._clock: Clock = clock or WallClock()
        self._path = Path(state_path) if state_path is not None else None
        self._seed = seed
        self._noise_key = _mix64(seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019)
        self._lock = threading.RLock()
        self._n = gpus
        self._file_sig: tuple[int, int, int] | None = None
        self._checked_at = -math.inf
        now = self._clock.now()
        self._gpus: list[_GpuState] = [self._fresh_gpu(now) for _ in range(gpus)]
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with self._file_lock():
                loaded = self._load_file()
                if not loaded:
                    self._write_file()
        self._devices = [self._device_info(i) for i in range(gpus)]
        self._capabilities = BackendCapabilities(
            simulated=True,
            settings_need_privilege=False,
            gpus=tuple(self._gpu_capabilities(info) for info in self._devices),
        )

    # --- the GpuBackend protocol ------------------------------------------------------------

    def devices(self) -> list[GpuInfo]:
        """Every GPU, in index order (built once at start)."""
        return list(self._devices)

    def capabilities(self) -> BackendCapabilities:
        """What the GPUs can do, fixed at open: everything, but for a ``NOT_SUPPORTED`` fault
        present then on ``energy_mj``, ``power_limit_mw`` or ``sm_clock_mhz`` (a fault injected
        later degrades calls, as a failing call on a real GPU does, and changes no capability)."""
        return self._capabilities

    def read(self, index: int) -> GpuReading:
        """Read every field of one GPU now, as NVML would.

        Raises:
            GpuNotFoundError: No GPU with that index.
            GpuLostError: A ``GPU_LOST`` fault is on the GPU.
        """
        now = self._clock.now()
        with self._lock:
            if self._path is not None and not 0.0 <= now - self._checked_at < STATE_CHECK_S:
                self._check_file(now)
            g = self._gpu(index)
            if not g.faults:
                return self._reading(g, index, now)
            faults = dict(g.faults)
        if FaultKind.SLOW in faults:
            self._clock.sleep(float(faults[FaultKind.SLOW].get("seconds", 0.0)))
            now = self._clock.now()
        if FaultKind.GPU_LOST in faults:
            raise GpuLostError(f"simulated GPU {index} is lost (injected fault)")
        with self._lock:
            reading = self._reading(self._gpu(index), index, now)
        off = faults.get(FaultKind.NOT_SUPPORTED, {}).get("fields", ())
        if not off:
            return reading
        cleared: dict[str, Any] = {name: () if name == "processes" else None for name in off}
        return replace(reading, **cleared)

    def set_power_limit(self, index: int, limit_mw: int) -> None:
        """Set the power limit; power responds after ``LIMIT_RESPONSE_S``.

        Raises:
            InvalidSettingError: Outside the SKU's range (the message names it).
            NotSupportedError: The GPU could not set power limits at open (``capabilities``).
            GpuPermissionError / NotSupportedError / GpuLostError: Injected faults.
        """
        self._require(index, Knob.POWER_LIMIT)
        lo, hi = self._limit_range_mw()
        if not lo <= limit_mw <= hi:
            raise InvalidSettingError(
                f"power limit {limit_mw} mW for GPU {index} is outside the allowed range "
                f"{lo}..{hi} mW ({self._sku.name})"
            )
        self._mutate(
            index, lambda g, now: self._apply_limit(g, now, int(limit_mw)), Knob.POWER_LIMIT
        )

    def reset_power_limit(self, index: int) -> None:
        """Put the power limit back to the SKU's default."""
        default_mw = round(w_to_mw(self._sku.default_limit_w))
        self._mutate(
            index, lambda g, now: self._apply_limit(g, now, default_mw), Knob.POWER_LIMIT
        )

    def lock_sm_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        """Lock SM clocks to ``[min_mhz, max_mhz]``: a busy GPU runs at most ``max_mhz``.

        Raises:
            InvalidSettingError: ``min_mhz > max_mhz`` or outside the SKU's clock range.
            NotSupportedError: The GPU could not lock clocks at open (``capabilities``).
        """
        self._require(index, Knob.SM_CLOCKS)
        fmin = round(self._sku.sm_clock_min_mhz)
        fmax = round(self._sku.sm_clock_max_mhz)
        if not fmin <= min_mhz <= max_mhz <= fmax:
            raise InvalidSettingError(
                f"locked clocks {min_mhz}..{max_mhz} MHz for GPU {index}: need min <= max within "
                f"the allowed range {fmin}..{fmax} MHz ({self._sku.name})"
            )

        def apply(g: _GpuState, now: float) -> None:
            g.lock = (int(min_mhz), int(max_mhz))

        self._mutate(index, apply, Knob.SM_CLOCKS)

    def reset_sm_clocks(self, index: int) -> None:
        """Undo ``lock_sm_clocks``."""

        def apply(g: _GpuState, now: float) -> None:
            g.lock = None

        self._mutate(index, apply, Knob.SM_CLOCKS)

    def close(self) -> None:
        """Nothing to release: the state file is written on every change."""

    # --- simulation control -----------------------------------------------------------------

    @property
    def sku(self) -> SkuProfile:
        """The SKU profile the GPUs follow."""
        return self._sku

    def set_workload(
        self,
        index: int,
        workload: Workload | str | None,
        *,
        pids: Iterable[int] = (),
        duty: float = 1.0,
        micro_batch_scale: float = 1.0,
    ) -> None:
        """Run a workload on a GPU (None: idle). A string names a workload in the profiles.

        A paced job keeps its GPU busy only part of the time: with ``duty < 1`` the GPU alternates
        between busy bursts and idle gaps faster than NVML's 1 s averaging window, so the
        simulator draws the time-weighted mean ``duty * P_busy(f) + (1 - duty) * P_idle`` and
        reports utilisation scaled by ``duty``. The power limit and clock locks act on the busy
        bursts' power (the firmware caps instantaneous power), so ``f`` is what they allow the
        busy GPU; the reported SM clock is the busy bursts' clock.

        A job training in micro-batches ``micro_batch_scale`` times the workload's own (same
        global batch) runs the workload's micro-batch term (``energy.gpu_model.at_micro_batch``):
        its activity, hence busy power, is multiplied by ``A(s)``. Its step time is multiplied
        by ``T(s)`` too, but that is the job's to take: a step can be stretched, not shortened,
        so a real loop's compute at its micro-batch is what it is, and a simulated job
        (``bench/simjob.py``) times its steps by ``micro_batch_time_factor``; ``step_slowdown``
        is the clock's alone. Utilisation is reported as the workload's.

        Args:
            index: GPU index.
            workload: A ``Workload``, a name from ``profiles/workloads.json`` (``"training"``,
                ``"A40/imagenet/resnet50/bs256"``), or None for idle.
            pids: Process ids to report as the GPU's compute processes.
            duty: Share of time the workload keeps the GPU busy, 0..1 (1: always busy).
            micro_batch_scale: Micro-batch as a multiple of the workload's own, > 0 (1: its
                own; below 1: more gradient accumulation). Ignored (1.0) when idle.

        Raises:
            GpuNotFoundError: No GPU with that index.
            ValueError: Unknown workload name, ``duty`` outside 0..1, or ``micro_batch_scale``
                not a finite positive number.
        """
        if not 0.0 <= duty <= 1.0:
            raise ValueError(f"duty must be in 0..1 (share of time busy), got {duty}")
        try:
            scale_f = float(micro_batch_scale)
        except (TypeError, ValueError):
            scale_f = math.nan
        if not (math.isfinite(scale_f) and scale_f > 0.0):
            raise ValueError(
                "micro_batch_scale must be a finite positive number (micro-batch as a multiple "
                f"of the workload's own), got {micro_batch_scale!r}"
            )
        wl = get_workload(workload) if isinstance(workload, str) else workload
        pid_tuple = tuple(int(p) for p in pids)
        duty_f = float(duty)

        def apply(g: _GpuState, now: float) -> None:
            g.workload = wl
            g.pids = pid_tuple if wl is not None else ()
            g.duty = duty_f if wl is not None else 1.0
            g.micro_batch_scale = scale_f if wl is not None else 1.0

        self._mutate(index, apply, None)

    def duty(self, index: int) -> float:
        """Share of time the GPU's workload keeps it busy, 0..1 (1.0 when idle or unpaced)."""
        with self._lock:
            self._check_file(self._clock.now())
            return self._gpu(index).duty

    def micro_batch_scale(self, index: int) -> float:
        """Micro-batch of the GPU's workload as a multiple of its own (1.0 when idle)."""
        with self._lock:
            self._check_file(self._clock.now())
            return self._gpu(index).micro_batch_scale

    def workload(self, index: int) -> Workload | None:
        """The workload running on a GPU (None: idle)."""
        with self._lock:
            self._check_file(self._clock.now())
            return self._gpu(index).workload

    def inject_fault(
        self,
        index: int,
        kind: FaultKind | str,
        *,
        fields: Iterable[str] = (),
        seconds: float = 0.0,
    ) -> None:
        """Put a fault on a GPU until ``clear_faults`` (see ``FaultKind``). Persisted.

        Args:
            index: GPU index.
            kind: The fault.
            fields: For ``NOT_SUPPORTED``: the ``GpuReading`` fields that read None.
            seconds: For ``SLOW``: how long each call takes, s.

        Raises:
            ValueError: Unknown kind or field, no fields for ``NOT_SUPPORTED``, or no positive
                ``seconds`` for ``SLOW``.
        """
        fault = FaultKind(kind)
        params: dict[str, Any] = {}
        if fault is FaultKind.NOT_SUPPORTED:
            names = list(dict.fromkeys(fields))
            unknown = [f for f in names if f not in FAULT_FIELDS]
            if unknown or not names:
                raise ValueError(
                    f"NOT_SUPPORTED needs reading fields among {', '.join(FAULT_FIELDS)}; "
                    f"got {names or 'none'}"
                )
            params["fields"] = names
        elif fault is FaultKind.SLOW:
            if not seconds > 0:
                raise ValueError(f"SLOW needs seconds > 0, got {seconds}")
            params["seconds"] = float(seconds)

        def apply(g: _GpuState, now: float) -> None:
            g.faults[fault.value] = params

        self._mutate(index, apply, None, check_faults=False)

    def clear_faults(self, index: int | None = None) -> None:
        """Remove every fault from one GPU, or from all GPUs when ``index`` is None."""

        def apply(g: _GpuState, now: float) -> None:
            g.faults.clear()

        if index is not None:
            self._mutate(index, apply, None, check_faults=False)
            return
        with self._lock, self._file_lock():
            self._check_file(self._clock.now(), force=True)
            for g in self._gpus:
                g.faults.clear()
            self._write_file()

    def true_power_w(self, index: int) -> float:
        """The noiseless power the GPU draws now, W (ground truth for tests)."""
        now = self._clock.now()
        with self._lock:
            self._check_file(now)
            return self._segment_at(self._gpu(index), now).power_w

    def true_energy_mj(self, index: int) -> float:
        """Exact, noiseless energy since the GPU's counter origin, mJ (ground truth for tests)."""
        now = self._clock.now()
        with self._lock:
            self._check_file(now)
            g = self._gpu(index)
            return j_to_mj(max(self._energy_j(g, now), 0.0))

    def true_clock_mhz(self, index: int) -> float:
        """The SM clock the GPU runs now, MHz (unrounded; ground truth for tests)."""
        now = self._clock.now()
        with self._lock:
            self._check_file(now)
            return self._segment_at(self._gpu(index), now).clock_mhz

    def step_slowdown(self, index: int) -> float:
        """``t(f) / t(f_max)`` of the GPU's workload at its current clock: ``c * f_max / f + 1 -
        c`` (1.0 when idle). The micro-batch's ``T(s)`` is not in it (see ``set_workload``)."""
        now = self._clock.now()
        with self._lock:
            self._check_file(now)
            g = self._gpu(index)
            if g.workload is None:
                return 1.0
            clock = self._segment_at(g, now).clock_mhz
            return step_slowdown(self._model, g.workload.model, clock)

    # --- internals: the timeline ------------------------------------------------------------

    def _gpu(self, index: int) -> _GpuState:
        if not 0 <= index < self._n:
            raise GpuNotFoundError(
                f"no simulated GPU {index} (there are {self._n}: 0..{self._n - 1})"
            )
        return self._gpus[index]

    def _require(self, index: int, setter: Knob) -> None:
        """Refuse a setter the GPU's capabilities lack (``setter``: as for ``_mutate``)."""
        self._gpu(index)  # an unknown index is GpuNotFoundError, as on every other call
        caps = self._capabilities.gpus[index]
        limit = setter is Knob.POWER_LIMIT
        capable = caps.can_set_power_limit if limit else caps.can_lock_clocks
        if not capable:
            what = "setting power limits" if limit else "locking SM clocks"
            raise NotSupportedError(
                f"simulated GPU {index} does not support {what} (not supported when opened)"
            )

    def _limit_range_mw(self) -> tuple[int, int]:
        return round(w_to_mw(self._sku.min_limit_w)), round(w_to_mw(self._sku.max_limit_w))

    def _fresh_gpu(self, now: float) -> _GpuState:
        default_mw = round(w_to_mw(self._sku.default_limit_w))
        g = _GpuState(origin_s=now, limit_mw=default_mw, applied_limit_mw=default_mw)
        seg = self._make_segment(g, default_mw, now, 0.0, None)
        g.segments.append(seg)
        return g

    def _make_segment(
        self, g: _GpuState, limit_mw: int, t0: float, e0_j: float, temp0_c: float | None
    ) -> _Segment:
        """The segment of constant power for ``g``'s settings under ``limit_mw`` from ``t0``."""
        sku = self._sku
        wl = g.workload
        if wl is None:
            clock = sku.idle_sm_clock_mhz
            if g.lock is not None:
                clock = min(max(clock, g.lock[0]), g.lock[1])
            power = sku.idle_power_w
            reasons = int(ThrottleReason.GPU_IDLE)
            mem_clock = round(sku.mem_clock_idle_mhz)
            gpu_util = mem_util = 0
            mem_used = _IDLE_MEMORY_BYTES
        else:
            op = operating_point(
                self._model,
                at_micro_batch(wl.model, g.micro_batch_scale),
                mw_to_w(limit_mw),
                locked_max_mhz=None if g.lock is None else float(g.lock[1]),
            )
            clock = op.sm_clock_mhz
            # Bursts at the busy operating point, gaps at idle power (time-weighted mean).
            power = g.duty * op.power_w + (1.0 - g.duty) * sku.idle_power_w
            reasons = ThrottleReason.NONE
            if op.power_capped:
                reasons |= ThrottleReason.SW_POWER_CAP
            if op.clock_capped:
                reasons |= ThrottleReason.APPLICATIONS_CLOCKS_SETTING
            mem_clock = round(sku.mem_clock_mhz)
            gpu_util = round(wl.gpu_util_pct * g.duty)
            mem_util = round(wl.mem_util_pct * g.duty)
            mem_used = max(int(wl.memory_fraction * sku.memory_total_bytes), _IDLE_MEMORY_BYTES)
        temp_ss = sku.ambient_c + sku.thermal_c_per_w * power
        return _Segment(
            t0=t0,
            e0_j=e0_j,
            temp0_c=temp_ss if temp0_c is None else temp0_c,
            power_w=power,
            clock_mhz=clock,
            mem_clock_mhz=mem_clock,
            reasons=int(reasons),
            gpu_util_pct=gpu_util,
            mem_util_pct=mem_util,
            memory_used_bytes=mem_used,
            temp_ss_c=temp_ss,
        )

    def _temperature_c(self, seg: _Segment, t: float) -> float:
        dt = max(t - seg.t0, 0.0)
        tau = self._sku.thermal_time_constant_s
        return seg.temp_ss_c + (seg.temp0_c - seg.temp_ss_c) * math.exp(-dt / tau)

    def _append(self, g: _GpuState, limit_mw: int, t0: float) -> None:
        prev = g.segments[-1]
        e0 = prev.e0_j + prev.power_w * (t0 - prev.t0)
        temp0 = self._temperature_c(prev, t0)
        seg = self._make_segment(g, limit_mw, t0, e0, temp0)
        if t0 <= prev.t0:  # same instant: the new settings replace the old ones
            seg.e0_j, seg.temp0_c = prev.e0_j, prev.temp0_c
            g.segments[-1] = seg
        else:
            g.segments.append(seg)

    def _rebuild(self, g: _GpuState, now: float) -> None:
        """Recompute ``g``'s timeline from ``now`` on, after its settings changed at ``now``."""
        while g.pending and g.pending[0][0] <= now:
            g.applied_limit_mw = g.pending.pop(0)[1]
        while len(g.segments) > 1 and g.segments[-1].t0 > now:
            g.segments.pop()
        self._append(g, g.applied_limit_mw, now)
        for t_eff, limit_mw in g.pending:
            self._append(g, limit_mw, t_eff)
        horizon = now - _HISTORY_S
        while len(g.segments) > 1 and g.segments[1].t0 <= horizon:
            g.segments.pop(0)

    def _apply_limit(self, g: _GpuState, now: float, limit_mw: int) -> None:
        g.limit_mw = limit_mw
        g.pending.append((now + LIMIT_RESPONSE_S, limit_mw))

    def _segment_at(self, g: _GpuState, t: float) -> _Segment:
        segs = g.segments
        i = len(segs) - 1
        while i > 0 and segs[i].t0 > t:
            i -= 1
        return segs[i]

    def _energy_j(self, g: _GpuState, t: float) -> float:
        """True energy since the counter origin at time ``t``, J (extrapolated before history)."""
        seg = self._segment_at(g, t)
        return seg.e0_j + seg.power_w * (t - seg.t0)

    def _noise(self, index: int, window: int) -> float:
        """Deterministic noise in [-1, 1) for (seed, GPU, 100 ms window)."""
        h = _mix64(self._noise_key ^ _mix64(window * 0x100000001B3 + index))
        return (h >> 11) * (2.0 / 9007199254740992.0) - 1.0

    def _reading(self, g: _GpuState, index: int, now: float) -> GpuReading:
        window = math.floor(now / SENSOR_PERIOD_S)
        ts = window * SENSOR_PERIOD_S
        seg = self._segment_at(g, ts)
        energy_j = seg.e0_j + seg.power_w * (ts - seg.t0)
        start = ts - POWER_AVG_WINDOW_S
        first = self._segment_at(g, start)
        avg_w = (energy_j - (first.e0_j + first.power_w * (start - first.t0))) / POWER_AVG_WINDOW_S
        instant_w = seg.power_w * (1.0 + NOISE_FRACTION * self._noise(index, window))
        return GpuReading(
            index=index,
            sampled_at=to_datetime(now),
            power_mw=round(w_to_mw(instant_w)),
            power_avg_mw=round(w_to_mw(avg_w)),
            energy_mj=int(j_to_mj(energy_j)) if energy_j > 0 else 0,
            sm_clock_mhz=round(seg.clock_mhz),
            mem_clock_mhz=seg.mem_clock_mhz,
            gpu_util_pct=seg.gpu_util_pct,
            mem_util_pct=seg.mem_util_pct,
            temperature_c=round(self._temperature_c(seg, ts)),
            memory_used_bytes=seg.memory_used_bytes,
            power_limit_mw=g.limit_mw,
            throttle_reasons=seg.reasons,
            processes=tuple(GpuProcess(pid, None) for pid in g.pids),
        )

    def _device_info(self, index: int) -> GpuInfo:
        sku = self._sku
        digest = hashlib.sha256(f"powertrain-sim:{sku.name}:{self._seed}:{index}".encode()).digest()
        lo, hi = self._limit_range_mw()
        return GpuInfo(
            index=index,
            uuid=f"GPU-{uuid.UUID(bytes=digest[:16], version=4)}",
            name=sku.product_name,
            min_limit_mw=lo,
            max_limit_mw=hi,
            default_limit_mw=round(w_to_mw(sku.default_limit_w)),
            min_sm_clock_mhz=round(sku.sm_clock_min_mhz),
            max_sm_clock_mhz=round(sku.sm_clock_max_mhz),
            memory_total_bytes=sku.memory_total_bytes,
            has_energy_counter="energy_mj"
            not in self._gpus[index].faults.get(FaultKind.NOT_SUPPORTED, {}).get("fields", ()),
        )

    def _gpu_capabilities(self, info: GpuInfo) -> GpuCapabilities:
        off = self._gpus[info.index].faults.get(FaultKind.NOT_SUPPORTED, {}).get("fields", ())
        grid = supported_clocks_mhz(self._model)
        return capabilities_from_info(
            info,
            can_set_power_limit="power_limit_mw" not in off,
            can_lock_clocks="sm_clock_mhz" not in off,
            supported_sm_clocks_mhz=tuple(dict.fromkeys(round(f) for f in grid)),
            sm_clock_step_mhz=self._sku.sm_clock_step_mhz,
            idle_power_mw=round(w_to_mw(self._sku.idle_power_w)),
        )

    # --- internals: changes and the state file ----------------------------------------------

    def _mutate(
        self,
        index: int,
        apply: Callable[[_GpuState, float], None],
        setter: Knob | None,
        *,
        check_faults: bool = True,
    ) -> None:
        """Apply a settings change to one GPU at the current time, and persist it.

        Args:
            index: GPU index.
            apply: ``apply(gpu_state, now)`` changes the settings.
            setter: The setting a GPU-setting call changes (checked against
                injected faults like NVML would), None for simulation control.
            check_faults: Whether injected faults apply (not for fault control itself).
        """
        if check_faults:
            self._raise_faults(index, setter)
        with self._lock, self._file_lock():
            now = self._clock.now()
            self._check_file(now, force=True)
            g = self._gpu(index)
            apply(g, now)
            self._rebuild(g, now)
            self._write_file()

    def _raise_faults(self, index: int, setter: Knob | None) -> None:
        with self._lock:
            self._check_file(self._clock.now())
            faults = dict(self._gpu(index).faults)
        if not faults:
            return
        if FaultKind.SLOW in faults:
            self._clock.sleep(float(faults[FaultKind.SLOW].get("seconds", 0.0)))
        if FaultKind.GPU_LOST in faults:
            raise GpuLostError(f"simulated GPU {index} is lost (injected fault)")
        if setter is None:
            return
        off = faults.get(FaultKind.NOT_SUPPORTED, {}).get("fields", ())
        if (setter is Knob.POWER_LIMIT and "power_limit_mw" in off) or (
            setter is Knob.SM_CLOCKS and "sm_clock_mhz" in off
        ):
            raise NotSupportedError(f"simulated GPU {index} does not support this (injected fault)")
        if FaultKind.PERMISSION_DENIED in faults:
            raise GpuPermissionError(
                f"changing settings of simulated GPU {index} needs root (injected fault)"
            )

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        if self._path is None:
            yield
            return
        lock_path = self._path.with_name(self._path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _stat_sig(self) -> tuple[int, int, int] | None:
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _check_file(self, now: float, *, force: bool = False) -> None:
        """Reload the state file if another process changed it (stat at most every 0.25 s)."""
        if self._path is None:
            return
        if not force and 0.0 <= now - self._checked_at < STATE_CHECK_S:
            return
        self._checked_at = now
        sig = self._stat_sig()
        if sig is not None and sig != self._file_sig:
            self._load_file()

    def _load_file(self) -> bool:
        """Adopt the state file's GPUs. Returns False if there is no usable state file."""
        assert self._path is not None
        sig = self._stat_sig()
        if sig is None:
            return False
        try:
            raw = json.loads(self._path.read_text(encoding="utf-8"))
            if raw.get("format") != _STATE_FORMAT:
                raise ValueError(f"unknown state format {raw.get('format')!r}")
            if raw.get("sku") != self._sku.name:
                self._file_sig = sig
                _log.warning(
                    "simulated GPU state %s is for SKU %s, not %s: starting a fresh node",
                    self._path,
                    raw.get("sku"),
                    self._sku.name,
                )
                return False
            states = [_GpuState.from_json(s) for s in raw["gpus"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            self._file_sig = sig  # do not parse the same bad file again until it changes
            _log.warning(
                "unreadable simulated GPU state %s (%s): starting a fresh node", self._path, exc
            )
            return False
        for i, state in enumerate(states[: self._n]):
            if state.segments:
                self._gpus[i] = state
        self._file_sig = sig
        return True

    def _write_file(self) -> None:
        """Write the whole state atomically (call under the file lock)."""
        if self._path is None:
            return
        doc = {
            "format": _STATE_FORMAT,
            "sku": self._sku.name,
            "gpus": [g.to_json() for g in self._gpus],
        }
        fd, tmp = tempfile.mkstemp(prefix=self._path.name + ".", dir=self._path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, separators=(",", ":"))
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; readers need not be the writer
            os.replace(tmp, self._path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._file_sig = self._stat_sig()
