"""The NVML backend: real NVIDIA GPUs through nvidia-ml-py (``pynvml``).

This is the only module in powertrain that imports ``pynvml``. It probes each GPU's capabilities
once at open and keeps them, so ``read`` makes only the calls the GPU supports; an unsupported read
is ``None`` (logged once per GPU and field), and NVML error codes become the typed errors of
``telemetry.backends.base``, raised ``from`` the NVML error.

The energy counter can be expensive to read: on an H100 and an H200 (driver 580, in a VM) one
``nvmlDeviceGetTotalEnergyConsumption`` call took 3-4 ms of CPU where every other getter took
1-10 µs (docs/gpu-validation.md). ``read`` therefore calls it only as often as its measured cost
allows (at most ``COUNTER_SHARE`` of the sampling thread's time, and at least every
``COUNTER_MAX_PERIOD_S``); in between, ``energy_mj`` is the last counter reading plus the
trapezoid integral of power since, which agreed with the counter within 0.6 % on those GPUs.
Where the call is cheap (microseconds) the counter is read on every sample. Likewise the process
list and memory in use, which change slowly and cost the most of the rest (about 150 and 45 µs a
call under load on the H200), are read at most every ``HOLD_S`` and repeated in between.
"""

from __future__ import annotations

import functools
import logging
import operator
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Final

from telemetry.backends.base import (
    READING_FIELDS,
    BackendCapabilities,
    BackendUnavailableError,
    GpuCapabilities,
    GpuError,
    GpuInfo,
    GpuLostError,
    GpuNotFoundError,
    GpuPermissionError,
    GpuProcess,
    GpuReading,
    GpuTimeoutError,
    InvalidSettingError,
    NotSupportedError,
    ThrottleReason,
    capabilities_from_info,
)
from telemetry.clock import Clock, WallClock, to_datetime

log = logging.getLogger(__name__)

__all__ = ["NvmlBackend", "nvml_available"]

_HINT: Final = (
    "HINT: install or load the NVIDIA driver (it provides libnvidia-ml.so.1; `nvidia-smi` must "
    "work), or run with --backend simulated"
)

#: Every ``ThrottleReason`` bit this project knows; NVML may report newer ones.
_KNOWN_REASONS: Final = int(functools.reduce(operator.or_, ThrottleReason))

#: The reading fields one NVML getter fills together (``nvmlDeviceGetUtilizationRates``).
_UTILIZATION: Final = ("gpu_util_pct", "mem_util_pct")
#: The values ``read`` gathers, each from one NVML getter: the reading's measured values, with
#: ``utilization`` standing for the two it fills, and the processes.
_READ_FIELDS: Final = (
    *(name for name in READING_FIELDS if name not in _UTILIZATION), "utilization", "processes",
)

#: ``c_nvmlValue_t`` member for each ``NVML_VALUE_TYPE_*`` (the values are NVML's ABI).
_VALUE_MEMBER: Final = {
    0: "dVal",
    1: "uiVal",
    2: "ulVal",
    3: "ullVal",
    4: "sllVal",
    5: "siVal",
    6: "usVal",
}

_Getter = Callable[[], Any]

COUNTER_SHARE: Final = 0.0005
"""Most of a sampling thread's time that reading one GPU's energy counter may take."""

COUNTER_MAX_PERIOD_S: Final = 10.0
"""Longest time between two reads of the energy counter, however costly it is."""

HOLD_S: Final = {"processes": 1.0, "memory_used_bytes": 1.0}
"""Fields read at most this often (seconds); samples in between repeat the last value."""


def _import_pynvml() -> Any:
    """The ``pynvml`` module, or ``BackendUnavailableError`` if nvidia-ml-py is not installed."""
    try:
        import pynvml
    except ImportError as err:
        raise BackendUnavailableError(
            "NVML unavailable: the pynvml module (nvidia-ml-py) is not installed. "
            "HINT: pip install nvidia-ml-py, or run with --backend simulated"
        ) from err
    return pynvml


