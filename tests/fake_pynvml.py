"""A small stand-in for the ``pynvml`` module: the subset ``NvmlBackend`` uses, H100-like values.

It raises the real ``pynvml.NVMLError`` (``NVMLError(code)`` builds the per-code subclass, e.g.
``NVMLError_GpuIsLost``) with real NVML return codes, exposes the real constants, returns the real
ctypes structs where pynvml does, and has hooks for faults. It is a fake, not a simulator: power is
a constant load clamped to the power limit, and the energy counter grows by a fixed step per call,
or, given a clock, by that power over the clock's time (so tests can let time pass).
"""

from __future__ import annotations

import types
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pynvml

from telemetry.clock import Clock

H100_NAME = "NVIDIA H100 80GB HBM3"
MIN_LIMIT_MW = 200_000
MAX_LIMIT_MW = 700_000
DEFAULT_LIMIT_MW = 700_000
MEM_CLOCK_MHZ = 2619
#: Supported graphics clocks, highest first, as ``nvidia-smi -q -d SUPPORTED_CLOCKS`` lists them.
SM_CLOCKS_MHZ = tuple(range(1980, 210 - 1, -15))
MEMORY_TOTAL_BYTES = 81_559 * 1024 * 1024

#: Calls that change GPU settings (``no_permission=True`` makes them fail).
SETTERS = frozenset({
    "nvmlDeviceSetPowerManagementLimit",
    "nvmlDeviceSetGpuLockedClocks",
    "nvmlDeviceResetGpuLockedClocks",
})


@dataclass
class FakeGpu:
    """State of one fake GPU, in NVML units."""

    index: int
    load_power_mw: int = 452_000
    power_limit_mw: int = DEFAULT_LIMIT_MW
    energy_mj: int = 123_456_789
    locked_sm_mhz: tuple[int, int] | None = None
    temperature_c: int = 41
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    lost: bool = False
    #: With a clock: when the energy counter was last brought up to date (clock seconds).
    energy_at_s: float = 0.0

    @property
    def power_mw(self) -> int:
        return min(self.load_power_mw, self.power_limit_mw)

    @property
    def sm_clock_mhz(self) -> int:
        top = SM_CLOCKS_MHZ[0] if self.locked_sm_mhz is None else self.locked_sm_mhz[1]
        # A binding power cap pulls the clock down in proportion (crude, enough for a fake).
        if self.power_limit_mw < self.load_power_mw:
            top = int(top * self.power_limit_mw / self.load_power_mw)
        return max(SM_CLOCKS_MHZ[-1], top)


@dataclass(frozen=True)
class FakeHandle:
    """What ``nvmlDeviceGetHandleByIndex`` returns (opaque to the backend)."""

    index: int


