"""Per-job power controllers, the energy forecast and guard, and the node-cap guard.

Pure: nothing here reads a GPU, the store or a clock. The daemon's budget loop
(``scheduler.budgets``) builds an ``Observation`` once per control tick (1 Hz), calls a controller's
``tick``, applies the ``Command``s of the returned ``Decision``s through its actuators, and stores
each decision with the power and throughput before it and, a few ticks later, after it
(``Decision.after``)::

    ctl = make_controller(choose_mode("auto", hw_permitted=probe_ok).mode)
    every second:
        for decision in ctl.tick(observation):
            actuators.apply(decision.commands)
            journal.record(decision)

Modes (docs/architecture.md, "Budgets and how they are held"):

* ``hw`` — ``HwController``: the power limit at the budget, then trimmed on the measured average;
* ``clock`` — ``ClockController``: the highest locked SM clock whose measured power fits;
* ``soft`` — ``SoftController``: pacing from a model-based feedback controller on duty;
* ``auto`` — ``choose_mode``: ``hw`` where the daemon may set limits, else ``soft``.

Each controller is a small state machine with explicit states and documented transitions
(not flag soup). All of them aim at a setpoint a little under the budget
(``budget * (1 - margin)``) so that 10 s averages stay at or under ``budget * 1.02``.

``EnergyForecast`` forecasts a job's total energy from its progress; ``EnergyGuard`` turns
crossings of the energy budget into warn / slow / pause / resume / stop, once per crossing.
``NodeCapGuard`` holds the node's power cap at run time by lowering the effective per-GPU budgets
of the lowest-priority jobs first, and gives them back when headroom returns.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

__all__ = [
    "ClockController",
    "Command",
    "Decision",
    "EnergyAction",
    "EnergyEvent",
    "EnergyForecast",
    "EnergyGuard",
    "Forecast",
    "GpuFacts",
    "GpuObservation",
    "HwController",
    "JobPower",
    "LockClocks",
    "Mode",
    "ModeChoice",
    "NodeCapDecision",
    "NodeCapGuard",
    "Observation",
    "PowerController",
    "ResetClocks",
    "ResetPowerLimit",
    "SetMicroBatch",
    "SetPace",
    "SetPowerLimit",
    "SoftController",
    "choose_mode",
    "make_controller",
]

Mode = Literal["hw", "clock", "soft", "auto"]

#: 10 s averages may reach ``budget * (1 + WINDOW_TOLERANCE)`` (the acceptance bar).
WINDOW_TOLERANCE = 0.02


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
    """

    now_s: float
    gpus: tuple[GpuObservation, ...]
    budget_w: float | None
    steps_per_s: float | None = None
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    pace_s: float = 0.0
    micro_batch: int | None = None

    def mean_power_w(self) -> float | None:
        """Mean 1 s average power of the job's readable GPUs, W (None: none readable)."""
        values = [g.power_avg_mw for g in self.gpus if g.power_avg_mw is not None]
        return sum(values) / len(values) / 1000.0 if values else None

    def max_power_w(self) -> float | None:
        """Highest 1 s average power among the job's GPUs, W (None: none readable)."""
        values = [g.power_avg_mw for g in self.gpus if g.power_avg_mw is not None]
        return max(values) / 1000.0 if values else None


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


def _decision(
    obs: Observation, source: str, what: str, why: str, commands: Sequence[Command]
) -> Decision:
    return Decision(
        at_s=obs.now_s,
        source=source,
        what=what,
        why=why,
        commands=tuple(commands),
        power_before_w=obs.mean_power_w(),
        steps_per_s_before=obs.steps_per_s,
    )


class PowerController(Protocol):
    """A per-job controller: one ``tick`` per control tick."""

    @property
    def mode(self) -> str:
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


# --- hw: power limits ------------------------------------------------------------------------


class HwState(enum.StrEnum):
    """States of ``HwController``.

    - ``IDLE``: no budget; nothing set (a limit set earlier is reset when the budget goes).
    - ``APPLYING``: the limit was set to the budget; waiting ``hold_ticks`` for the 1 s average.
    - ``TRIMMING``: moving the limit on the measured average toward the setpoint.
    - ``HOLDING``: converged; re-apply if the enforced limit drifts, trim again if the average
      leaves the band (a load change), start over if the budget changes.
    """

    IDLE = "idle"
    APPLYING = "applying"
    TRIMMING = "trimming"
    HOLDING = "holding"


