"""soft mode: ``SoftController`` holds a job's budget without privileges by pacing its steps.
"""

from __future__ import annotations

import enum

from energy.units import mw_to_w
from scheduler.control._shared import WINDOW_TOLERANCE, decision
from scheduler.control.commands import Command, Decision, Observation, SetPace
from scheduler.jobs import Mode

__all__ = ["BUSY_DROP", "SoftController", "SoftState"]


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

    mode = Mode.SOFT

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
            decision(
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
                decision(obs, "soft", "pacing off", "no wattage budget any more", self.undo(obs)),
            )
        if obs.step_time_s is None or obs.step_time_s <= 0:
            self._state = SoftState.WAITING
            return ()
        facts = obs.gpus[0].facts
        idle_w = mw_to_w(facts.idle_power_mw)
        setpoint = budget * (1.0 - self._margin)
        power = obs.max_power_w()
        new_budget = budget != self._budget_w
        if self._state in (SoftState.IDLE, SoftState.WAITING) or new_budget:
            self._budget_w = budget
            busy = self._busy_w
            if busy is None:
                # Unpaced power is busy power; otherwise assume the worst (the max limit).
                unpaced = obs.pace_s == 0 and power is not None and power > idle_w * 1.2
                busy = power if unpaced and power is not None else mw_to_w(facts.max_limit_mw)
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
        busy = self._busy_w or mw_to_w(facts.max_limit_mw)
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

