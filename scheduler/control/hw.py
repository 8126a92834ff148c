"""hw mode: ``HwController`` holds a job's budget with the power limit, trimmed on measured power.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from energy.units import mw_to_w, w_to_mw
from scheduler.control._shared import WINDOW_TOLERANCE, decision
from scheduler.control.commands import (
    Command,
    Decision,
    GpuFacts,
    Observation,
    ResetPowerLimit,
    SetPowerLimit,
)
from scheduler.jobs import Mode

__all__ = ["HwController", "HwState"]


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

    mode = Mode.HW

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
                decision(
                    obs, "hw", "power limits reset", "no wattage budget any more", self.undo(obs)
                ),
            )
        if self._state is HwState.IDLE or budget != self._budget_w:
            self._budget_w = budget
            self._trims = 0
            self._best_fit_mw.clear()
            self._over_ticks = 0
            targets = {g.facts.index: _clamp_limit_mw(g.facts, w_to_mw(budget)) for g in obs.gpus}
            cmds = self._set(obs, targets)
            self._state = HwState.APPLYING
            mw = max(targets.values())
            return (
                decision(
                    obs,
                    "hw",
                    f"power limit {mw_to_w(mw):.0f} W",
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
                decision(
                    obs,
                    "hw",
                    "power limit re-applied",
                    f"GPU {drifted[0].facts.index} limit drifted to "
                    f"{mw_to_w(drifted[0].limit_mw or 0):.0f} W",
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
            binding = power >= mw_to_w(0.85 * max(self._target_mw.values()))
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
                decision(
                    obs,
                    "hw",
                    "power limit back to the best that fitted",
                    f"{power:.0f} W over the {setpoint:.0f} W setpoint",
                    cmds,
                ),
            )
        cap_mw = w_to_mw(budget) * (1.0 + self._max_headroom) if self._trim else w_to_mw(budget)
        step_mw = w_to_mw(aim - power)
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
            decision(
                obs,
                "hw",
                f"power limit trimmed to {mw_to_w(mw):.0f} W",
                f"measured {power:.0f} W against a {setpoint:.0f} W setpoint",
                cmds,
            ),
        )

    def undo(self, obs: Observation) -> tuple[Command, ...]:
        """Reset the power limit of every GPU of the job."""
        return tuple(ResetPowerLimit(g.facts.index) for g in obs.gpus)


def _clamp_limit_mw(facts: GpuFacts, limit_mw: float) -> int:
    return int(min(max(round(limit_mw), facts.min_limit_mw), facts.max_limit_mw))

