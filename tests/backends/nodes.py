"""The backends the contract runs on, each with its clock, response time and fault hooks.

``tests/backends/conftest.py`` opens one ``Node`` per backend; ``test_contract.py`` lets time pass
through ``Node.advance`` and injects faults through ``Node.faults``, so every rule it checks is
seen to take effect, not merely called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import pynvml

from telemetry.backends.base import READING_FIELDS, GpuBackend
from telemetry.backends.nvml import HOLD_S, NvmlBackend
from telemetry.backends.replay import ReplayBackend, ReplayNoise
from telemetry.backends.simulated import (
    LIMIT_RESPONSE_S,
    NOISE_FRACTION,
    POWER_AVG_WINDOW_S,
    SENSOR_PERIOD_S,
    FaultKind,
    SimulatedBackend,
)
from telemetry.clock import VirtualClock
from tests.fake_pynvml import FakePynvml

#: Every backend the contract runs on.
KINDS: Final = ("simulated", "nvml-fake", "replay")

#: Backends the fault rules cannot apply to, and why: they are left out of the fault fixtures.
NO_FAULTS: Final = {
    "replay": (
        "a replayed GPU is computed in-process from a trace loaded at start: no call can be "
        "unsupported or fail and no GPU can be lost, so replay has nothing to degrade from; a "
        "fault hook added only for this suite would test the hook, not replay"
    ),
}

#: The field faults each other backend can inject. ``not_supported``: the GPU or driver cannot give
#: the field. ``failing``: a call that worked starts failing with another error. The simulator has
#: no transient errors, so ``NOT_SUPPORTED`` is its only field fault.
FIELD_FAULTS: Final = {
    "simulated": ("not_supported",),
    "nvml-fake": ("not_supported", "failing"),
}

#: The reading fields that degrade to ``None`` (``processes`` degrades to ``()``).
FIELDS: Final = READING_FIELDS


class Faults(Protocol):
    """Fault hooks of a backend under test."""

    #: Fields a backend may carry over a failing source with a documented estimate, not ``None``.
    bridged_fields: frozenset[str]

    def break_field(self, index: int, name: str, how: str) -> frozenset[str]:
        """Make field ``name`` of GPU ``index`` fail (``how``: a ``FIELD_FAULTS`` entry).

        Returns:
            Every field that reads through the same source, so goes down with it.
        """
        ...

    def lose(self, index: int) -> None:
        """The GPU falls off the bus."""
        ...

    def recover(self, index: int) -> None:
        """The GPU is back."""
        ...

    def reopen_lacking(self, index: int) -> GpuBackend:
        """A second backend on the same GPUs, opened while GPU ``index`` can report no energy
        counter, no power limit range and no SM clock (as an old or odd GPU would); the caller
        closes it."""
        ...


@dataclass
class Node:
    """A backend under test, two busy GPUs, and what the contract needs to watch it work.

    Attributes:
        kind: Which backend (a ``KINDS`` entry).
        backend: The backend.
        clock: The clock the backend reads; ``advance`` moves it.
        settle_s: How long after a change every reading shows it (the power limit's response
            time, the power averaging window, fields read less often than every sample).
        power_tolerance: Share by which a power reading may exceed the limit in force (noise).
        lock_reads_top: A busy GPU under a clock lock reads exactly the lock's top clock (replay
            emulates clocks so); otherwise it reads somewhere in the locked range.
        faults: Fault hooks; None for the backends in ``NO_FAULTS``.
        energy_seen: The last energy counter read per GPU (the contract checks it never goes back).
    """

    kind: str
    backend: GpuBackend
    clock: VirtualClock
    settle_s: float
    power_tolerance: float
    lock_reads_top: bool = False
    faults: Faults | None = None
    energy_seen: dict[int, int] = field(default_factory=dict)

    def advance(self, seconds: float | None = None) -> None:
        """Let ``seconds`` pass (default ``settle_s``)."""
        self.clock.advance(self.settle_s if seconds is None else seconds)


def open_node(kind: str, tmp_path: Path, trace: Path | str) -> Node:
    """A ``Node`` of two busy GPUs on the backend ``kind``; ``trace`` is replay's trace file."""
    clock = VirtualClock()
    if kind == "simulated":
        return _simulated(clock, tmp_path)
    if kind == "nvml-fake":
        return _nvml_fake(clock)
    if kind == "replay":
        replay = ReplayBackend(trace, "imagenet/resnet50", 256, gpus=2, clock=clock, seed=0)
        # A replayed GPU always runs its trace and applies a setting at once; its instant power
        # has Gaussian sensor noise, bounded here at four standard deviations.
        return Node(kind, replay, clock, settle_s=0.0,
                    power_tolerance=4 * ReplayNoise().sensor_cv, lock_reads_top=True)
    raise ValueError(f"unknown backend kind {kind!r}; known: {', '.join(KINDS)}")


# -- simulated ----------------------------------------------------------------------------------