class HwController:
    """``hw`` mode: the GPU power limit holds the budget (the firmware acts within milliseconds).

    The limit is first set to the budget, clamped to the card's range. The firmware holds the
    limit against the *peak* power of the load's ripple, so the average under a limit equal to the
    budget sits 3-8 % below it: that is throughput the budget allows. With ``trim`` on, the
    controller then moves the limit on the measured 1 s average (an integral step with gain 1:
    average power rises about one-for-one with the limit where the limit binds) until the average
    is within ``deadband`` under the setpoint, never above ``budget * (1 + max_headroom)``.
    ``trim=False`` keeps the plain limit = budget.

    Args:
        margin: Setpoint = ``budget * (1 - margin)``.
        trim: Trim the limit on the measured average (see above).
        max_headroom: The trimmed limit stays at or under ``budget * (1 + max_headroom)``.
        deadband: Converged once the average is within ``budget * deadband`` under the setpoint.
        hold_ticks: Ticks after a change before its 1 s average is trusted.
        max_trims: Trim steps per search before holding whatever fits best.
    """

    mode = "hw"

    def __init__(
        self,
        *,
        margin: float = 0.005,
        trim: bool = True,
        max_headroom: float = 0.10,
        deadband: float = 0.02,
        hold_ticks: int = 2,
        max_trims: int = 6,
    ) -> None:
        self._margin = margin
        self._trim = trim
        self._max_headroom = max_headroom
        self._deadband = deadband
        self._hold_ticks = hold_ticks
        self._max_trims = max_trims
        self._state = HwState.IDLE
        self._budget_w: float | None = None
        self._target_mw: dict[int, int] = {}
        self._since_change = 0
        self._trims = 0
        self._best_fit_mw: dict[int, int] = {}
        self._over_ticks = 0

    @property
    def state(self) -> str:
        """The current ``HwState``."""
        return self._state.value

    @property
    def target_limits_mw(self) -> Mapping[int, int]:
        """The limit the controller wants on each GPU, mW."""
        return dict(self._target_mw)

    def _set(self, obs: Observation, targets: Mapping[int, int]) -> list[Command]:
        cmds: list[Command] = []
        for g in obs.gpus:
            mw = targets[g.facts.index]
            self._target_mw[g.facts.index] = mw
            cmds.append(SetPowerLimit(g.facts.index, mw))
        self._since_change = 0
        return cmds

    def tick(self, obs: Observation) -> tuple[Decision, ...]:
        """One control tick (see ``HwState`` for the transitions)."""
        budget = obs.budget_w
        self._since_change += 1
        if budget is None:
            if self._state is HwState.IDLE:
                return ()
            self._state = HwState.IDLE
            self._budget_w = None
            self._target_mw.clear()
            return (
                _decision(
                    obs, "hw", "power limits reset", "no wattage budget any more", self.undo(obs)
                ),
            )
        if self._state is HwState.IDLE or budget != self._budget_w:
            self._budget_w = budget
            self._trims = 0
            self._best_fit_mw.clear()
            self._over_ticks = 0
            targets = {g.facts.index: _clamp_limit_mw(g.facts, budget * 1000.0) for g in obs.gpus}
            cmds = self._set(obs, targets)
            self._state = HwState.APPLYING
            mw = max(targets.values())
            return (
                _decision(
                    obs,
                    "hw",
                    f"power limit {mw / 1000:.0f} W",
                    f"budget {budget:.0f} W per GPU (clamped to the card's range)",
                    cmds,
                ),
            )
        # Re-apply a limit that drifted (someone else set it; a reset after a GPU fault).
        drifted = [
            g
            for g in obs.gpus
            if g.limit_mw is not None and g.limit_mw != self._target_mw.get(g.facts.index)
        ]
        if drifted and self._since_change >= 1:
            cmds = [SetPowerLimit(g.facts.index, self._target_mw[g.facts.index], reapply=True)
                    for g in drifted]
            self._since_change = 0
            return (
                _decision(
                    obs,
                    "hw",
                    "power limit re-applied",
                    f"GPU {drifted[0].facts.index} limit drifted to "
                    f"{(drifted[0].limit_mw or 0) / 1000:.0f} W",
                    cmds,
                ),
            )
        if self._since_change < self._hold_ticks:
            return ()
        power = obs.max_power_w()
        if power is None:
            return ()
        setpoint = budget * (1.0 - self._margin)
        over = power > budget * (1.0 + WINDOW_TOLERANCE / 2)
        if self._state is HwState.HOLDING:
            self._over_ticks = self._over_ticks + 1 if over else 0
            if self._over_ticks < 2:
                return ()
            self._state = HwState.TRIMMING  # load change: search again
            self._trims = 0
            self._best_fit_mw.clear()
        if self._state is HwState.APPLYING:
            if not self._trim and not over:
                self._state = HwState.HOLDING
                return ()
            self._state = HwState.TRIMMING
        # TRIMMING: aim in the middle of the band [setpoint - deadband, setpoint].
        aim = setpoint - budget * self._deadband / 2.0
        if power <= setpoint:
            self._best_fit_mw = dict(self._target_mw)
            binding = power >= 0.85 * max(self._target_mw.values()) / 1000.0
            converged = power >= setpoint - budget * self._deadband
            if converged or not binding or self._trims >= self._max_trims:
                # Not binding: the load draws well under the limit (light, paused), so raising
                # the limit gains nothing.
                self._state = HwState.HOLDING
                self._over_ticks = 0
                return ()
        elif self._trims >= self._max_trims or (
            self._best_fit_mw and self._best_fit_mw != self._target_mw
        ):
            # Overshot after a fit: the best fitting limit is one firmware clock step away.
            cmds = self._set(obs, self._best_fit_mw or self._target_mw)
            self._state = HwState.HOLDING
            self._over_ticks = 0
            return (
                _decision(
                    obs,
                    "hw",
                    "power limit back to the best that fitted",
                    f"{power:.0f} W over the {setpoint:.0f} W setpoint",
                    cmds,
                ),
            )
        cap_mw = budget * 1000.0 * (1.0 + self._max_headroom) if self._trim else budget * 1000.0
        step_mw = (aim - power) * 1000.0
        targets = {}
        for g in obs.gpus:
            current = self._target_mw[g.facts.index]
            want = min(current + step_mw, cap_mw)
            targets[g.facts.index] = _clamp_limit_mw(g.facts, want)
        if all(targets[i] == self._target_mw[i] for i in targets):
            self._state = HwState.HOLDING  # at the end of the allowed range: nothing to gain
            self._over_ticks = 0
            return ()
        self._trims += 1
        cmds = self._set(obs, targets)
        mw = max(targets.values())
        return (
            _decision(
                obs,
                "hw",
                f"power limit trimmed to {mw / 1000:.0f} W",
                f"measured {power:.0f} W against a {setpoint:.0f} W setpoint",
                cmds,
            ),
        )

    def undo(self, obs: Observation) -> tuple[Command, ...]:
        """Reset the power limit of every GPU of the job."""
        return tuple(ResetPowerLimit(g.facts.index) for g in obs.gpus)


def _clamp_limit_mw(facts: GpuFacts, limit_mw: float) -> int:
    return int(min(max(round(limit_mw), facts.min_limit_mw), facts.max_limit_mw))


# --- clock: locked SM clocks -----------------------------------------------------------------


class ClockState(enum.StrEnum):
    """States of ``ClockController``.

    - ``IDLE``: no budget; clocks unlocked.
    - ``SEARCHING``: a clock is locked and being measured; after ``hold_ticks`` its 1 s average
      is one more (clock, power) point, and the next clock comes from the points so far.
    - ``HOLDING``: the highest clock whose measured power fits is locked; re-search when the
      power at it moves by more than ``recheck`` (a load change) or the budget changes.
    """

    IDLE = "idle"
    SEARCHING = "searching"
    HOLDING = "holding"


