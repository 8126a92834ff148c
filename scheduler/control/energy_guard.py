"""Energy budgets: ``EnergyForecast`` forecasts a job's total, ``EnergyGuard`` acts on crossings.

The forecast is energy so far plus the recent rate times what remains; the guard turns crossings
of the budget into warn / slow / pause / resume / stop, once per crossing.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Literal

from energy.units import j_to_wh
from scheduler.jobs import OnExceed

__all__ = [
    "EnergyAction",
    "EnergyEvent",
    "EnergyForecast",
    "EnergyGuard",
    "Forecast",
    "GuardState",
]


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
    return f"{j_to_wh(joules):.2f} Wh"


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
        on_exceed: OnExceed | str,
        *,
        stop_lead_s: float = 2.0,
        hysteresis: float = 0.02,
    ) -> None:
        if not budget_j > 0:
            raise ValueError(f"an energy budget must be positive, got {budget_j} J")
        try:
            policy = OnExceed(on_exceed)
        except ValueError:
            raise ValueError(
                f"unknown --on-exceed {on_exceed!r}: choose warn, slow, pause, stop"
            ) from None
        self._budget_j = float(budget_j)
        self._policy = policy
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
        if self._policy is OnExceed.STOP and energy + forecast.power_w * self._lead_s >= budget:
            self._state = GuardState.STOPPED
            return event(
                EnergyAction.STOP,
                f"energy would reach the budget within {self._lead_s:.0f} s; " + summary,
            )
        if state is GuardState.WITHIN:
            if not crossed:
                return None
            if self._policy is OnExceed.WARN:
                self._state = GuardState.EXCEEDED
                return event(EnergyAction.WARN, summary)
            if self._policy is OnExceed.SLOW:
                self._state = GuardState.EXCEEDED
                return event(EnergyAction.SLOW, "moving to the least-energy setting; " + summary)
            if self._policy is OnExceed.PAUSE:
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
