"""The GPU backend interface: what every backend reads, sets and can do, and the errors it raises.

Reads degrade (an unsupported field is ``None``); writes raise typed errors. What a backend's GPUs
can do (``BackendCapabilities``) is probed once when it opens and kept, so callers ask it instead
of trying calls or looking for methods. Units are NVML's own and are carried in every name:
milliwatts, millijoules, MHz, bytes, degrees Celsius.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Final, Protocol, runtime_checkable


class ThrottleReason(enum.IntFlag):
    """Clock event (throttle) reason bits, with NVML's values (``nvmlClocksEventReason*``)."""

    NONE = 0
    GPU_IDLE = 0x1
    APPLICATIONS_CLOCKS_SETTING = 0x2
    SW_POWER_CAP = 0x4
    HW_SLOWDOWN = 0x8
    SYNC_BOOST = 0x10
    SW_THERMAL_SLOWDOWN = 0x20
    HW_THERMAL_SLOWDOWN = 0x40
    HW_POWER_BRAKE_SLOWDOWN = 0x80
    DISPLAY_CLOCK_SETTING = 0x100
    BOARD_LIMIT = 0x200
    RELIABILITY = 0x400


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """Static facts about one GPU, probed once when the backend opens.

    Attributes:
        index: NVML index (``nvidia-smi --query-gpu=index``).
        uuid: ``GPU-...`` identifier, stable across reboots.
        name: Product name, e.g. ``NVIDIA H100 80GB HBM3``.
        min_limit_mw / max_limit_mw: Power limit range (``power.min_limit`` / ``power.max_limit``).
        default_limit_mw: Default power limit (``power.default_limit``).
        min_sm_clock_mhz / max_sm_clock_mhz: Supported SM clock range.
        memory_total_bytes: Framebuffer size (``memory.total``).
        has_energy_counter: Whether ``nvmlDeviceGetTotalEnergyConsumption`` works.
    """

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


@dataclass(frozen=True, slots=True)
class GpuCapabilities:
    """What one GPU can do, as its backend probed it when it opened.

    Whether this process may use a setter (root, ``CAP_SYS_ADMIN``) is not a capability: only a
    write can tell, which ``scheduler.actuators.Actuators.probe_power_limit_permission`` makes.

    Attributes:
        index: The GPU's index.
        energy_counter: ``GpuReading.energy_mj`` is filled (the GPU has an energy counter).
        power_limit_range_mw: ``(min, max)`` settable power limit, ``None`` when unknown.
        default_power_limit_mw: The limit ``reset_power_limit`` goes back to, ``None`` when unknown.
        can_set_power_limit: ``set_power_limit`` can work on this GPU; where it cannot, the
            setter raises ``NotSupportedError``.
        can_lock_clocks: ``lock_sm_clocks`` can work on this GPU; where it cannot, the setter
            raises ``NotSupportedError``.
        sm_clock_range_mhz: ``(min, max)`` SM clock; either bound ``None`` when unknown.
        supported_sm_clocks_mhz: Every supported SM clock, highest first; ``()`` when not known.
        sm_clock_step_mhz: Spacing of the supported SM clocks, ``None`` when not known.
        idle_power_mw: What the GPU draws idle, where the backend knows it without measuring (a
            simulated SKU's profile); ``None`` otherwise.
    """

    index: int
    energy_counter: bool
    power_limit_range_mw: tuple[int, int] | None
    default_power_limit_mw: int | None
    can_set_power_limit: bool
    can_lock_clocks: bool
    sm_clock_range_mhz: tuple[int | None, int | None]
    supported_sm_clocks_mhz: tuple[int, ...] = ()
    sm_clock_step_mhz: float | None = None
    idle_power_mw: int | None = None


@dataclass(frozen=True, slots=True)
class BackendCapabilities:
    """What a backend and each of its GPUs can do (``GpuBackend.capabilities``).

    Attributes:
        simulated: The GPUs are modelled (the simulator, a replayed trace), not hardware.
        settings_need_privilege: Setting a power limit or locking clocks needs root or
            ``CAP_SYS_ADMIN`` (real GPUs); modelled GPUs take settings from anyone.
        gpus: One entry per GPU, in index order.
    """

    simulated: bool
    settings_need_privilege: bool
    gpus: tuple[GpuCapabilities, ...]

    def gpu(self, index: int) -> GpuCapabilities:
        """The capabilities of one GPU.

        Raises:
            GpuNotFoundError: No GPU with that index.
        """
        if not 0 <= index < len(self.gpus):
            raise GpuNotFoundError(f"no GPU {index} (there are {len(self.gpus)})")
        return self.gpus[index]