class ClockController:
    """``clock`` mode: SM clocks locked at the highest supported clock whose power fits.

    The search is model-guided. Busy power is ``P(f) = b + m * u`` with ``u = (f / f_max)^k``
    (the simulator's model: ``b`` the static power, ``m`` the workload's dynamic power): linear in
    ``u``. The first clock is predicted safe: before anything is measured, the power at the top
    clock is bounded by the card's maximum limit and ``b`` by its idle power, and a line through
    those overestimates power at every lower clock. Each held clock adds a measured point; with
    two points the line is fitted exactly (a secant in ``u``), with one it keeps the fitted
    intercept and rescales the slope. The predicted clock is snapped down to the supported grid,
    and the search keeps a bracket (highest measured fit, lowest measured overshoot) so it
    ends even where the model is off: a bisection on the grid inside the bracket. On the
    simulator it converges in 2-3 measured clocks (4-6 ticks); the power never exceeds the setpoint
    during the search except through a first guess from a wrong model.

    Args:
        margin: A clock fits when its power is at or under ``budget * (1 - margin)``.
        k: Clock exponent of dynamic power used by the model (the simulator: about 2.5-3).
        confirm: The next clock up is not measured when the fitted line puts it this share over
            the setpoint.
        hold_ticks: Ticks a new clock is held before its 1 s average is trusted (a 1 s average
            read one tick after the change may still hold a sliver of the old clock).
        recheck: Re-search when the held clock's power moves by more than this share.
        max_points: Measured clocks per search before holding the best that fitted.
    """

    mode = "clock"

    def __init__(
        self,
        *,
        margin: float = 0.005,
        k: float = 2.7,
        confirm: float = 0.01,
        hold_ticks: int = 2,
        recheck: float = 0.04,
        max_points: int = 8,
    ) -> None:
        self._margin = margin
        self._k = k
        self._confirm = confirm
        self._hold_ticks = hold_ticks
        self._recheck = recheck
        self._max_points = max_points
        self._state = ClockState.IDLE
        self._budget_w: float | None = None
        self._clock_mhz: int | None = None
        self._since_change = 0
        self._points: list[tuple[int, float]] = []  # (clock MHz, measured W), this search
        self._intercept_w: float | None = None  # fitted static power b, kept across searches
        self._held_power_w: float | None = None
        self._off_ticks = 0
        self._searches = 0
        self._measured_in_search = 0

    @property
    def state(self) -> str:
        """The current ``ClockState``."""
        return self._state.value

    @property
    def clock_mhz(self) -> int | None:
        """The locked top clock, MHz (None: unlocked)."""
        return self._clock_mhz

    @property
    def searches(self) -> int:
        """How many searches ran (1 at start; one more per re-check)."""
        return self._searches

    @property
    def points(self) -> tuple[tuple[int, float], ...]:
        """(clock MHz, measured W) of the current or last search."""
        return tuple(self._points)

    def _u(self, facts: GpuFacts, clock_mhz: float) -> float:
        return float((clock_mhz / facts.max_sm_clock_mhz) ** self._k)

    def _clock_for(self, facts: GpuFacts, u: float) -> float:
        return float(facts.max_sm_clock_mhz * max(u, 0.0) ** (1.0 / self._k))

    def _lock(
        self, obs: Observation, clock_mhz: int, what: str, why: str, *, reapply: bool = False
    ) -> Decision:
        self._clock_mhz = clock_mhz
        self._since_change = 0
        cmds = [LockClocks(g.facts.index, clock_mhz, reapply=reapply) for g in obs.gpus]
        return _decision(obs, "clock", what, why, cmds)

    def _line(self, facts: GpuFacts) -> tuple[float, float] | None:
        """``(b, m)`` of ``P = b + m * u`` from the points measured, or None."""
        pts = self._points
        if len(pts) >= 2:
            (f1, p1), (f2, p2) = pts[-2], pts[-1]
            du = self._u(facts, f1) - self._u(facts, f2)
            if abs(du) > 1e-9 and (p1 - p2) / du > 0:
                m = (p1 - p2) / du
                self._intercept_w = p1 - m * self._u(facts, f1)
                return self._intercept_w, m
        if pts and self._intercept_w is not None:
            # One point (a load change): the static part stays, the dynamic part scales.
            f1, p1 = pts[-1]
            m = (p1 - self._intercept_w) / max(self._u(facts, f1), 1e-9)
            if m > 0:
                return self._intercept_w, m
        return None

    def _predict(self, facts: GpuFacts, fit_w: float) -> int:
        """The next clock to try from the points measured (or the safe prior), MHz."""
        line = self._line(facts)
        if line is not None:
            b, m = line
            return facts.snap_clock_mhz(self._clock_for(facts, (fit_w - b) / m))
        # Safe prior: power scaled linearly with the clock from a measured point (or from the
        # card's maximum limit at the top clock) overestimates the power of lower clocks while
        # the static share is under about a third (every SKU profile).
        if self._points:
            f1, p1 = self._points[-1]
        else:
            f1, p1 = facts.max_sm_clock_mhz, facts.max_limit_mw / 1000.0
        return facts.snap_clock_mhz(f1 * fit_w / max(p1, 1e-9))

    def _power_at(self, facts: GpuFacts, clock_mhz: float) -> float | None:
        line = self._line(facts)
        return None if line is None else line[0] + line[1] * self._u(facts, clock_mhz)

    def _next_clock(self, facts: GpuFacts, fit_w: float) -> int | None:
        """The next clock to measure, or None when the search is done (a bracket on the grid)."""
        step = facts.sm_clock_step_mhz
        fits = [f for f, p in self._points if p <= fit_w]
        over = [f for f, p in self._points if p > fit_w]
        best = max(fits) if fits else None
        lo = best if best is not None else facts.min_sm_clock_mhz - step
        hi = min(over) if over else facts.max_sm_clock_mhz + step
        if hi - lo <= step or self._measured_in_search >= self._max_points:
            return None
        guess = self._predict(facts, fit_w)
        if best is not None and guess <= best:
            # The model says nothing above ``best`` fits: believe it when it is clearly so,
            # else confirm the next clock up.
            predicted = self._power_at(facts, best + step)
            if predicted is not None and predicted > fit_w * (1.0 + self._confirm):
                return None
            guess = best + step
        if not lo < guess < hi:
            guess = facts.snap_clock_mhz((lo + hi) / 2.0)
            if not lo < guess < hi:
                return None
        return guess

    def _start_search(self, obs: Observation, why: str) -> tuple[Decision, ...]:
        facts = obs.gpus[0].facts
        assert self._budget_w is not None
        setpoint = self._budget_w * (1.0 - self._margin)
        self._searches += 1
        self._measured_in_search = 0
        self._state = ClockState.SEARCHING
        guess = self._predict(facts, setpoint)
        return (self._lock(obs, guess, f"SM clocks locked at {guess} MHz", why),)

    def tick(self, obs: Observation) -> tuple[Decision, ...]:
        """One control tick (see ``ClockState`` for the transitions)."""
        budget = obs.budget_w
        self._since_change += 1
        if budget is None:
            if self._state is ClockState.IDLE:
                return ()
            self._state = ClockState.IDLE
            self._budget_w = None
            self._clock_mhz = None
            return (
                _decision(
                    obs, "clock", "SM clocks unlocked", "no wattage budget any more", self.undo(obs)
                ),
            )
        facts = obs.gpus[0].facts
        if self._state is ClockState.IDLE or budget != self._budget_w:
            first = self._state is ClockState.IDLE
            self._budget_w = budget
            self._points = []
            power = obs.max_power_w()
            locked = obs.gpus[0].locked_max_mhz
            if power is not None and power > facts.idle_power_mw / 1000.0 * 1.2:
                # A busy GPU: its current clock and power are a measured point.
                self._points.append((locked or facts.max_sm_clock_mhz, power))
            why = (
                f"budget {budget:.0f} W per GPU"
                if first
                else f"budget changed to {budget:.0f} W per GPU"
            )
            return self._start_search(obs, why)
        # Keep the lock in place if someone reset it.
        if any(g.locked_max_mhz != self._clock_mhz for g in obs.gpus) and self._since_change >= 1:
            assert self._clock_mhz is not None
            return (
                self._lock(obs, self._clock_mhz, "SM clock lock re-applied", "the lock drifted",
                           reapply=True),
            )
        if self._since_change < self._hold_ticks:
            return ()
        power = obs.max_power_w()
        if power is None or self._clock_mhz is None:
            return ()
        setpoint = budget * (1.0 - self._margin)
        if self._state is ClockState.HOLDING:
            held = self._held_power_w or power
            moved = abs(power - held) > self._recheck * held
            self._off_ticks = self._off_ticks + 1 if moved else 0
            if self._off_ticks < 2 and power <= budget * (1.0 + WINDOW_TOLERANCE):
                return ()
            self._points = [(self._clock_mhz, power)]
            self._off_ticks = 0
            return self._start_search(
                obs, f"power at {self._clock_mhz} MHz moved from {held:.0f} W to {power:.0f} W"
            )
        # SEARCHING: record the point, then predict the next clock or stop.
        self._points = [p for p in self._points if p[0] != self._clock_mhz]
        self._points.append((self._clock_mhz, power))
        self._measured_in_search += 1
        guess = self._next_clock(facts, setpoint)
        if guess is not None:
            return (
                self._lock(
                    obs,
                    guess,
                    f"SM clocks locked at {guess} MHz",
                    f"{self._clock_mhz} MHz measured {power:.0f} W against a "
                    f"{setpoint:.0f} W setpoint",
                ),
            )
        fits = [f for f, p in self._points if p <= setpoint]
        best = max(fits) if fits else None
        final = best if best is not None else facts.min_sm_clock_mhz
        self._state = ClockState.HOLDING
        self._off_ticks = 0
        self._held_power_w = dict(self._points).get(final, power)
        if final != self._clock_mhz:
            return (
                self._lock(
                    obs,
                    final,
                    f"SM clocks held at {final} MHz",
                    f"the highest measured clock under {setpoint:.0f} W",
                ),
            )
        return (
            _decision(
                obs,
                "clock",
                f"SM clocks held at {final} MHz",
                f"{power:.0f} W fits the {setpoint:.0f} W setpoint; the next clock does not",
                (),
            ),
        )

    def undo(self, obs: Observation) -> tuple[Command, ...]:
        """Unlock the SM clocks of every GPU of the job."""
        return tuple(ResetClocks(g.facts.index) for g in obs.gpus)