def _simulated(clock: VirtualClock, tmp_path: Path) -> Node:
    sim = SimulatedBackend(
        gpus=2, sku="H100-SXM", clock=clock, state_path=tmp_path / "sim.json", seed=0
    )
    # Busy GPUs: an idle one draws less than any power limit and its clock sits below any lock,
    # so neither setting would show in a reading.
    for index in range(2):
        sim.set_workload(index, "training")
    node = Node(
        "simulated",
        sim,
        clock,
        settle_s=LIMIT_RESPONSE_S + POWER_AVG_WINDOW_S + SENSOR_PERIOD_S,
        power_tolerance=NOISE_FRACTION,
        faults=_SimulatedFaults(sim, clock, tmp_path / "sim.json"),
    )
    node.advance()  # let the 1 s power average fill with the busy power
    return node


class _SimulatedFaults:
    """The simulator's own fault injection (``SimulatedBackend.inject_fault``)."""

    bridged_fields: frozenset[str] = frozenset()

    def __init__(self, sim: SimulatedBackend, clock: VirtualClock, state_path: Path) -> None:
        self._sim = sim
        self._clock = clock
        self._state_path = state_path

    def break_field(self, index: int, name: str, how: str) -> frozenset[str]:
        if how != "not_supported":
            raise ValueError(f"the simulator has no {how!r} field fault")
        self._sim.inject_fault(index, FaultKind.NOT_SUPPORTED, fields=[name])
        return frozenset({name})

    def lose(self, index: int) -> None:
        self._sim.inject_fault(index, FaultKind.GPU_LOST)

    def recover(self, index: int) -> None:
        self._sim.clear_faults(index)

    def reopen_lacking(self, index: int) -> GpuBackend:
        self._sim.inject_fault(index, FaultKind.NOT_SUPPORTED,
                               fields=["energy_mj", "power_limit_mw", "sm_clock_mhz"])
        return SimulatedBackend(gpus=2, sku="H100-SXM", clock=self._clock,
                                state_path=self._state_path, seed=0)


# -- NVML on the fake pynvml --------------------------------------------------------------------

#: The pynvml call behind each reading field (``NvmlBackend``'s first choice; the fake has it).
_NVML_SOURCES: Final = {
    "power_mw": "nvmlDeviceGetFieldValues",
    "power_avg_mw": "nvmlDeviceGetPowerUsage",
    "energy_mj": "nvmlDeviceGetTotalEnergyConsumption",
    "sm_clock_mhz": "nvmlDeviceGetClockInfo",
    "mem_clock_mhz": "nvmlDeviceGetClockInfo",
    "gpu_util_pct": "nvmlDeviceGetUtilizationRates",
    "mem_util_pct": "nvmlDeviceGetUtilizationRates",
    "temperature_c": "nvmlDeviceGetTemperatureV",
    "memory_used_bytes": "nvmlDeviceGetMemoryInfo",
    "power_limit_mw": "nvmlDeviceGetEnforcedPowerLimit",
    "throttle_reasons": "nvmlDeviceGetCurrentClocksEventReasons",
}

#: The NVML return code for each field fault (``UNKNOWN``: a failure NVML does not explain).
_NVML_CODES: Final = {
    "not_supported": pynvml.NVML_ERROR_NOT_SUPPORTED,
    "failing": pynvml.NVML_ERROR_UNKNOWN,
}


def _nvml_fake(clock: VirtualClock) -> Node:
    fake = FakePynvml(gpus=2, clock=clock)
    return Node(
        "nvml-fake",
        NvmlBackend(nvml=fake, clock=clock),
        clock,
        # Processes and memory in use are read at most every HOLD_S and repeated in between.
        settle_s=max(HOLD_S.values()) + 0.1,
        # The fake's instant power runs 3 W above the average, which is clamped to the limit.
        power_tolerance=0.02,
        faults=_NvmlFaults(fake, clock),
    )


class _NvmlFaults:
    """NVML errors from the fake pynvml (``FakePynvml.fail`` / ``lose``)."""

    # NvmlBackend carries energy_mj over a failing counter read with the power integral since its
    # last reading, as it does between reads anyway (see telemetry/backends/nvml.py).
    bridged_fields: frozenset[str] = frozenset({"energy_mj"})

    def __init__(self, fake: FakePynvml, clock: VirtualClock) -> None:
        self._fake = fake
        self._clock = clock

    def break_field(self, index: int, name: str, how: str) -> frozenset[str]:
        call = _NVML_SOURCES[name]
        self._fake.fail(call, _NVML_CODES[how], gpu=index)
        return frozenset(f for f, c in _NVML_SOURCES.items() if c == call)

    def lose(self, index: int) -> None:
        self._fake.lose(index)

    def recover(self, index: int) -> None:
        self._fake.recover(index)

    def reopen_lacking(self, index: int) -> GpuBackend:
        for call in _LACKING_CALLS:
            self._fake.fail(call, pynvml.NVML_ERROR_NOT_SUPPORTED, gpu=index)
        return NvmlBackend(nvml=self._fake, clock=self._clock)


#: The pynvml calls that would tell of an energy counter, a power limit range or an SM clock.
_LACKING_CALLS: Final = (
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetPowerManagementLimitConstraints",
    "nvmlDeviceGetSupportedMemoryClocks",
    "nvmlDeviceGetMaxClockInfo",
)