def capabilities_from_info(
    info: GpuInfo,
    *,
    can_set_power_limit: bool,
    can_lock_clocks: bool,
    supported_sm_clocks_mhz: tuple[int, ...] = (),
    sm_clock_step_mhz: float | None = None,
    idle_power_mw: int | None = None,
) -> GpuCapabilities:
    """A GPU's capabilities with the facts ``GpuInfo`` already carries taken from it, so the two
    cannot disagree."""
    lo, hi = info.min_limit_mw, info.max_limit_mw
    return GpuCapabilities(
        index=info.index,
        energy_counter=info.has_energy_counter,
        power_limit_range_mw=None if lo is None or hi is None else (lo, hi),
        default_power_limit_mw=info.default_limit_mw,
        can_set_power_limit=can_set_power_limit,
        can_lock_clocks=can_lock_clocks,
        sm_clock_range_mhz=(info.min_sm_clock_mhz, info.max_sm_clock_mhz),
        supported_sm_clocks_mhz=supported_sm_clocks_mhz,
        sm_clock_step_mhz=sm_clock_step_mhz,
        idle_power_mw=idle_power_mw,
    )


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A compute process on a GPU (``nvidia-smi --query-compute-apps=pid,used_memory``)."""

    pid: int
    used_memory_bytes: int | None


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One reading of one GPU. Any field the GPU does not support is ``None``.

    Attributes:
        sampled_at: When the reading was taken, timezone-aware UTC.
        power_mw: Instant power (``NVML_FI_DEV_POWER_INSTANT``; ``power.draw.instant``).
        power_avg_mw: 1 s average power (``nvmlDeviceGetPowerUsage``; ``power.draw.average``).
        energy_mj: Total energy since the driver loaded (``nvmlDeviceGetTotalEnergyConsumption``).
        sm_clock_mhz: Current SM clock (``clocks.sm``).
        mem_clock_mhz: Current memory clock (``clocks.mem``).
        gpu_util_pct / mem_util_pct: Utilisation over the last sample period (``utilization.*``).
        temperature_c: Core temperature (``temperature.gpu``).
        memory_used_bytes: Framebuffer in use (``memory.used``).
        power_limit_mw: Enforced power limit (``enforced.power.limit``).
        throttle_reasons: ``ThrottleReason`` bits active now (``clocks_event_reasons.active``).
        processes: Compute processes on the GPU.
    """

    index: int
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
    processes: tuple[GpuProcess, ...] = ()


READING_FIELDS: Final[tuple[str, ...]] = tuple(
    f.name for f in fields(GpuReading) if f.name not in ("index", "sampled_at", "processes")
)
"""The measured values of a ``GpuReading``, in declaration order: each is ``None`` where the GPU
does not support it. The one list of them: the store's ``samples`` columns, the CLI's JSON and
the backend tests take it from here (``processes`` is not among them: it degrades to ``()``)."""


class GpuError(Exception):
    """Base of every error a backend raises."""


class BackendUnavailableError(GpuError, RuntimeError):
    """The backend cannot start (no NVIDIA driver, library missing)."""


class GpuNotFoundError(GpuError, LookupError):
    """No GPU with that index."""


class GpuLostError(GpuError):
    """The GPU fell off the bus or stopped answering (``NVML_ERROR_GPU_IS_LOST``)."""


class NotSupportedError(GpuError):
    """The GPU or driver does not support this call (``NVML_ERROR_NOT_SUPPORTED``)."""


class GpuPermissionError(GpuError, PermissionError):
    """The caller lacks the privilege for this call (``NVML_ERROR_NO_PERMISSION``)."""


class GpuTimeoutError(GpuError, TimeoutError):
    """The call took too long (``NVML_ERROR_TIMEOUT``)."""


class InvalidSettingError(GpuError, ValueError):
    """A requested setting lies outside what the GPU allows; the message names the range."""


@runtime_checkable
class GpuBackend(Protocol):
    """What the sampler and the actuators need from a source of GPUs.

    Implementations: ``NvmlBackend`` (real GPUs), ``SimulatedBackend`` (docs/architecture.md),
    and trace replay. ``read`` raises ``GpuLostError`` for a GPU that is gone; every other failing
    or unsupported field degrades to ``None``. Setters raise ``GpuPermissionError``,
    ``NotSupportedError`` or ``InvalidSettingError``; each has a reset partner. A setter that
    ``capabilities`` says the GPU lacks raises ``NotSupportedError``.
    """

    name: str

    def devices(self) -> list[GpuInfo]:
        """Every GPU, in index order (probed once; cheap to call)."""
        ...

    def capabilities(self) -> BackendCapabilities:
        """What the backend and each GPU can do, probed once at open (cheap to call)."""
        ...

    def read(self, index: int) -> GpuReading:
        """Read every field of one GPU now."""
        ...

    def set_power_limit(self, index: int, limit_mw: int) -> None:
        """Set the power limit (``nvidia-smi -pl``); needs root."""
        ...

    def reset_power_limit(self, index: int) -> None:
        """Put the power limit back to the GPU's default."""
        ...

    def lock_sm_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        """Lock SM clocks to a range (``nvidia-smi -lgc``); needs root."""
        ...

    def reset_sm_clocks(self, index: int) -> None:
        """Undo ``lock_sm_clocks`` (``nvidia-smi -rgc``)."""
        ...

    def close(self) -> None:
        """Release the library or files the backend holds."""
        ...