# --- soft: pacing ----------------------------------------------------------------------------


class SoftState(enum.StrEnum):
    """States of ``SoftController``.

    - ``IDLE``: no budget, pace 0.
    - ``WAITING``: a budget, but no step time reported yet (pace needs it).
    - ``ADJUSTING``: a new duty was sent; waiting ``hold_ticks`` (the client picks directives up
      at its next report, and the 1 s average needs a second more).
    - ``TRACKING``: settled; each tick re-estimates the plant and moves the duty only when the
      change is larger than the deadband.
    """

    IDLE = "idle"
    WAITING = "waiting"
    ADJUSTING = "adjusting"
    TRACKING = "tracking"


BUSY_DROP = 0.2
"""A fall in the soft controller's busy-power estimate larger than this share is confirmed first."""


class SoftController:
    """``soft`` mode: no privileges; the client sleeps ``pace_s`` after each step.

    Pacing makes the GPU alternate between busy bursts and idle gaps, so over NVML's 1 s window
    its power is ``P = P_idle + d * (P_busy - P_idle)``, with duty ``d = t_step / (t_step + pace)``
    -- linear in ``d``. The controller is a model-based feed-forward with an adaptive (integral)
    trim, chosen over a plain PI loop because the plant is known to be linear in duty with one
    unknown (``P_busy``) and a dead time of 1-2 ticks: a PI tuned for that dead time needs many
    ticks to settle and overshoots when the load changes, whereas re-estimating ``P_busy`` from
    each settled measurement (``P_busy = P_idle + (P - P_idle) / d``) and inverting the model
    lands on the setpoint in one step -- the estimate is the integral state. Only settled
    measurements (``hold_ticks`` after a change) update it, so nothing integrates during the
    dead time; the duty is clamped to ``[min_duty, 1]``, and because the state is an estimate of
    the plant rather than an accumulated error, saturation cannot wind it up (anti-windup by
    construction); it is not updated while the GPU idles (a paused job), and a deadband keeps
    the duty from dithering. The first
    duty, before ``P_busy`` is measured, assumes ``P_busy`` = the card's maximum limit: safe.

    Micro-batch directives are not used: a smaller micro-batch (with more accumulation steps)
    changes power by a workload-specific amount that is not monotone on every model (kernel
    efficiency, memory traffic) and usually costs more energy per token, while pacing's effect
    is linear and exactly known. ``SetMicroBatch`` stays in the vocabulary for the daemon.

    Args:
        margin: Setpoint = ``budget * (1 - margin)``.
        hold_ticks: Ticks after a new pace before its effect is measured.
        min_duty: Lowest duty (the job keeps stepping), 0..1.
        deadband: Relative duty change below which nothing is sent.
    """

    mode = "soft"

    def __init__(
        self,
        *,
        margin: float = 0.015,
        hold_ticks: int = 3,
        min_duty: float = 0.02,
        deadband: float = 0.01,
    ) -> None:
        self._margin = margin
        self._hold_ticks = hold_ticks
        self._min_duty = min_duty
        self._deadband = deadband
        self._state = SoftState.IDLE
        self._duty = 1.0
        self._busy_w: float | None = None
        self._budget_w: float | None = None
        self._since_change = 0
        self._adjustments = 0
        self._drops = 0

    @property
    def state(self) -> str:
        """The current ``SoftState``."""
        return self._state.value

    @property
    def duty(self) -> float:
        """The duty the controller asks for, 0..1."""
        return self._duty

    @property
    def busy_power_w(self) -> float | None:
        """The estimated power of a busy (unpaced) GPU, W."""
        return self._busy_w

    @property
    def adjustments(self) -> int:
        """How many pace changes were sent."""
        return self._adjustments

    def _send(self, obs: Observation, duty: float, why: str) -> tuple[Decision, ...]:
        step_s = obs.step_time_s
        assert step_s is not None
        self._duty = duty
        pace = 0.0 if duty >= 1.0 else step_s * (1.0 / duty - 1.0)
        self._since_change = 0
        self._adjustments += 1
        self._state = SoftState.ADJUSTING
        return (
            _decision(
                obs,
                "soft",
                f"pace {pace:.3f} s per step (duty {duty:.3f})",
                why,
                [SetPace(round(pace, 4))],
            ),
        )

    def tick(self, obs: Observation) -> tuple[Decision, ...]:
        """One control tick (see ``SoftState`` for the transitions)."""
        budget = obs.budget_w
        self._since_change += 1
        if budget is None:
            if self._state is SoftState.IDLE:
                return ()
            self._state = SoftState.IDLE
            self._budget_w = None
            self._duty = 1.0
            return (
                _decision(obs, "soft", "pacing off", "no wattage budget any more", self.undo(obs)),
            )
        if obs.step_time_s is None or obs.step_time_s <= 0:
            self._state = SoftState.WAITING
            return ()
        facts = obs.gpus[0].facts
        idle_w = facts.idle_power_mw / 1000.0
        setpoint = budget * (1.0 - self._margin)
        power = obs.max_power_w()
        new_budget = budget != self._budget_w
        if self._state in (SoftState.IDLE, SoftState.WAITING) or new_budget:
            self._budget_w = budget
            busy = self._busy_w
            if busy is None:
                # Unpaced power is busy power; otherwise assume the worst (the max limit).
                unpaced = obs.pace_s == 0 and power is not None and power > idle_w * 1.2
                busy = power if unpaced and power is not None else facts.max_limit_mw / 1000.0
                self._busy_w = busy
            return self._send(
                obs,
                self._duty_for(setpoint, idle_w, busy),
                f"budget {budget:.0f} W per GPU; busy power about {busy:.0f} W",
            )
        if self._since_change < self._hold_ticks or power is None:
            return ()
        # A settled measurement: re-estimate busy power, the integral state.
        # The duty in force is what the client obeys (its pace), not what was asked.
        duty_now = _duty_of(obs.step_time_s, obs.pace_s)
        if duty_now > 0.05 and power > idle_w * 1.2:  # not while the job idles (paused)
            estimate = idle_w + (power - idle_w) / duty_now
            # A large drop is believed only once it has lasted ``hold_ticks`` ticks: a job
            # that stalls for a moment (a data-loader hiccup, a starved CPU) draws little at
            # the same duty, and unpacing it then would overshoot the budget when it resumes.
            big_drop = self._busy_w is not None and estimate < self._busy_w * (1 - BUSY_DROP)
            self._drops = self._drops + 1 if big_drop else 0
            if big_drop and self._drops < self._hold_ticks:
                return ()
            self._busy_w = estimate
        busy = self._busy_w or facts.max_limit_mw / 1000.0
        want = self._duty_for(setpoint, idle_w, busy)
        if self._state is SoftState.ADJUSTING:
            self._state = SoftState.TRACKING
        over = power > budget * (1.0 + WINDOW_TOLERANCE / 2)
        if abs(want - self._duty) <= self._deadband * self._duty and not over:
            return ()
        return self._send(
            obs,
            want,
            f"measured {power:.0f} W at duty {duty_now:.3f} against a "
            f"{setpoint:.0f} W setpoint (busy about {busy:.0f} W)",
        )

    def _duty_for(self, setpoint: float, idle_w: float, busy_w: float) -> float:
        if busy_w <= setpoint:
            return 1.0
        span = busy_w - idle_w
        duty = (setpoint - idle_w) / span if span > 0 else 1.0
        return min(max(duty, self._min_duty), 1.0)

    def undo(self, obs: Observation) -> tuple[Command, ...]:
        """Stop pacing."""
        return (SetPace(0.0),)


