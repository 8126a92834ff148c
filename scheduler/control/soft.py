"""soft mode: ``SoftController`` holds a job's budget without privileges by pacing its steps,
and, where the job's loop declares micro-batches, by the micro-batch that gives the most
throughput within the budget.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from energy.units import mw_to_w
from scheduler.control._shared import WINDOW_TOLERANCE, decision
from scheduler.control.commands import (
    Command,
    Decision,
    Observation,
    SetMicroBatch,
    SetPace,
)
from scheduler.jobs import Mode

__all__ = ["BUSY_DROP", "RESTART_CHANGE", "SoftController", "SoftState"]


class SoftState(enum.StrEnum):
    """States of ``SoftController``.

    Pacing:

    - ``IDLE``: no budget, pace 0, the loop's own micro-batch.
    - ``WAITING``: a budget, but no step time reported yet (pace needs it).
    - ``ADJUSTING``: a new duty was sent; waiting ``hold_ticks`` (the client picks directives up
      at its next report, and the 1 s average needs a second more).
    - ``TRACKING``: settled; each tick re-estimates the plant and moves the duty only when the
      change is larger than the deadband.

    The micro-batch search (only for a job that declared at least two micro-batches, and only
    while the budget binds, duty < 1):

    - ``MEASURING``: tracking, settled for ``settle_ticks`` (throughput is a 5 s average), with a
      neighbour micro-batch not yet tried under this budget: averages the incumbent's steps/s
      and power. A pace change within ``RESTART_CHANGE`` of the duty leaves it measuring; a
      larger one drops the average and goes back to ``ADJUSTING``. The average complete ->
      ``TRYING`` (the neighbour, at a safe duty); the budget stopped binding -> ``TRACKING``.
    - ``TRYING``: the neighbour's micro-batch is in force; pacing goes on as in ``ADJUSTING`` /
      ``TRACKING`` without leaving this state (its busy power is re-estimated, its duty set),
      and once settled for ``settle_ticks`` after the last change larger than
      ``RESTART_CHANGE``, its steps/s and power are averaged. Measurably more throughput within
      the budget -> ``TRACKING`` with it as the incumbent; otherwise, or when the loop withdrew
      it (out of memory), or it never settled -> back to the incumbent at its known busy power,
      ``ADJUSTING``.

    Any state: the budget gone -> ``IDLE`` (pace 0, the loop's own micro-batch); a new budget,
    or the step time lost -> re-entry as from ``IDLE`` (a trial in force is abandoned for the
    incumbent; a new budget may try every neighbour again).
    """

    IDLE = "idle"
    WAITING = "waiting"
    ADJUSTING = "adjusting"
    TRACKING = "tracking"
    MEASURING = "measuring"
    TRYING = "trying"


BUSY_DROP = 0.2
"""A fall in the soft controller's busy-power estimate larger than this share is confirmed first."""


RESTART_CHANGE = 0.25
"""A pace change larger than this share of the duty restarts the soft controller's throughput
averages (the first correction after a trial starts, a load change). Smaller ones do not:
tracking corrects the duty on the noise of the 1 s power (by a percent to ten, every few ticks
where the power is noisy), restarting at each would starve the averages, and such a change
moves steps/s and power together for a few ticks of a long average."""


class _Keep(enum.Enum):
    """``_send``'s default: the micro-batch directive stays as it is."""

    KEEP = "keep"


@dataclass(slots=True)
class _Sample:
    """Throughput and power averaged over settled ticks at one micro-batch."""

    ticks: int = 0
    steps_sum: float = 0.0
    power_sum: float = 0.0

    def add(self, steps_per_s: float, power_w: float) -> None:
        self.ticks += 1
        self.steps_sum += steps_per_s
        self.power_sum += power_w

    @property
    def steps_per_s(self) -> float:
        return self.steps_sum / self.ticks if self.ticks else 0.0

    @property
    def power_w(self) -> float:
        return self.power_sum / self.ticks if self.ticks else 0.0


@dataclass(frozen=True, slots=True)
class _Incumbent:
    """The micro-batch the search measures trials against, and how to go back to it."""

    size: int  # its micro-batch, samples
    directive: int | None  # what ``SetMicroBatch`` asks for it (None: the loop's own)
    busy_w: float  # its busy power as last estimated, W
    sample: _Sample  # its throughput and power while holding the budget


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

    The micro-batch, where the job's loop declared the ones it allows (at a fixed global batch:
    gradient accumulation keeps it, so steps/s is proportional to samples/s): holding the budget
    ``B`` takes ``d = (B - P_idle) / (P_busy(m) - P_idle)``, so the throughput ``d / t_step(m)``
    is proportional to ``1 / ((P_busy(m) - P_idle) * t_step(m))`` -- the micro-batch with the
    least dynamic energy per step gives the most throughput within the budget. Which one that is
    is workload-specific (kernel efficiency, memory traffic; not monotone on every model) and
    not predictable from the power alone, so it is measured, a hill climb over neighbours: once
    tracking has settled with a budget that binds (``d < 1``), the incumbent's steps/s is
    averaged, then the next larger micro-batch is tried (the next smaller where the larger did
    not help), started at the duty that is safe for an unknown busy power (the card's maximum
    limit) and paced like any other plant change, and its settled steps/s compared. It is kept
    only when it is measurably better: ``trial_gain`` more steps/s, its average scaled down to
    the incumbent's measured power where it drew more (so a trial never wins by drawing more),
    and its average power within the budget; otherwise the incumbent comes back at its known
    busy power and pacing goes on alone. Each micro-batch is tried at most once per budget, so
    the search ends; a job without declared micro-batches, or whose budget does not bind, is
    paced exactly as without it. ``undo`` gives the loop its own micro-batch back.

    Args:
        margin: Setpoint = ``budget * (1 - margin)``.
        hold_ticks: Ticks after a new pace before its effect is measured.
        min_duty: Lowest duty (the job keeps stepping), 0..1.
        deadband: Relative duty change below which nothing is sent.
        settle_ticks: Ticks without a change before throughput is averaged for the micro-batch
            search (``hold_ticks`` plus the 5 s over which the daemon measures steps/s).
        measure_ticks: Fewest settled ticks one micro-batch's throughput is averaged over; more,
            up to four times as many, until about ``measure_steps`` steps were counted (steps/s
            comes from whole steps, so a slow job needs a longer average).
        measure_steps: Steps to count, roughly, before a throughput average is believed.
        trial_gain: Relative gain in steps/s a trial micro-batch needs to be kept.
    """

    mode = Mode.SOFT

    def __init__(
        self,
        *,
        margin: float = 0.015,
        hold_ticks: int = 3,
        min_duty: float = 0.02,
        deadband: float = 0.01,
        settle_ticks: int = 8,
        measure_ticks: int = 10,
        measure_steps: float = 30.0,
        trial_gain: float = 0.03,
    ) -> None:
        self._margin = margin
        self._hold_ticks = hold_ticks
        self._min_duty = min_duty
        self._deadband = deadband
        self._settle_ticks = settle_ticks
        self._measure_ticks = measure_ticks
        self._measure_steps = measure_steps
        self._trial_gain = trial_gain
        self._state = SoftState.IDLE
        self._duty = 1.0
        self._busy_w: float | None = None
        self._budget_w: float | None = None
        self._since_change = 0
        self._adjustments = 0
        self._drops = 0
        # The micro-batch search.
        self._calm = 0  # ticks since the last change or stall (throughput settles after them)
        self._sample: _Sample | None = None  # the average being taken (MEASURING, TRYING)
        self._incumbent: _Incumbent | None = None  # while TRYING: what the trial must beat
        self._trial: int | None = None  # while TRYING: the micro-batch on trial
        self._trial_ticks = 0
        self._tried: set[int] = set()  # micro-batches measured under this budget
        self._micro_batch: int | None = None  # the directive this controller asks for
        self._moved = False  # a micro-batch directive was sent since the last undo

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

    @property
    def micro_batch(self) -> int | None:
        """The micro-batch directive the controller asks for (None: the loop's own)."""
        return self._micro_batch

    def _send(
        self,
        obs: Observation,
        duty: float,
        why: str,
        *,
        micro_batch: int | _Keep | None = _Keep.KEEP,
        what: str = "",
        state: SoftState = SoftState.ADJUSTING,
    ) -> tuple[Decision, ...]:
        """A new duty, and a new micro-batch directive unless ``micro_batch`` is ``KEEP``."""
        step_s = obs.step_time_s
        assert step_s is not None
        commands: list[Command] = []
        pace = 0.0 if duty >= 1.0 else step_s * (1.0 / duty - 1.0)
        moving = False
        if not isinstance(micro_batch, _Keep):
            moving = True
            # Both reach the client at its next report; where they are applied one at a time,
            # the order keeps the step between them under both: the lower duty first, the
            # micro-batch first where the duty rises.
            self._micro_batch = micro_batch
            self._moved = True
            commands.append(SetMicroBatch(micro_batch))
        pace_cmd = SetPace(round(pace, 4))
        commands.insert(0 if duty <= self._duty else len(commands), pace_cmd)
        if moving or not self._is_small_change(duty):
            self._calm = 0  # throughput settles anew; an average being taken is void
            self._sample = None
        self._duty = duty
        self._since_change = 0
        self._adjustments += 1
        self._state = state
        return (
            decision(
                obs,
                "soft",
                what or f"pace {pace:.3f} s per step (duty {duty:.3f})",
                why,
                commands,
            ),
        )

    def tick(self, obs: Observation) -> tuple[Decision, ...]:
        """One control tick (see ``SoftState`` for the transitions)."""
        budget = obs.budget_w
        self._since_change += 1
        self._calm += 1
        if budget is None:
            if self._state is SoftState.IDLE:
                return ()
            commands = self.undo(obs)
            self._state = SoftState.IDLE
            self._budget_w = None
            self._duty = 1.0
            self._end_trial()
            self._tried.clear()
            self._micro_batch = None
            self._moved = False
            moved = len(commands) > 1
            if moved:  # the busy power estimated was another micro-batch's
                self._busy_w = None
            what = "pacing off" + (", the loop's own micro-batch" if moved else "")
            return (decision(obs, "soft", what, "no wattage budget any more", commands),)
        if obs.step_time_s is None or obs.step_time_s <= 0:
            self._state = SoftState.WAITING
            return ()
        facts = obs.gpus[0].facts
        idle_w = mw_to_w(facts.idle_power_mw)
        max_w = mw_to_w(facts.max_limit_mw)
        setpoint = budget * (1.0 - self._margin)
        power = obs.max_power_w()
        new_budget = budget != self._budget_w
        if self._state in (SoftState.IDLE, SoftState.WAITING) or new_budget:
            self._budget_w = budget
            if new_budget:
                self._tried.clear()  # a new budget may try every micro-batch again
            back: int | _Keep | None = _Keep.KEEP
            if self._incumbent is not None:  # a trial in force: abandoned for the incumbent
                back = self._incumbent.directive
                self._busy_w = self._incumbent.busy_w
                self._drops = 0
            self._end_trial()
            busy = self._busy_w
            if busy is None:
                # Unpaced power is busy power; otherwise assume the worst (the max limit).
                unpaced = obs.pace_s == 0 and power is not None and power > idle_w * 1.2
                busy = power if unpaced and power is not None else max_w
                self._busy_w = busy
            return self._send(
                obs,
                self._duty_for(setpoint, idle_w, busy),
                f"budget {budget:.0f} W per GPU; busy power about {busy:.0f} W",
                micro_batch=back,
            )
        if self._state is SoftState.TRYING:
            self._trial_ticks += 1
            gone = self._trial not in obs.micro_batches
            if gone or self._trial_ticks > 4 * (self._settle_ticks + self._measure_ticks):
                why = "the loop withdrew it" if gone else "its measurement never settled"
                return self._revert(obs, setpoint, idle_w, why)
        if power is not None and self._measure(obs.steps_per_s, power):
            # An average is complete: acted on at once (tracking may correct the duty every
            # few ticks on noisy power, leaving no quiet tick); it supersedes tracking's
            # decision for this tick.
            return self._conclude(obs, budget, setpoint, idle_w, max_w)
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
                self._calm = 0  # a stall spoils the throughput averages too
                self._sample = None
                return ()
            self._busy_w = estimate
        busy = self._busy_w or max_w
        want = self._duty_for(setpoint, idle_w, busy)
        if self._state is SoftState.ADJUSTING:
            self._state = SoftState.TRACKING
        over = power > budget * (1.0 + WINDOW_TOLERANCE / 2)
        if abs(want - self._duty) > self._deadband * self._duty or over:
            # A pace change: a trial goes on; a baseline being measured goes on after a small
            # change, and is dropped after a larger one.
            state = SoftState.ADJUSTING
            if self._state is SoftState.TRYING or (
                self._state is SoftState.MEASURING and self._is_small_change(want)
            ):
                state = self._state
            return self._send(
                obs,
                want,
                f"measured {power:.0f} W at duty {duty_now:.3f} against a "
                f"{setpoint:.0f} W setpoint (busy about {busy:.0f} W)",
                state=state,
            )
        return self._search(obs, power)

    # -- the micro-batch search -------------------------------------------------------------------

    def _search(self, obs: Observation, power: float) -> tuple[Decision, ...]:
        """A quiet tracking tick: TRACKING -> MEASURING where the search has a micro-batch to
        try and the budget binds."""
        if (self._state is SoftState.TRACKING and self._calm >= self._settle_ticks
                and self._duty < 1.0 and obs.steps_per_s is not None
                and self._neighbour(obs) is not None):
            self._state = SoftState.MEASURING
            self._sample = None
            self._measure(obs.steps_per_s, power)
        return ()

    def _measure(self, steps_per_s: float | None, power: float) -> bool:
        """Add a tick to the average being taken, once throughput has settled (every tick,
        hold ticks included: a small pace change does not disturb it). Returns whether the
        average is complete: ``measure_ticks`` ticks and about ``measure_steps`` steps, or four
        times the ticks."""
        if (self._state not in (SoftState.MEASURING, SoftState.TRYING) or steps_per_s is None
                or self._calm < self._settle_ticks):
            return False
        if self._sample is None:
            self._sample = _Sample()
        sample = self._sample
        sample.add(steps_per_s, power)
        enough = sample.ticks >= self._measure_ticks and sample.steps_sum >= self._measure_steps
        return enough or sample.ticks >= 4 * self._measure_ticks

    def _conclude(
        self, obs: Observation, budget: float, setpoint: float, idle_w: float, max_w: float
    ) -> tuple[Decision, ...]:
        """An average is complete: the incumbent's (MEASURING -> TRYING) or the trial's
        (TRYING -> TRACKING or ADJUSTING)."""
        sample = self._sample
        assert sample is not None
        if self._state is SoftState.MEASURING:
            return self._start_trial(obs, setpoint, idle_w, max_w, sample)
        return self._judge(obs, budget, setpoint, idle_w, sample)

    def _current(self, obs: Observation) -> int | None:
        """The micro-batch the loop trains in now, if it is one of those it allows."""
        size = obs.micro_batch if obs.micro_batch is not None else obs.default_micro_batch
        return size if size is not None and size in obs.micro_batches else None

    def _neighbour(self, obs: Observation) -> int | None:
        """The next micro-batch to try: the next larger, else the next smaller, untried."""
        allowed = obs.micro_batches
        current = self._current(obs)
        if len(allowed) < 2 or current is None:
            return None
        i = allowed.index(current)
        near = allowed[i + 1: i + 2] + allowed[max(i - 1, 0): i]
        return next((m for m in near if m not in self._tried and m != current), None)

    def _start_trial(
        self, obs: Observation, setpoint: float, idle_w: float, max_w: float, sample: _Sample
    ) -> tuple[Decision, ...]:
        """MEASURING -> TRYING: the neighbour, at the duty safe for any busy power."""
        current = self._current(obs)
        trial = self._neighbour(obs)
        if self._duty >= 1.0 or current is None or trial is None:
            self._state = SoftState.TRACKING  # the budget stopped binding, or nothing to try
            self._sample = None
            return ()
        busy = self._busy_w or max_w
        self._incumbent = _Incumbent(current, obs.micro_batch, busy, sample)
        self._tried.update((current, trial))
        self._trial = trial
        self._trial_ticks = 0
        self._busy_w = max_w  # unknown at the new micro-batch: assume the worst, as at the start
        self._drops = 0
        duty = min(self._duty_for(setpoint, idle_w, max_w), self._duty)
        directive = None if trial == obs.default_micro_batch else trial
        return self._send(
            obs,
            duty,
            f"{sample.steps_per_s:.3f} steps/s at micro-batch {current} within the budget "
            f"(busy about {busy:.0f} W); {trial} may take less energy per step, so more steps "
            f"fit the budget; started at a duty safe for any busy power",
            micro_batch=directive,
            what=f"try micro-batch {trial} (duty {duty:.3f})",
            state=SoftState.TRYING,
        )

    def _judge(
        self, obs: Observation, budget: float, setpoint: float, idle_w: float, sample: _Sample
    ) -> tuple[Decision, ...]:
        """TRYING, measured: keep the trial (-> TRACKING) or go back (-> ADJUSTING)."""
        base = self._incumbent
        trial = self._trial
        assert base is not None and trial is not None
        # A trial that drew more than the incumbent is judged at the incumbent's power
        # (throughput is proportional to dynamic power at a fixed micro-batch).
        scale = 1.0
        if sample.power_w > base.sample.power_w > idle_w:
            scale = (base.sample.power_w - idle_w) / (sample.power_w - idle_w)
        score = sample.steps_per_s * scale
        need = base.sample.steps_per_s * (1.0 + self._trial_gain)
        facts = (
            f"{sample.steps_per_s:.3f} steps/s at {sample.power_w:.0f} W against "
            f"{base.sample.steps_per_s:.3f} at {base.sample.power_w:.0f} W with micro-batch "
            f"{base.size}"
        )
        if score >= need and sample.power_w <= budget:
            self._end_trial()
            self._state = SoftState.TRACKING
            return (
                decision(obs, "soft", f"keep micro-batch {trial}",
                         f"{facts}: more throughput within the budget", ()),
            )
        return self._revert(obs, setpoint, idle_w, f"{facts}: not measurably better")

    def _revert(
        self, obs: Observation, setpoint: float, idle_w: float, why: str
    ) -> tuple[Decision, ...]:
        """TRYING -> ADJUSTING: the incumbent back, at the duty its busy power asks for."""
        base = self._incumbent
        trial = self._trial
        assert base is not None
        self._busy_w = base.busy_w
        self._drops = 0
        self._end_trial()
        return self._send(
            obs,
            self._duty_for(setpoint, idle_w, base.busy_w),
            f"micro-batch {trial}: {why}",
            micro_batch=base.directive,
            what=f"back to micro-batch {base.size}, pacing alone",
        )

    def _is_small_change(self, duty: float) -> bool:
        """Whether a new duty is within ``RESTART_CHANGE`` of the duty in force."""
        return abs(duty - self._duty) <= RESTART_CHANGE * self._duty

    def _end_trial(self) -> None:
        self._incumbent = None
        self._trial = None
        self._sample = None
        self._trial_ticks = 0

    def _duty_for(self, setpoint: float, idle_w: float, busy_w: float) -> float:
        if busy_w <= setpoint:
            return 1.0
        span = busy_w - idle_w
        duty = (setpoint - idle_w) / span if span > 0 else 1.0
        return min(max(duty, self._min_duty), 1.0)

    def undo(self, obs: Observation) -> tuple[Command, ...]:
        """Stop pacing, and give the loop its own micro-batch back where it was moved."""
        if self._moved or obs.micro_batch is not None:
            return (SetPace(0.0), SetMicroBatch(None))
        return (SetPace(0.0),)


def _duty_of(step_time_s: float, pace_s: float) -> float:
    return step_time_s / (step_time_s + max(pace_s, 0.0))