def nvml_available(nvml: Any | None = None) -> tuple[bool, str]:
    """Whether NVML starts and sees at least one GPU; never raises.

    Used by ``--backend auto``. Initialises NVML, counts GPUs and shuts NVML down again.

    Args:
        nvml: The ``pynvml`` module to use (default: import it); tests pass a fake.

    Returns:
        ``(True, "NVIDIA driver <version>, <n> GPU(s)")``, or ``(False, reason)`` where the reason
        says what is missing, e.g. ``"NVML Shared Library Not Found"``.
    """
    if nvml is None:
        try:
            nvml = _import_pynvml()
        except BackendUnavailableError as err:
            return False, str(err)
    try:
        nvml.nvmlInit()
    except Exception as err:  # NVMLError, or OSError from a broken library
        return False, str(err) or type(err).__name__
    try:
        count = int(nvml.nvmlDeviceGetCount())
        try:
            driver = str(nvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = "(version unknown)"
    except Exception as err:
        return False, f"NVML started but could not count GPUs: {err}"
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as err:
            log.debug("nvmlShutdown failed: %s", err)
    if count <= 0:
        return False, f"NVIDIA driver {driver} loaded but it sees no GPUs"
    return True, f"NVIDIA driver {driver}, {count} GPU(s)"


@dataclass(slots=True)
class _Counter:
    """One GPU's energy counter between reads: the last reading and the power integral since.

    ``energy(t)`` is ``anchor_mj + ∫ power`` from the last reading to ``t``; reported values never
    go down (a reading below an extrapolation holds the extrapolated value until the counter
    passes it), except when the counter itself went back (a driver reload resets it).
    """

    at_s: float | None = None
    cost_s: float | None = None
    anchor_mj: int = 0
    since_mj: float = 0.0
    last_s: float = 0.0
    last_mw: float | None = None
    reported_mj: int | None = None

    def period(self, fixed_s: float | None) -> float | None:
        """Seconds between reads: ``fixed_s``, or from the call's cost (``None``: not yet read)."""
        if fixed_s is not None:
            return fixed_s
        return None if self.cost_s is None else min(COUNTER_MAX_PERIOD_S,
                                                    self.cost_s / COUNTER_SHARE)

    def due(self, now_s: float, fixed_s: float | None) -> bool:
        """Whether to read the counter now (always, until it has a reading and power)."""
        period = self.period(fixed_s)
        if self.at_s is None or period is None or self.last_mw is None:
            return True
        return now_s - self.at_s >= period

    def anchor(self, now_s: float, counter_mj: int, cost_s: float, power_mw: float | None) -> int:
        """A fresh counter reading (which took ``cost_s``); returns the value to report."""
        self.cost_s = cost_s if self.cost_s is None else 0.8 * self.cost_s + 0.2 * cost_s
        went_back = counter_mj < self.anchor_mj
        self.at_s, self.anchor_mj, self.since_mj = now_s, counter_mj, 0.0
        self.last_s, self.last_mw = now_s, power_mw
        if self.reported_mj is None or went_back:
            self.reported_mj = counter_mj
        else:
            self.reported_mj = max(self.reported_mj, counter_mj)
        return self.reported_mj

    def extrapolate(self, now_s: float, power_mw: float | None) -> int | None:
        """The counter at ``now_s`` from power since the last reading; ``None`` without power."""
        if power_mw is None or self.last_mw is None or self.reported_mj is None:
            return None
        self.since_mj += (self.last_mw + power_mw) / 2 * (now_s - self.last_s)  # mW·s = mJ
        self.last_s, self.last_mw = now_s, power_mw
        self.reported_mj = max(self.reported_mj, round(self.anchor_mj + self.since_mj))
        return self.reported_mj


@dataclass(slots=True)
class _Device:
    """One GPU: its handle, static facts, and the getters its capabilities allow."""

    index: int
    handle: Any
    info: GpuInfo
    caps: GpuCapabilities
    #: (field, getter) for every field that the probe found supported.
    readers: tuple[tuple[str, _Getter], ...] = ()
    supported_sm_clocks_mhz: tuple[int, ...] = ()
    #: False while the GPU was lost at open: ``read`` probes it again before reading.
    probed: bool = True
    unsupported: set[str] = field(default_factory=set)
    counter: _Counter = field(default_factory=_Counter)
    #: field → (when read, value) for the ``HOLD_S`` fields.
    held: dict[str, tuple[float, Any]] = field(default_factory=dict)


class NvmlBackend:
    """Real GPUs through NVML (the ``GpuBackend`` protocol).

    Opening initialises NVML, takes every GPU's handle once and probes which calls each GPU
    supports (energy counter, instant power field, power limit range, clocks, ...). Reads then
    call only the supported getters; setters validate against the probed ranges first.

    Args:
        nvml: The ``pynvml`` module to use (default: ``import pynvml``); tests inject a fake.
        clock: Source of ``sampled_at`` (default: the wall clock).
        counter_period_s: Read the energy counter at most this often (0: on every read) and
            extrapolate it with power in between; ``None`` (default) sets the period per GPU
            from the call's measured cost (see the module docstring).

    Raises:
        BackendUnavailableError: nvidia-ml-py is missing, or NVML cannot start (no driver, library
            not found, driver/library mismatch); the message carries a hint.
    """

    name = "nvml"

    def __init__(
        self,
        nvml: Any | None = None,
        *,
        clock: Clock | None = None,
        counter_period_s: float | None = None,
    ) -> None:
        self._nvml: Any = nvml if nvml is not None else _import_pynvml()
        self._clock: Clock = clock if clock is not None else WallClock()
        self._counter_period_s = counter_period_s
        self._error: type[Exception] = self._nvml.NVMLError
        n = self._nvml
        self._SUCCESS: int = n.NVML_SUCCESS
        self._LOST: int = n.NVML_ERROR_GPU_IS_LOST
        # Codes that mean "this GPU or driver cannot do that": the field is None from now on.
        self._UNSUPPORTED: frozenset[int] = frozenset(
            {n.NVML_ERROR_NOT_SUPPORTED, n.NVML_ERROR_FUNCTION_NOT_FOUND}
        )
        self._errors: dict[int, type[GpuError]] = {
            n.NVML_ERROR_NOT_SUPPORTED: NotSupportedError,
            n.NVML_ERROR_FUNCTION_NOT_FOUND: NotSupportedError,
            n.NVML_ERROR_NO_PERMISSION: GpuPermissionError,
            n.NVML_ERROR_GPU_IS_LOST: GpuLostError,
            n.NVML_ERROR_TIMEOUT: GpuTimeoutError,
            n.NVML_ERROR_GPU_NOT_FOUND: GpuNotFoundError,
        }
        self._logged: set[tuple[int, str]] = set()
        self._closed = False
        try:
            n.nvmlInit()
        except self._error as err:
            raise BackendUnavailableError(f"NVML cannot start: {err}. {_HINT}") from err
        except OSError as err:
            raise BackendUnavailableError(f"NVML cannot start: {err}. {_HINT}") from err
        try:
            count = int(n.nvmlDeviceGetCount())
        except self._error as err:
            self._shutdown()
            raise BackendUnavailableError(f"NVML started but cannot count GPUs: {err}") from err
        self._devices: list[_Device] = [self._open_device(i) for i in range(count)]

    # -- the protocol -------------------------------------------------------------------------

    def devices(self) -> list[GpuInfo]:
        """Every GPU, in index order, as probed at open (``nvidia-smi --query-gpu=index,uuid,name,
        power.min_limit,power.max_limit,power.default_limit,memory.total``)."""
        return [d.info for d in self._devices]

    def capabilities(self) -> BackendCapabilities:
        """What each GPU can do, as probed at open (a GPU lost then: nothing, until it answers
        again and is probed). A GPU can set power limits when it reports their range, and lock
        clocks when it reports a clock bound; NVML tells no more without a write, and whether
        this process may write is the actuators' probe to find out."""
        return BackendCapabilities(
            simulated=False,
            settings_need_privilege=True,
            gpus=tuple(d.caps for d in self._devices),
        )

    def read(self, index: int) -> GpuReading:
        """Read every supported field of one GPU now; unsupported fields are ``None``.

        Per field, the ``nvidia-smi --query-gpu`` equivalent: ``power.draw.instant`` (field
        ``NVML_FI_DEV_POWER_INSTANT``), ``power.draw.average`` (``nvmlDeviceGetPowerUsage``),
        ``total_energy_consumption`` in mJ (``nvmlDeviceGetTotalEnergyConsumption``, read as
        often as its cost allows and extrapolated with power in between; see the module),
        ``clocks.sm``, ``clocks.mem``, ``utilization.gpu``, ``utilization.memory``,
        ``temperature.gpu``, ``memory.used``, ``enforced.power.limit`` and
        ``clocks_event_reasons.active``; processes as ``--query-compute-apps=pid,used_memory``
        (processes and memory used at most every ``HOLD_S``).

        Raises:
            GpuNotFoundError: No GPU with that index.
            GpuLostError: The GPU fell off the bus; the sampler retries with backoff.
        """
        dev = self._device(index)
        if not dev.probed:
            dev = self._reprobe(index)
        now = self._clock.now()
        values: dict[str, Any] = dict.fromkeys(_READ_FIELDS)
        energy: _Getter | None = None
        for name, getter in dev.readers:
            if name == "energy_mj":
                energy = getter
                continue
            hold = HOLD_S.get(name)
            if hold is not None:
                last = dev.held.get(name)
                if last is not None and now - last[0] < hold:
                    values[name] = last[1]
                    continue
            try:
                values[name] = getter()
            except self._error as err:
                self._read_failed(dev, name, err)
                continue
            if hold is not None:
                dev.held[name] = (now, values[name])
        if energy is not None:
            power = values["power_mw"] if values["power_mw"] is not None else values["power_avg_mw"]
            values["energy_mj"] = self._energy(dev, energy, now, power)
        util = values["utilization"]
        return GpuReading(
            index=index,
            sampled_at=to_datetime(now),
            power_mw=values["power_mw"],
            power_avg_mw=values["power_avg_mw"],
            energy_mj=values["energy_mj"],
            sm_clock_mhz=values["sm_clock_mhz"],
            mem_clock_mhz=values["mem_clock_mhz"],
            gpu_util_pct=None if util is None else util[0],
            mem_util_pct=None if util is None else util[1],
            temperature_c=values["temperature_c"],
            memory_used_bytes=values["memory_used_bytes"],
            power_limit_mw=values["power_limit_mw"],
            throttle_reasons=values["throttle_reasons"],
            processes=values["processes"] or (),
        )

    def set_power_limit(self, index: int, limit_mw: int) -> None:
        """Set the power limit (``nvidia-smi -i <index> -pl``, in mW here); needs root.

        Raises:
            InvalidSettingError: ``limit_mw`` lies outside ``power.min_limit..power.max_limit``.
            GpuPermissionError: Not root / no ``CAP_SYS_ADMIN``.
            NotSupportedError: The GPU has no settable power limit (its range was not probed,
                or NVML says so).
            GpuLostError: The GPU fell off the bus.
        """
        dev = self._settable(index)
        if not dev.caps.can_set_power_limit:
            raise NotSupportedError(
                f"GPU {index}: setting the power limit is not supported (no power limit range "
                "when probed)"
            )
        lo, hi = dev.info.min_limit_mw, dev.info.max_limit_mw
        if not _within(limit_mw, limit_mw, lo, hi):
            raise InvalidSettingError(
                f"GPU {index}: power limit {limit_mw} mW is outside the allowed range "
                f"{_span(lo, hi)} mW"
            )
        self._control(dev, "setting the power limit",
                      self._nvml.nvmlDeviceSetPowerManagementLimit, dev.handle, limit_mw)

    def reset_power_limit(self, index: int) -> None:
        """Put the power limit back to ``power.default_limit`` (``nvidia-smi -pl <default>``).

        Raises:
            NotSupportedError: The default limit could not be probed.
            GpuPermissionError, GpuLostError: As for ``set_power_limit``.
        """
        dev = self._settable(index)
        default = dev.info.default_limit_mw
        if default is None:
            raise NotSupportedError(f"GPU {index}: no default power limit is known to reset to")
        self._control(dev, "resetting the power limit",
                      self._nvml.nvmlDeviceSetPowerManagementLimit, dev.handle, default)

    def lock_sm_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        """Lock SM clocks to ``min_mhz..max_mhz`` (``nvidia-smi -i <index> -lgc min,max``).

        Raises:
            InvalidSettingError: ``min_mhz > max_mhz`` or either lies outside the supported SM
                clock range (the message names it).
            GpuPermissionError: Not root / no ``CAP_SYS_ADMIN``.
            NotSupportedError: The GPU cannot lock clocks (pre-Volta; or no SM clock was
                probed).
            GpuLostError: The GPU fell off the bus.
        """
        dev = self._settable(index)
        if not dev.caps.can_lock_clocks:
            raise NotSupportedError(
                f"GPU {index}: locking SM clocks is not supported (no SM clock range when probed)"
            )
        lo, hi = dev.info.min_sm_clock_mhz, dev.info.max_sm_clock_mhz
        if min_mhz > max_mhz:
            raise InvalidSettingError(
                f"GPU {index}: SM clock lock {min_mhz}..{max_mhz} MHz is empty "
                f"(min above max); allowed range {_span(lo, hi)} MHz"
            )
        if not _within(min_mhz, max_mhz, lo, hi):
            raise InvalidSettingError(
                f"GPU {index}: SM clock lock {min_mhz}..{max_mhz} MHz is outside the allowed "
                f"range {_span(lo, hi)} MHz"
            )
        self._control(dev, "locking SM clocks",
                      self._nvml.nvmlDeviceSetGpuLockedClocks, dev.handle, min_mhz, max_mhz)

    def reset_sm_clocks(self, index: int) -> None:
        """Undo ``lock_sm_clocks`` (``nvidia-smi -i <index> -rgc``).

        Raises:
            GpuPermissionError, NotSupportedError, GpuLostError: As for ``lock_sm_clocks``.
        """
        dev = self._settable(index)
        self._control(dev, "resetting SM clocks",
                      self._nvml.nvmlDeviceResetGpuLockedClocks, dev.handle)

    def close(self) -> None:
        """Shut NVML down (idempotent); the backend cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            self._shutdown()

    # -- extras beyond the protocol -------------------------------------------------------------

    def supported_fields(self, index: int) -> frozenset[str]:
        """The ``GpuReading`` fields this GPU fills (the rest are always ``None``)."""
        dev = self._device(index)
        names: set[str] = set()
        for name, _ in dev.readers:
            names.update(("gpu_util_pct", "mem_util_pct") if name == "utilization" else (name,))
        return frozenset(names)

    def supported_sm_clocks(self, index: int) -> tuple[int, ...]:
        """Supported SM clocks in MHz, highest first (``nvidia-smi -q -d SUPPORTED_CLOCKS``)."""
        return self._device(index).supported_sm_clocks_mhz

    def counter_period(self, index: int) -> float | None:
        """Seconds between reads of this GPU's energy counter now (``None``: not read yet)."""
        return self._device(index).counter.period(self._counter_period_s)

    def _energy(self, dev: _Device, get: _Getter, now: float, power_mw: float | None) -> int | None:
        """The energy counter at ``now``: read when due (or without power), else extrapolated."""
        c = dev.counter
        if power_mw is None or c.due(now, self._counter_period_s):
            t0 = time.perf_counter()
            try:
                counter_mj = int(get())
            except self._error as err:
                self._read_failed(dev, "energy_mj", err)
                return c.extrapolate(now, power_mw)
            return c.anchor(now, counter_mj, time.perf_counter() - t0, power_mw)
        return c.extrapolate(now, power_mw)

    # -- opening and probing --------------------------------------------------------------------

    def _open_device(self, index: int) -> _Device:
        try:
            return self._probe(index)
        except GpuLostError as err:
            log.warning("GPU %d is lost at open (%s); it will be probed again on read",
                        index, err.__cause__ or err)
            info = GpuInfo(index=index, uuid=f"GPU-lost-at-open-{index}", name="unknown (lost)",
                           min_limit_mw=None, max_limit_mw=None, default_limit_mw=None,
                           min_sm_clock_mhz=None, max_sm_clock_mhz=None,
                           memory_total_bytes=None, has_energy_counter=False)
            caps = capabilities_from_info(info, can_set_power_limit=False, can_lock_clocks=False)
            return _Device(index=index, handle=None, info=info, caps=caps, probed=False)

    def _reprobe(self, index: int) -> _Device:
        dev = self._probe(index)  # raises GpuLostError while the GPU stays lost
        self._devices[index] = dev
        return dev

    def _probe(self, index: int) -> _Device:
        """Take the handle, read static facts and find which getters work. Called once per GPU.

        Raises:
            GpuLostError: The GPU is lost.
        """
        n = self._nvml
        try:
            handle = n.nvmlDeviceGetHandleByIndex(index)
        except self._error as err:
            raise self._map(err, index, "getting its handle") from err
        unsupported: set[str] = set()

        def static(what: str, call: Callable[[], Any]) -> Any:
            try:
                return call()
            except self._error as err:
                if getattr(err, "value", None) == self._LOST:
                    raise self._map(err, index, what) from err
                self._log_once(index, what, f"{what} unavailable ({err}); left unknown")
                return None
            except AttributeError:
                self._log_once(index, what, f"{what} unavailable (pynvml lacks it); left unknown")
                return None

        uuid = static("uuid", lambda: _text(n.nvmlDeviceGetUUID(handle)))
        name = static("name", lambda: _text(n.nvmlDeviceGetName(handle)))
        limits = static("power limit range",
                        lambda: n.nvmlDeviceGetPowerManagementLimitConstraints(handle))
        default = static("default power limit",
                         lambda: n.nvmlDeviceGetPowerManagementDefaultLimit(handle))
        memory = static("memory info", lambda: n.nvmlDeviceGetMemoryInfo(handle))
        sm_clocks = static("supported SM clocks", lambda: self._sm_clocks(handle))
        if not sm_clocks:
            max_sm = static("max SM clock",
                            lambda: n.nvmlDeviceGetMaxClockInfo(handle, n.NVML_CLOCK_SM))
            sm_clocks = () if max_sm is None else (int(max_sm),)
            min_sm = None
        else:
            min_sm = sm_clocks[-1]

        readers: list[tuple[str, _Getter]] = []
        for fname, candidates in self._getters(index, handle):
            getter = self._first_working(index, fname, candidates, unsupported)
            if getter is not None:
                readers.append((fname, getter))
        info = GpuInfo(
            index=index,
            uuid=uuid or f"GPU-unknown-{index}",
            name=name or "unknown",
            min_limit_mw=None if limits is None else int(limits[0]),
            max_limit_mw=None if limits is None else int(limits[1]),
            default_limit_mw=None if default is None else int(default),
            min_sm_clock_mhz=min_sm,
            max_sm_clock_mhz=sm_clocks[0] if sm_clocks else None,
            memory_total_bytes=None if memory is None else int(memory.total),
            has_energy_counter="energy_mj" not in unsupported,
        )
        supported = tuple(sm_clocks) if len(sm_clocks) > 1 else ()
        caps = capabilities_from_info(
            info,
            can_set_power_limit=limits is not None,
            can_lock_clocks=bool(sm_clocks),
            supported_sm_clocks_mhz=supported,
            sm_clock_step_mhz=_clock_step(supported),
        )
        return _Device(
            index=index,
            handle=handle,
            info=info,
            caps=caps,
            readers=tuple(readers),
            supported_sm_clocks_mhz=supported,
            unsupported=unsupported,
        )

    def _sm_clocks(self, handle: Any) -> tuple[int, ...]:
        """Supported graphics (= SM) clocks at the highest memory clock, highest first."""
        n = self._nvml
        mem = n.nvmlDeviceGetSupportedMemoryClocks(handle)
        if not mem:
            return ()
        gfx = n.nvmlDeviceGetSupportedGraphicsClocks(handle, max(mem))
        return tuple(sorted({int(c) for c in gfx}, reverse=True))

    def _first_working(
        self, index: int, fname: str, candidates: Sequence[_Getter | None], unsupported: set[str]
    ) -> _Getter | None:
        """The first candidate getter that answers; ``None`` (logged) if none is supported.

        A getter that fails with anything but "not supported" or "lost" is kept: the failure may
        be transient, and ``read`` degrades it to ``None`` if it persists.
        """
        reason = "pynvml lacks the call"
        for getter in candidates:
            if getter is None:
                continue
            try:
                getter()
            except self._error as err:
                code = getattr(err, "value", None)
                if code == self._LOST:
                    raise self._map(err, index, f"probing {fname}") from err
                if code in self._UNSUPPORTED or code == self._nvml.NVML_ERROR_NO_PERMISSION:
                    reason = str(err)
                    continue
                log.warning("GPU %d: probing %s failed (%s); keeping it", index, fname, err)
                return getter
            return getter
        unsupported.add(fname)
        self._log_once(index, fname, f"{fname} not supported ({reason}); stored as NULL")
        return None

    def _getters(
        self, index: int, handle: Any
    ) -> list[tuple[str, list[_Getter | None]]]:
        """For each read field, the NVML getters that can fill it, preferred first.

        A getter is ``None`` where the installed pynvml lacks the call. Each is a closure over the
        handle, so ``read`` looks nothing up.
        """
        n = self._nvml
        error = self._error
        success = self._SUCCESS

        def call(fn_name: str, *args: Any) -> _Getter | None:
            fn = getattr(n, fn_name, None)
            if fn is None:
                return None
            return functools.partial(fn, handle, *args)

        power_instant: _Getter | None = None
        get_fields = getattr(n, "nvmlDeviceGetFieldValues", None)
        field_id = getattr(n, "NVML_FI_DEV_POWER_INSTANT", None)
        if get_fields is not None and field_id is not None:
            ids = [field_id]

            def power_instant() -> int:
                value = get_fields(handle, ids)[0]
                if value.nvmlReturn != success:
                    raise error(value.nvmlReturn)
                return int(getattr(value.value, _VALUE_MEMBER[value.valueType]))

        event_fns = [getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None),
                     getattr(n, "nvmlDeviceGetCurrentClocksThrottleReasons", None)]

        def utilization(get: Callable[[Any], Any]) -> tuple[int, int]:
            u = get(handle)
            return (int(u.gpu), int(u.memory))

        def memory_used(get: Callable[[Any], Any]) -> int:
            return int(get(handle).used)

        def processes(get: Callable[[Any], Any]) -> tuple[GpuProcess, ...]:
            return tuple(GpuProcess(int(p.pid), p.usedGpuMemory) for p in get(handle))

        def wrap(shape: Callable[[Callable[[Any], Any]], Any], fn_name: str) -> _Getter | None:
            fn = getattr(n, fn_name, None)
            return None if fn is None else functools.partial(shape, fn)

        def reasons(fn: Callable[[Any], int] | None) -> _Getter | None:
            if fn is None:
                return None

            def get() -> int:
                raw = int(fn(handle))
                known = raw & _KNOWN_REASONS
                if known != raw:
                    self._log_once(index, "throttle_reasons:unknown",
                                   f"clock event reason bits {raw & ~_KNOWN_REASONS:#x} are not "
                                   "ThrottleReason members; dropped")
                return known
            return get

        temp_v = call("nvmlDeviceGetTemperatureV", n.NVML_TEMPERATURE_GPU)
        temp = call("nvmlDeviceGetTemperature", n.NVML_TEMPERATURE_GPU)
        return [
            ("power_mw", [power_instant]),
            ("power_avg_mw", [call("nvmlDeviceGetPowerUsage")]),
            ("energy_mj", [call("nvmlDeviceGetTotalEnergyConsumption")]),
            ("sm_clock_mhz", [call("nvmlDeviceGetClockInfo", n.NVML_CLOCK_SM)]),
            ("mem_clock_mhz", [call("nvmlDeviceGetClockInfo", n.NVML_CLOCK_MEM)]),
            ("utilization", [wrap(utilization, "nvmlDeviceGetUtilizationRates")]),
            ("temperature_c", [temp_v, temp]),
            ("memory_used_bytes", [wrap(memory_used, "nvmlDeviceGetMemoryInfo")]),
            ("power_limit_mw", [call("nvmlDeviceGetEnforcedPowerLimit"),
                                call("nvmlDeviceGetPowerManagementLimit")]),
            ("throttle_reasons", [reasons(fn) for fn in event_fns]),
            ("processes", [wrap(processes, "nvmlDeviceGetComputeRunningProcesses")]),
        ]

    # -- errors ---------------------------------------------------------------------------------

    def _read_failed(self, dev: _Device, fname: str, err: Exception) -> None:
        """A getter that worked at open failed now: lost raises, the rest degrade to ``None``."""
        code = getattr(err, "value", None)
        if code == self._LOST:
            raise self._map(err, dev.index, f"reading {fname}") from err
        if code in self._UNSUPPORTED:
            dev.readers = tuple(r for r in dev.readers if r[0] != fname)
            dev.unsupported.add(fname)
            self._log_once(dev.index, fname, f"{fname} stopped being supported ({err}); "
                           "stored as NULL from now on")
            return
        key = f"{fname}:{code}"
        if (dev.index, key) in self._logged:
            log.debug("GPU %d: reading %s failed: %s", dev.index, fname, err)
        else:
            self._logged.add((dev.index, key))
            log.warning("GPU %d: reading %s failed (%s); stored as NULL", dev.index, fname, err)

    def _map(self, err: Exception, index: int, what: str, *, setter: bool = False) -> GpuError:
        """The typed error for an NVML error; the caller raises it ``from`` the NVML error."""
        code = getattr(err, "value", None)
        kind = self._errors.get(code, GpuError) if isinstance(code, int) else GpuError
        detail = f"GPU {index}: {what} failed: {err}"
        if setter and code == self._nvml.NVML_ERROR_INVALID_ARGUMENT:
            return InvalidSettingError(f"{detail} (NVML rejected the value)")
        if kind is GpuPermissionError:
            detail += " (needs root or CAP_SYS_ADMIN)"
        elif kind is GpuLostError:
            detail += " (the GPU fell off the bus; check `nvidia-smi` and dmesg for Xid errors)"
        elif kind is GpuError:
            detail += f" (NVML error {code})"
        return kind(detail)

    def _control(self, dev: _Device, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except self._error as err:
            raise self._map(err, dev.index, what, setter=True) from err
        log.info("GPU %d: %s %s: done", dev.index, what, list(args[1:]))

    # -- helpers --------------------------------------------------------------------------------

    def _device(self, index: int) -> _Device:
        if self._closed:
            raise BackendUnavailableError("the NVML backend is closed")
        if not 0 <= index < len(self._devices):
            raise GpuNotFoundError(
                f"no GPU with index {index}: NVML sees {len(self._devices)} GPU(s)"
            )
        return self._devices[index]

    def _settable(self, index: int) -> _Device:
        dev = self._device(index)
        return dev if dev.probed else self._reprobe(index)

    def _log_once(self, index: int, key: str, message: str) -> None:
        if (index, key) not in self._logged:
            self._logged.add((index, key))
            log.info("GPU %d: %s", index, message)

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._error as err:
            log.debug("nvmlShutdown failed: %s", err)


def _text(value: str | bytes) -> str:
    """NVML strings: nvidia-ml-py returns ``str``; some old releases returned ``bytes``."""
    return value.decode() if isinstance(value, bytes) else value


def _clock_step(clocks: Sequence[int]) -> float | None:
    """The typical spacing of supported clocks (the median gap: a list may skip or crowd a few
    near its ends); ``None`` for fewer than two."""
    ordered = sorted(set(clocks))
    if len(ordered) < 2:
        return None
    return float(statistics.median(b - a for a, b in pairwise(ordered)))


def _within(low: int, high: int, lo: int | None, hi: int | None) -> bool:
    """Whether ``low..high`` is positive and inside ``lo..hi``; an unknown bound admits all."""
    return low > 0 and (lo is None or low >= lo) and (hi is None or high <= hi)


def _span(lo: int | None, hi: int | None) -> str:
    """A range for a message; ``?`` marks a bound the probe could not read."""
    return f"{'?' if lo is None else lo}..{'?' if hi is None else hi}"