def _duty_of(step_time_s: float, pace_s: float) -> float:
    return step_time_s / (step_time_s + max(pace_s, 0.0))


# --- mode choice -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModeChoice:
    """The enforcement mode a job runs in, and why."""

    mode: Literal["hw", "clock", "soft"]
    reason: str


def choose_mode(
    requested: Mode, *, hw_permitted: bool, clocks_permitted: bool = True
) -> ModeChoice:
    """Resolve ``auto`` (and refuse nothing): the daemon probes permission once at start.

    Args:
        requested: The job's mode.
        hw_permitted: Whether setting power limits worked when probed (root / CAP_SYS_ADMIN).
        clocks_permitted: Whether locking clocks worked when probed.

    Raises:
        ValueError: ``hw`` or ``clock`` requested where the daemon may not set them, or an
            unknown mode.
    """
    if requested == "auto":
        if hw_permitted:
            return ModeChoice("hw", "auto: the daemon may set power limits, so hw")
        return ModeChoice(
            "soft",
            "auto: the daemon may not set power limits on these GPUs "
            "(permission denied when probed), so soft (pacing)",
        )
    if requested == "hw":
        if not hw_permitted:
            raise ValueError(
                "hw mode needs permission to set power limits (root or "
                "CAP_SYS_ADMIN); use --mode soft or auto"
            )
        return ModeChoice("hw", "hw requested")
    if requested == "clock":
        if not clocks_permitted:
            raise ValueError(
                "clock mode needs permission to lock clocks (root or "
                "CAP_SYS_ADMIN); use --mode soft or auto"
            )
        return ModeChoice("clock", "clock requested")
    if requested == "soft":
        return ModeChoice("soft", "soft requested")
    raise ValueError(f"unknown mode {requested!r}: choose hw, clock, soft or auto")


