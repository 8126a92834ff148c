"""clock mode: ``ClockController`` locks SM clocks at the highest clock whose measured power fits.
"""

from __future__ import annotations

import enum

from energy.units import mw_to_w
from scheduler.control._shared import WINDOW_TOLERANCE, decision
from scheduler.control.commands import (
    Command,
    Decision,
    GpuFacts,
    LockClocks,
    Observation,
    ResetClocks,
)
from scheduler.jobs import Mode

__all__ = ["ClockController", "ClockState"]


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

    mode = Mode.CLOCK

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
        return decision(obs, "clock", what, why, cmds)

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
            f1, p1 = facts.max_sm_clock_mhz, mw_to_w(facts.max_limit_mw)
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
                decision(
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
            if power is not None and power > mw_to_w(facts.idle_power_mw) * 1.2:
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
            decision(
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