class FakePynvml:
    """Behaves like the ``pynvml`` module for the calls ``NvmlBackend`` makes.

    Args:
        gpus: Number of GPUs.
        unsupported: Call names that fail with ``NVML_ERROR_NOT_SUPPORTED`` (every GPU).
        unsupported_fields: Field ids whose ``nvmlDeviceGetFieldValues`` entry reports
            ``NVML_ERROR_NOT_SUPPORTED``.
        missing: Call names this "pynvml" lacks altogether (``AttributeError``), like an old
            nvidia-ml-py without ``nvmlDeviceGetCurrentClocksEventReasons``.
        no_permission: Setters fail with ``NVML_ERROR_NO_PERMISSION`` (not root).
        init_error: ``nvmlInit`` fails with this code, e.g. ``NVML_ERROR_LIBRARY_NOT_FOUND``.
        processes: Compute processes per GPU index, as ``(pid, used_memory_bytes)``.
        energy_step_mj: How much the energy counter grows per read (without a ``clock``).
        clock: If given, the energy counter integrates power over this clock's time instead.

    Attributes:
        calls: How many times each call was made.
        gpus: The fake GPUs' state.
    """

    NVMLError = pynvml.NVMLError
    c_nvmlFieldValue_t = pynvml.c_nvmlFieldValue_t

    def __init__(
        self,
        gpus: int = 2,
        *,
        unsupported: Iterable[str] = (),
        unsupported_fields: Iterable[int] = (),
        missing: Iterable[str] = (),
        no_permission: bool = False,
        init_error: int | None = None,
        processes: Mapping[int, list[tuple[int, int | None]]] | None = None,
        energy_step_mj: int = 45_200,
        clock: Clock | None = None,
    ) -> None:
        self.gpus = [FakeGpu(index=i, load_power_mw=452_000 + 1_000 * i) for i in range(gpus)]
        self._clock = clock
        for gpu in self.gpus:
            gpu.energy_at_s = clock.now() if clock is not None else 0.0
        for i, procs in (processes or {}).items():
            self.gpus[i].processes = list(procs)
        self.calls: Counter[str] = Counter()
        self.init_count = 0
        self.energy_step_mj = energy_step_mj
        self._unsupported = set(unsupported)
        self._unsupported_fields = set(unsupported_fields)
        self._missing = set(missing)
        self._no_permission = no_permission
        self._init_error = init_error
        self._failures: dict[tuple[str, int | None], int] = {}

    # -- fault hooks ----------------------------------------------------------------------------

    def fail(self, call: str, code: int, gpu: int | None = None) -> None:
        """Make ``call`` fail with NVML ``code`` (on one GPU, or on all when ``gpu`` is None)."""
        self._failures[(call, gpu)] = code

    def heal(self, call: str, gpu: int | None = None) -> None:
        """Undo ``fail``."""
        self._failures.pop((call, gpu), None)

    def lose(self, gpu: int) -> None:
        """The GPU falls off the bus: every call on it fails with ``NVML_ERROR_GPU_IS_LOST``."""
        self.gpus[gpu].lost = True

    def recover(self, gpu: int) -> None:
        """The GPU is back (after a reset)."""
        self.gpus[gpu].lost = False

    # -- module-like behaviour ------------------------------------------------------------------

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvml") and name in object.__getattribute__(self, "_missing"):
            raise AttributeError(f"module 'pynvml' has no attribute {name!r}")
        return object.__getattribute__(self, name)

    def __getattr__(self, name: str) -> Any:
        # Only what is not defined here: pynvml's constants, flags and error classes.
        if name.startswith(("NVML_", "NVMLError_", "nvmlClocks")):
            return getattr(pynvml, name)
        raise AttributeError(f"FakePynvml does not fake {name!r}")

    @property
    def initialized(self) -> bool:
        """Whether NVML is up: like the real library, init/shutdown are reference counted."""
        return self.init_count > 0

    def _enter(self, call: str, handle: FakeHandle | None = None) -> FakeGpu | None:
        """Count the call and raise whatever fault is configured for it."""
        self.calls[call] += 1
        if call not in ("nvmlInit", "nvmlShutdown") and not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        gpu = None if handle is None else self.gpus[handle.index]
        code = self._failures.get((call, None))
        if gpu is not None:
            if gpu.lost:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            code = self._failures.get((call, gpu.index), code)
        if code is not None:
            raise pynvml.NVMLError(code)
        if call in self._unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if call in SETTERS and self._no_permission:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        return gpu

    def _gpu(self, call: str, handle: FakeHandle) -> FakeGpu:
        gpu = self._enter(call, handle)
        assert gpu is not None
        return gpu

    # -- library --------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if self._init_error is not None:
            raise pynvml.NVMLError(self._init_error)
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        if not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        self.init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return "570.124.06"

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._enter("nvmlSystemGetNVMLVersion")
        return "12.570.124.06"

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if self.gpus[index].lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return FakeHandle(index)

    # -- static facts ---------------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        gpu = self._gpu("nvmlDeviceGetUUID", handle)
        return f"GPU-fa4e0000-0000-4000-8000-{gpu.index:012d}"

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        self._gpu("nvmlDeviceGetName", handle)
        return H100_NAME

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: FakeHandle) -> list[int]:
        self._gpu("nvmlDeviceGetPowerManagementLimitConstraints", handle)
        return [MIN_LIMIT_MW, MAX_LIMIT_MW]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: FakeHandle) -> int:
        self._gpu("nvmlDeviceGetPowerManagementDefaultLimit", handle)
        return DEFAULT_LIMIT_MW

    def nvmlDeviceGetSupportedMemoryClocks(self, handle: FakeHandle) -> list[int]:
        self._gpu("nvmlDeviceGetSupportedMemoryClocks", handle)
        return [MEM_CLOCK_MHZ]

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle: FakeHandle, mem_mhz: int) -> list[int]:
        self._gpu("nvmlDeviceGetSupportedGraphicsClocks", handle)
        if mem_mhz != MEM_CLOCK_MHZ:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return list(SM_CLOCKS_MHZ)

    def nvmlDeviceGetMaxClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        self._gpu("nvmlDeviceGetMaxClockInfo", handle)
        return SM_CLOCKS_MHZ[0] if clock_type != pynvml.NVML_CLOCK_MEM else MEM_CLOCK_MHZ

    # -- readings -------------------------------------------------------------------------------

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, field_ids: list[int]) -> Any:
        gpu = self._gpu("nvmlDeviceGetFieldValues", handle)
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        for slot, fid in zip(values, field_ids, strict=True):
            slot.fieldId = fid
            if fid in self._unsupported_fields or fid != pynvml.NVML_FI_DEV_POWER_INSTANT:
                slot.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                continue
            slot.nvmlReturn = pynvml.NVML_SUCCESS
            slot.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
            slot.value.uiVal = gpu.power_mw + 3_000  # instant power runs a little above average
        return values

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        gpu = self._gpu("nvmlDeviceGetTotalEnergyConsumption", handle)
        if self._clock is None:
            gpu.energy_mj += self.energy_step_mj
        else:
            self._accrue(gpu)
        return gpu.energy_mj

    def _accrue(self, gpu: FakeGpu) -> None:
        """Add the power drawn since the last update to the counter (only with a clock)."""
        if self._clock is None:
            return
        now = self._clock.now()
        gpu.energy_mj += round(gpu.power_mw * max(0.0, now - gpu.energy_at_s))  # mW·s = mJ
        gpu.energy_at_s = max(now, gpu.energy_at_s)

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        gpu = self._gpu("nvmlDeviceGetClockInfo", handle)
        if clock_type == pynvml.NVML_CLOCK_MEM:
            return MEM_CLOCK_MHZ
        if clock_type in (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_GRAPHICS):
            return gpu.sm_clock_mhz
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        self._gpu("nvmlDeviceGetUtilizationRates", handle)
        return pynvml.c_nvmlUtilization_t(gpu=97, memory=41)

    def nvmlDeviceGetTemperatureV(self, handle: FakeHandle, sensor: int) -> int:
        return self._temperature("nvmlDeviceGetTemperatureV", handle, sensor)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        return self._temperature("nvmlDeviceGetTemperature", handle, sensor)

    def _temperature(self, call: str, handle: FakeHandle, sensor: int) -> int:
        gpu = self._gpu(call, handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle) -> Any:
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        used = 536_870_912 + sum(m or 0 for _, m in gpu.processes)
        return pynvml.c_nvmlMemory_t(total=MEMORY_TOTAL_BYTES, free=MEMORY_TOTAL_BYTES - used,
                                     used=used)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_mw

    def nvmlDeviceGetPowerManagementLimit(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPowerManagementLimit", handle).power_limit_mw

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        return self._reasons("nvmlDeviceGetCurrentClocksEventReasons", handle)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        return self._reasons("nvmlDeviceGetCurrentClocksThrottleReasons", handle)

    def _reasons(self, call: str, handle: FakeHandle) -> int:
        gpu = self._gpu(call, handle)
        reasons = 0
        if gpu.power_limit_mw < gpu.load_power_mw:
            reasons |= pynvml.nvmlClocksEventReasonSwPowerCap
        if gpu.locked_sm_mhz is not None:
            reasons |= pynvml.nvmlClocksEventReasonApplicationsClocksSetting
        return reasons

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        gpu = self._gpu("nvmlDeviceGetComputeRunningProcesses", handle)
        # pynvml returns "friendly objects"; unavailable memory (WDDM) comes back as None.
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=mem, gpuInstanceId=0xFFFFFFFF,
                                      computeInstanceId=0xFFFFFFFF)
                for pid, mem in gpu.processes]

    # -- settings -------------------------------------------------------------------------------

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeHandle, limit_mw: int) -> None:
        gpu = self._gpu("nvmlDeviceSetPowerManagementLimit", handle)
        if not MIN_LIMIT_MW <= limit_mw <= MAX_LIMIT_MW:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._accrue(gpu)  # the energy so far was drawn under the old limit
        gpu.power_limit_mw = limit_mw

    def nvmlDeviceSetGpuLockedClocks(self, handle: FakeHandle, min_mhz: int, max_mhz: int) -> None:
        gpu = self._gpu("nvmlDeviceSetGpuLockedClocks", handle)
        if min_mhz > max_mhz:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu.locked_sm_mhz = (min_mhz, max_mhz)

    def nvmlDeviceResetGpuLockedClocks(self, handle: FakeHandle) -> None:
        self._gpu("nvmlDeviceResetGpuLockedClocks", handle).locked_sm_mhz = None