def make_controller(mode: Literal["hw", "clock", "soft"]) -> PowerController:
    """A fresh controller for a resolved mode (see ``choose_mode``)."""
    if mode == "hw":
        return HwController()
    if mode == "clock":
        return ClockController()
    if mode == "soft":
        return SoftController()
    raise ValueError(f"unknown mode {mode!r}: choose hw, clock or soft")


# --- energy budgets --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forecast:
    """A job's energy forecast at one tick.

    Attributes:
        at_s: Tick time, s.
        energy_j: Energy the job used so far, J.
        total_j: Forecast total energy, J; None for an unknown end.
        remaining_s: Forecast time left, s; None for an unknown end.
        power_w: Recent mean power of the job (all its GPUs), W.
        basis: What the end is known from: ``steps``, ``tokens``, ``deadline`` or
            ``unknown end``.
    """

    at_s: float
    energy_j: float
    total_j: float | None
    remaining_s: float | None
    power_w: float
    basis: Literal["steps", "tokens", "deadline", "unknown end"]


class EnergyForecast:
    """Forecasts a job's total energy from its progress: energy so far + rate x what remains.

    The rate is measured over the last ``window_s`` (so a ``slow`` setting shows in the forecast
    within that window): joules per step (or token) when the client declared total steps (or
    tokens), else power against the time left to ``deadline_s``, else the end is unknown.
    While no progress is made (a pause), the last rate measured with progress is used.

    Args:
        total_steps: Steps the job declared it will run, or None.
        total_tokens: Tokens the job declared it will process, or None.
        deadline_s: When the job must end (same time origin as ``update``'s ``now_s``), or None.
        window_s: Length of the rate window, s.
    """

    def __init__(
        self,
        *,
        total_steps: int | None = None,
        total_tokens: int | None = None,
        deadline_s: float | None = None,
        window_s: float = 30.0,
    ) -> None:
        self._total_steps = total_steps
        self._total_tokens = total_tokens
        self._deadline_s = deadline_s
        self._window_s = window_s
        # (time s, energy J, energy J while making progress, steps, tokens)
        self._history: deque[tuple[float, float, float, float, float]] = deque()
        self._stalled_j = 0.0
        self._j_per_unit: float | None = None
        self._units_per_s: float | None = None

    def declare(self, total_steps: int | None, total_tokens: int | None) -> None:
        """Take totals the job declared after the forecast began (a submitted job's client
        declares them in its progress reports, after the daemon started following it)."""
        if total_steps is not None:
            self._total_steps = total_steps
        if total_tokens is not None:
            self._total_tokens = total_tokens

    def update(self, now_s: float, energy_j: float, steps: float, tokens: float) -> Forecast:
        """Add one reading (energy so far in J, steps and tokens done) and forecast.

        Returns:
            The forecast at ``now_s``.
        """
        hist = self._history
        if hist and steps <= hist[-1][3] and tokens <= hist[-1][4]:
            # No progress (a pause): its energy does not count into the rate per step.
            self._stalled_j += energy_j - hist[-1][1]
        hist.append((now_s, energy_j, energy_j - self._stalled_j, steps, tokens))
        while len(hist) > 2 and hist[1][0] <= now_s - self._window_s:
            hist.popleft()
        t0, e0, a0, s0, k0 = hist[0]
        dt = now_s - t0
        power_w = (energy_j - e0) / dt if dt > 0 else 0.0
        de = energy_j - self._stalled_j - a0
        if self._total_steps is not None or self._total_tokens is not None:
            by_steps = self._total_steps is not None
            done = steps if by_steps else tokens
            total = float((self._total_steps if by_steps else self._total_tokens) or 0)
            d_units = done - (s0 if by_steps else k0)
            if d_units > 0 and dt > 0:
                self._j_per_unit = de / d_units
                self._units_per_s = d_units / dt
            basis: Literal["steps", "tokens"] = "steps" if by_steps else "tokens"
            left = max(total - done, 0.0)
            if self._j_per_unit is None or self._units_per_s is None:
                return Forecast(now_s, energy_j, None, None, power_w, basis)
            return Forecast(
                now_s,
                energy_j,
                energy_j + left * self._j_per_unit,
                left / self._units_per_s,
                power_w,
                basis,
            )
        if self._deadline_s is not None:
            left_s = max(self._deadline_s - now_s, 0.0)
            return Forecast(
                now_s, energy_j, energy_j + power_w * left_s, left_s, power_w, "deadline"
            )
        return Forecast(now_s, energy_j, None, None, power_w, "unknown end")


class EnergyAction(enum.StrEnum):
    """What ``EnergyGuard`` asks the daemon to do."""

    WARN = "warn"
    SLOW = "slow"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class EnergyEvent:
    """One energy-budget action, as the daemon stores and logs it.

    Attributes:
        at_s: Tick time, s.
        action: What to do.
        why: Why, in words (budget, forecast, energy so far in Wh).
        energy_j: Energy used so far, J.
        forecast_j: The forecast total, J (None: unknown end).
    """

    at_s: float
    action: EnergyAction
    why: str
    energy_j: float
    forecast_j: float | None


class GuardState(enum.StrEnum):
    """States of ``EnergyGuard``.

    - ``WITHIN``: the forecast fits the budget.
    - ``EXCEEDED``: the forecast crossed the budget and ``warn`` / ``slow`` was done (or a
      paused job was resumed by hand); back to ``WITHIN`` once the forecast falls under
      ``budget * (1 - hysteresis)``, so the next crossing acts again.
    - ``PAUSED``: paused; ``RESUME`` when the budget is raised above the forecast or on
      ``resume``.
    - ``STOP_ARMED``: the forecast crossed under the ``stop`` policy: the job runs until its
      energy plus what it draws while stopping would reach the budget, then ``STOP``.
    - ``STOPPED``: terminal.
    """

    WITHIN = "within"
    EXCEEDED = "exceeded"
    PAUSED = "paused"
    STOP_ARMED = "stop_armed"
    STOPPED = "stopped"


