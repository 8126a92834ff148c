"""The control vocabulary: commands, observations, decisions, and the controller protocol.

Pure data, no behaviour beyond arithmetic on it: a per-job controller (``hw``, ``clock``,
``soft``) takes an ``Observation`` and answers ``Decision``s, each carrying the ``Command``s the
daemon's budget loop applies through its actuators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

from energy.units import mw_to_w
from scheduler.jobs import Mode

__all__ = [
    "Command",
    "Decision",
    "GpuFacts",
    "GpuObservation",
    "LockClocks",
    "Observation",
    "PowerController",
    "ResetClocks",
    "ResetPowerLimit",
    "SetMicroBatch",
    "SetPace",
    "SetPowerLimit",
]


# --- commands --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetPowerLimit:
    """Set a GPU's power limit (``nvidia-smi -pl``), mW; ``reapply``: the GPU lost the limit
    this job already holds (someone reset it), so set it again."""

    index: int
    limit_mw: int
    reapply: bool = False


@dataclass(frozen=True, slots=True)
class ResetPowerLimit:
    """Put a GPU's power limit back to its default."""

    index: int


@dataclass(frozen=True, slots=True)
class LockClocks:
    """Lock a GPU's SM clocks to ``[GPU minimum, max_mhz]`` (``nvidia-smi -lgc``), MHz;
    ``reapply``: the GPU lost the lock this job already holds, so lock it again."""

    index: int
    max_mhz: int
    reapply: bool = False


@dataclass(frozen=True, slots=True)
class ResetClocks:
    """Undo ``LockClocks`` (``nvidia-smi -rgc``)."""

    index: int


@dataclass(frozen=True, slots=True)
class SetPace:
    """Tell the job's client to sleep ``pace_s`` seconds after each step."""

    pace_s: float


@dataclass(frozen=True, slots=True)
class SetMicroBatch:
    """Tell the job's client which micro-batch size to use (None: the loop's own)."""

    micro_batch: int | None


Command = SetPowerLimit | ResetPowerLimit | LockClocks | ResetClocks | SetPace | SetMicroBatch


# --- observations ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GpuFacts:
    """What the daemon probed once about a GPU.

    Attributes:
        index: GPU index.
        min_limit_mw / max_limit_mw / default_limit_mw: Power limit range and default, mW.
        min_sm_clock_mhz / max_sm_clock_mhz: Supported SM clock range, MHz.
        sm_clock_step_mhz: Spacing of supported SM clocks below the maximum, MHz.
        idle_power_mw: What the GPU draws idle (measured while free), mW.
    """

    index: int
    min_limit_mw: int
    max_limit_mw: int
    default_limit_mw: int
    min_sm_clock_mhz: int
    max_sm_clock_mhz: int
    sm_clock_step_mhz: int
    idle_power_mw: int

    def snap_clock_mhz(self, clock_mhz: float) -> int:
        """The highest supported clock at or below ``clock_mhz`` (the minimum if none), MHz."""
        if clock_mhz >= self.max_sm_clock_mhz:
            return self.max_sm_clock_mhz
        steps = math.ceil((self.max_sm_clock_mhz - clock_mhz) / self.sm_clock_step_mhz - 1e-9)
        return max(self.max_sm_clock_mhz - steps * self.sm_clock_step_mhz, self.min_sm_clock_mhz)


@dataclass(frozen=True, slots=True)
class GpuObservation:
    """One of the job's GPUs at a control tick.

    Attributes:
        facts: The GPU's probed facts.
        power_avg_mw: 1 s average power (``power.draw.average``), mW; None if unreadable.
        limit_mw: Enforced power limit, mW; None if unreadable.
        locked_max_mhz: Upper end of locked SM clocks, MHz; None when not locked.
    """

    facts: GpuFacts
    power_avg_mw: int | None
    limit_mw: int | None
    locked_max_mhz: int | None


@dataclass(frozen=True, slots=True)
class Observation:
    """Everything a controller sees at one tick.

    Attributes:
        now_s: Tick time, s (any monotonic origin).
        gpus: The job's GPUs.
        budget_w: Effective wattage budget per GPU, W (the job's, or lower where the node-cap
            guard tightened it); None: unconstrained.
        steps_per_s / tokens_per_s: Throughput the client reported over the last seconds.
        step_time_s: Mean time a step computes (without the pace sleep), s; None before the
            first step.
        pace_s: The pace the client obeys now, s.
        micro_batch: The micro-batch directive in force (None: the loop's own).
        micro_batches: The micro-batches the job's loop allows (divisors of its global batch
            that fit its memory), ascending, as its client declared them; empty when it declared
            none (its micro-batch is not a lever then).
        default_micro_batch: The loop's own micro-batch (what ``micro_batch=None`` means); None
            when undeclared.
    """

    now_s: float
    gpus: tuple[GpuObservation, ...]
    budget_w: float | None
    steps_per_s: float | None = None
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    pace_s: float = 0.0
    micro_batch: int | None = None
    micro_batches: tuple[int, ...] = ()
    default_micro_batch: int | None = None

    def mean_power_w(self) -> float | None:
        """Mean 1 s average power of the job's readable GPUs, W (None: none readable)."""
        values = [g.power_avg_mw for g in self.gpus if g.power_avg_mw is not None]
        return mw_to_w(sum(values) / len(values)) if values else None

    def max_power_w(self) -> float | None:
        """Highest 1 s average power among the job's GPUs, W (None: none readable)."""
        values = [g.power_avg_mw for g in self.gpus if g.power_avg_mw is not None]
        return mw_to_w(max(values)) if values else None


@dataclass(frozen=True, slots=True)
class Decision:
    """One control decision, as the daemon stores it.

    Attributes:
        at_s: Tick time, s.
        source: Who decided (``hw``, ``clock``, ``soft``, ``energy``, ``node-cap``).
        what: What changes, in words.
        why: Why, in words.
        commands: What to apply, in order (may be empty for a pure notice).
        power_before_w: Mean per-GPU 1 s power before it, W.
        steps_per_s_before: Throughput before it, steps/s.
        power_after_w / steps_per_s_after: Filled by ``after`` once the change has settled.
    """

    at_s: float
    source: str
    what: str
    why: str
    commands: tuple[Command, ...]
    power_before_w: float | None
    steps_per_s_before: float | None
    power_after_w: float | None = None
    steps_per_s_after: float | None = None

    def after(self, obs: Observation) -> Decision:
        """This decision with the power and throughput of a later observation."""
        return replace(self, power_after_w=obs.mean_power_w(), steps_per_s_after=obs.steps_per_s)


class PowerController(Protocol):
    """A per-job controller: one ``tick`` per control tick."""

    @property
    def mode(self) -> Mode:
        """``hw``, ``clock`` or ``soft``."""
        ...

    @property
    def state(self) -> str:
        """The state machine's current state, for logs and tests."""
        ...

    def tick(self, obs: Observation) -> tuple[Decision, ...]:
        """Decide what to change now; an empty tuple changes nothing."""
        ...

    def undo(self, obs: Observation) -> tuple[Command, ...]:
        """Commands that take back everything this controller set."""
        ...