def _wh(joules: float) -> str:
    return f"{joules / 3600.0:.2f} Wh"


class EnergyGuard:
    """Turns a job's energy forecast into its ``--on-exceed`` policy, once per crossing.

    Args:
        budget_j: The job's energy budget, J.
        on_exceed: ``warn``, ``slow`` (move to the least-energy setting the optimiser knows),
            ``pause`` or ``stop``.
        stop_lead_s: For ``stop``: how long the job keeps drawing power after the decision (one
            control tick plus the client's reaction and shutdown), s. The job is stopped when
            ``energy + power * stop_lead_s`` reaches the budget, so it ends just under it.
        hysteresis: The forecast must fall this share under the budget to re-arm.

    Raises:
        ValueError: A non-positive budget or an unknown policy.
    """

    def __init__(
        self,
        budget_j: float,
        on_exceed: Literal["warn", "slow", "pause", "stop"],
        *,
        stop_lead_s: float = 2.0,
        hysteresis: float = 0.02,
    ) -> None:
        if not budget_j > 0:
            raise ValueError(f"an energy budget must be positive, got {budget_j} J")
        if on_exceed not in ("warn", "slow", "pause", "stop"):
            raise ValueError(f"unknown --on-exceed {on_exceed!r}: choose warn, slow, pause, stop")
        self._budget_j = float(budget_j)
        self._policy = on_exceed
        self._lead_s = stop_lead_s
        self._hyst = hysteresis
        self._state = GuardState.WITHIN
        self._last: Forecast | None = None
        self._resume_requested = False

    @property
    def state(self) -> str:
        """The current ``GuardState``."""
        return self._state.value

    @property
    def budget_j(self) -> float:
        """The energy budget, J."""
        return self._budget_j

    def set_budget(self, budget_j: float) -> None:
        """Change the budget (``powertrain budget``); takes effect at the next tick."""
        if not budget_j > 0:
            raise ValueError(f"an energy budget must be positive, got {budget_j} J")
        self._budget_j = float(budget_j)

    def resume(self) -> None:
        """The user resumes a paused job by hand; the next tick answers ``RESUME``."""
        if self._state is GuardState.PAUSED:
            self._resume_requested = True

    def tick(self, forecast: Forecast) -> EnergyEvent | None:
        """One control tick: the action to take now, if any (see ``GuardState``)."""
        self._last = forecast
        energy = forecast.energy_j
        # With an unknown end the energy so far is the only lower bound of the total.
        expected = max(forecast.total_j if forecast.total_j is not None else energy, energy)
        budget = self._budget_j
        crossed = expected > budget
        state = self._state

        def event(action: EnergyAction, why: str) -> EnergyEvent:
            return EnergyEvent(forecast.at_s, action, why, energy, forecast.total_j)

        summary = (
            f"forecast {_wh(expected)} ({forecast.basis}) against a budget of "
            f"{_wh(budget)}; {_wh(energy)} used"
        )
        if state is GuardState.STOPPED:
            return None
        if state is GuardState.PAUSED:
            if self._resume_requested or not crossed:
                by_hand = self._resume_requested
                self._resume_requested = False
                self._state = GuardState.EXCEEDED if crossed else GuardState.WITHIN
                return event(
                    EnergyAction.RESUME,
                    ("resumed by hand; " if by_hand else "the budget now fits; ") + summary,
                )
            return None
        if self._policy == "stop" and energy + forecast.power_w * self._lead_s >= budget:
            self._state = GuardState.STOPPED
            return event(
                EnergyAction.STOP,
                f"energy would reach the budget within {self._lead_s:.0f} s; " + summary,
            )
        if state is GuardState.WITHIN:
            if not crossed:
                return None
            if self._policy == "warn":
                self._state = GuardState.EXCEEDED
                return event(EnergyAction.WARN, summary)
            if self._policy == "slow":
                self._state = GuardState.EXCEEDED
                return event(EnergyAction.SLOW, "moving to the least-energy setting; " + summary)
            if self._policy == "pause":
                self._state = GuardState.PAUSED
                return event(EnergyAction.PAUSE, "pausing (the client checkpoints); " + summary)
            self._state = GuardState.STOP_ARMED
            return event(
                EnergyAction.WARN, "will stop when its energy reaches the budget; " + summary
            )
        # EXCEEDED or STOP_ARMED: re-arm once the forecast is back under the budget.
        if expected <= budget * (1.0 - self._hyst):
            self._state = GuardState.WITHIN
        return None


# --- node cap --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobPower:
    """One running job as the node-cap guard sees it.

    Attributes:
        job_id: The job.
        priority: Higher runs first; the lowest is tightened first.
        gpus: How many GPUs it holds.
        power_w: Its measured power, all its GPUs together (1 s averages), W.
        budget_w: Its own wattage budget per GPU, W; None: unconstrained.
        floor_w: The lowest per-GPU budget its mode can hold (the card's minimum limit), W.
    """

    job_id: int
    priority: int
    gpus: int
    power_w: float
    budget_w: float | None
    floor_w: float


@dataclass(frozen=True, slots=True)
class NodeCapDecision:
    """What the node-cap guard changed at one tick.

    Attributes:
        at_s: Tick time, s.
        node_power_w: Measured node power (1 s averages of every GPU), W.
        budgets_w: Effective per-GPU budget of every job it tracks, W (None: unconstrained).
        changed: Jobs whose effective budget changed, in the order changed.
        sentence: What it did, in words.
    """

    at_s: float
    node_power_w: float
    budgets_w: dict[int, float | None]
    changed: tuple[int, ...]
    sentence: str


@dataclass(slots=True)
class _CapHold:
    budget_w: float  # effective per-GPU budget the guard imposes
    since_s: float  # when it last changed
    uncapped_w: float  # the job's per-GPU power when first tightened
    defiant: bool = False


class NodeCapGuard:
    """Holds a node's power cap at run time: tightens the lowest-priority jobs first.

    It reads node power as the sum of every GPU's 1 s average: a cap breach shows within a
    tick, before a 10 s window has filled with it (the acceptance bar is on 10 s windows, so
    reacting to the 1 s reading leaves the controllers time to settle). Jobs already tightened
    count at their effective budget while they settle, so one breach is answered once, not
    every tick (no wind-up). A job that stays over its effective budget for ``obey_grace_s``
    (an attached job without control, a client that ignores pacing) counts at what it draws,
    and the next job down is tightened instead. Headroom is given back, highest priority first,
    only after the node has stayed ``relax_margin`` under the cap for ``relax_after_s``, and only
    as much as the headroom, so relaxing never overshoots into another breach.

    Args:
        cap_w: The node cap, W.
        margin: Tighten to ``cap * (1 - margin)``.
        relax_margin: Relax only while the node is this share under the cap.
        relax_after_s: ...for this long, s.
        obey_grace_s: Time a tightened job gets to come down, s.
    """

    def __init__(
        self,
        cap_w: float,
        *,
        margin: float = 0.03,
        relax_margin: float = 0.08,
        relax_after_s: float = 10.0,
        obey_grace_s: float = 15.0,
    ) -> None:
        if not cap_w > 0:
            raise ValueError(f"a node cap must be positive, got {cap_w} W")
        self._cap_w = float(cap_w)
        self._margin = margin
        self._relax_margin = relax_margin
        self._relax_after_s = relax_after_s
        self._grace_s = obey_grace_s
        self._holds: dict[int, _CapHold] = {}
        self._headroom_since: float | None = None

    @property
    def cap_w(self) -> float:
        """The node cap, W."""
        return self._cap_w

    def effective_budget_w(self, job: JobPower) -> float | None:
        """The per-GPU budget the job's controller should hold now, W (None: unconstrained)."""
        hold = self._holds.get(job.job_id)
        if hold is None:
            return job.budget_w
        return hold.budget_w if job.budget_w is None else min(hold.budget_w, job.budget_w)

    def tick(
        self, now_s: float, node_power_w: float, jobs: Sequence[JobPower]
    ) -> NodeCapDecision | None:
        """One control tick; returns what changed, or None.

        Args:
            now_s: Tick time, s.
            node_power_w: Every GPU's 1 s average power summed (free GPUs and unknown loads
                included), W.
            jobs: The running jobs.
        """
        running = {j.job_id for j in jobs}
        for gone in [i for i in self._holds if i not in running]:
            del self._holds[gone]
        notes: list[str] = []
        expected: dict[int, float] = {}
        for j in jobs:
            hold = self._holds.get(j.job_id)
            eff = self.effective_budget_w(j)
            if hold is None or eff is None:
                expected[j.job_id] = j.power_w
                continue
            over = j.power_w > eff * j.gpus * (1.0 + 2 * WINDOW_TOLERANCE)
            if over and now_s - hold.since_s >= self._grace_s:
                if not hold.defiant:
                    notes.append(
                        f"job {j.job_id} does not come down to its {eff:.0f} W per GPU "
                        f"(draws {j.power_w / j.gpus:.0f} W per GPU)"
                    )
                hold.defiant = True
            elif not over:
                hold.defiant = False
            expected[j.job_id] = j.power_w if hold.defiant else min(j.power_w, eff * j.gpus)
        other_w = node_power_w - sum(j.power_w for j in jobs)
        expected_node = other_w + sum(expected.values())
        setpoint = self._cap_w * (1.0 - self._margin)
        changed: list[int] = []
        if expected_node > setpoint:
            self._headroom_since = None
            excess = expected_node - setpoint
            for j in sorted(jobs, key=lambda j: (j.priority, -j.job_id)):
                hold = self._holds.get(j.job_id)
                if excess <= 0 or (hold is not None and hold.defiant):
                    continue
                give = expected[j.job_id] - j.floor_w * j.gpus
                cut = min(give, excess)
                if cut <= 0.5:
                    continue
                new_w = (expected[j.job_id] - cut) / j.gpus
                if hold is None and j.budget_w is not None and new_w >= j.budget_w:
                    excess -= cut  # its own budget takes it lower (it is still settling)
                    continue
                before = self.effective_budget_w(j)
                uncapped = hold.uncapped_w if hold else j.power_w / j.gpus
                self._holds[j.job_id] = _CapHold(new_w, now_s, uncapped)
                excess -= cut
                changed.append(j.job_id)
                was = "unconstrained" if before is None else f"{before:.0f} W per GPU"
                notes.append(
                    f"job {j.job_id} (priority {j.priority}) held to {new_w:.0f} W per "
                    f"GPU (was {was})"
                )
            head = (
                f"node at {node_power_w:.0f} W (expected {expected_node:.0f} W) over the "
                f"{self._cap_w:.0f} W cap less {self._margin:.0%}"
            )
            if excess > 0.5:
                notes.append(f"{excess:.0f} W cannot be taken from the jobs on this node")
        elif node_power_w <= self._cap_w * (1.0 - self._relax_margin) and self._holds:
            if self._headroom_since is None:
                self._headroom_since = now_s
            head = (
                f"node at {node_power_w:.0f} W, under the {self._cap_w:.0f} W cap for "
                f"{now_s - self._headroom_since:.0f} s"
            )
            if now_s - self._headroom_since >= self._relax_after_s:
                headroom = setpoint - node_power_w
                by_rank = sorted(jobs, key=lambda j: (-j.priority, j.job_id))
                for j in by_rank:
                    hold = self._holds.get(j.job_id)
                    if hold is None or headroom <= 0.5:
                        continue
                    new_w = hold.budget_w + headroom / j.gpus
                    ceiling = j.budget_w if j.budget_w is not None else hold.uncapped_w
                    changed.append(j.job_id)
                    if new_w >= ceiling:
                        headroom -= (ceiling - hold.budget_w) * j.gpus
                        del self._holds[j.job_id]
                        own = (
                            "unconstrained"
                            if j.budget_w is None
                            else f"its own {j.budget_w:.0f} W per GPU"
                        )
                        notes.append(f"job {j.job_id} back to {own}")
                    else:
                        notes.append(
                            f"job {j.job_id} relaxed to {new_w:.0f} W per GPU "
                            f"(was {hold.budget_w:.0f} W)"
                        )
                        hold.budget_w, hold.since_s = new_w, now_s
                        headroom = 0.0
                self._headroom_since = now_s
        else:
            self._headroom_since = None
            head = ""
        if not changed and not notes:
            return None
        return NodeCapDecision(
            at_s=now_s,
            node_power_w=node_power_w,
            budgets_w={j.job_id: self.effective_budget_w(j) for j in jobs},
            changed=tuple(changed),
            sentence=head + ": " + "; ".join(notes) if notes else head,
        )
