"""The energy optimiser: a job's best power limit or SM clock, found online from few probes.

Pure: it never touches a GPU. Whoever drives the job (the scheduler's controller, a benchmark)
applies ``optimizer.setting``, runs ``optimizer.steps_wanted`` training steps, and reports what
they took and cost with ``observe``; the optimiser answers with the setting to use next::

    opt = EnergyOptimizer(SettingSpace.power_limits(100_000, 300_000), ZeusCost(0.5, 300.0))
    while job.running:
        gpu.set_power_limit(0, opt.setting)          # only when it changed
        steps = opt.steps_wanted
        time_s, energy_j = job.run(steps)            # measured: wall time, energy counter delta
        opt.observe(steps, time_s, energy_j)

It is a state machine, like Zeus's ``GlobalPowerLimitOptimizer`` (Ready -> Warmup -> Measuring ->
Done), but it probes less and more carefully:

* It walks the candidate settings from the top down, as Zeus does, and stops once the curve has
  turned: a probe whose cap binds (its power fell below the unconstrained power) and scores worse
  than the best by more than noise and ``rise_tol``, or whose secant with the probe above it
  extrapolates past that margin, turns it. Energy-time curves are convex below their optimum
  where they are smooth, so the secant is a lower bound of what lies further down, and the slow,
  costly settings at the bottom get one short probe at most. Where the cap does not bind, a
  probe costs what running the job costs, so the walk goes on.
* A turn is not trusted on a curve whose shape is uncertain: flat against its noise (a step
  time that hardly moves with the setting) or rough (a measured curve with bumps as large as its
  slope), where one probe can look turned and the curve still falls to the bottom. A turn
  stands only when the probe below it is clearly worse too, no probe so far lies clearly above
  the chord of its neighbours (``rough_tol``), and the gap below, checked at its middle and at
  the bottom, is clearly worse as well; otherwise the walk sweeps every candidate left, with
  probes that end as soon as they are clearly worse. A rise steeper than any bump
  (``steep_tol``) stands at once.
* A probe's first window ends as soon as it is clearly worse than the best so far (``z``
  standard errors, from the step-to-step spread pooled over the search); measuring it longer
  would only cost energy. Once the walk stops, the search races: the best against the
  challenger with the largest expected loss (what committing to the best would cost, on
  average, were the challenger in fact better), measuring whichever of the two is less
  precise. It stops when that expected loss is negligible or a step budget proportional to the
  number of candidates is spent: near-ties get steps only while the choice can still matter,
  and a clear winner ends the search early. Once the job runs at its choice, an unsettled race
  goes on past that budget as the job runs (``race_share``, ``race_extension``): on a flat curve
  every setting is a near-tie, and a long job pays for a wrong choice longest.
* ``MostThroughput`` under a wattage budget bisects the candidates for the highest setting whose
  measured power fits (throughput rises and power rises with the setting), starting at the
  budget itself for power limits.
* The steps the job runs at the chosen setting keep measuring it, at no profiling cost: every
  monitoring window is added to its probe. When that longer measurement shows it worse than
  another probe's estimate, the job moves to that setting (a revision; at most
  ``SearchConfig.revisions`` per search), which is then measured as it runs, and moves back as
  soon as that shows the new setting worse. A probe's short window errs both ways; Zeus's choice
  keeps its luck, this one loses it where it was lucky.
* When the job's throughput at the chosen setting shifts (a new phase: another batch size,
  sequence length, model stage), it searches again.

Objectives are a small strategy interface (``Objective``): least energy, Zeus's eta-weighted
energy-time cost, most throughput within a wattage budget, least energy within a slowdown; each
also takes an optional wattage budget.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Final, Literal, Protocol

from energy.units import mw_to_w, w_to_mw

ObjectiveName = Literal["energy", "cost", "throughput", "slowdown"]
"""The objectives a job may ask for (``submit --objective``); each ``Objective`` class's name."""

__all__ = [
    "UNFINISHED",
    "Done",
    "EnergyOptimizer",
    "Knob",
    "LeastEnergy",
    "LeastEnergyWithinSlowdown",
    "Measuring",
    "MostThroughput",
    "Objective",
    "ObjectiveName",
    "Probe",
    "Ready",
    "SearchConfig",
    "SearchResult",
    "SettingSpace",
    "Verifying",
    "Warmup",
    "ZeusCost",
    "objective_from_name",
    "select",
]


class Knob(enum.StrEnum):
    """A GPU setting powertrain turns: what the optimiser searches over and what the actuators
    set and journal (``scheduler.store.journal``). Values are in NVML's units.

    The one definition of these names: the optimiser's searches, the settings journal and the
    reports all store and show these values.
    """

    POWER_LIMIT = "power_limit"
    """The power limit, value in mW (``nvidia-smi -pl``)."""
    SM_CLOCKS = "sm_clocks"
    """Locked SM clocks, value the top of the range in MHz (``nvidia-smi -lgc``)."""

    @classmethod
    def _missing_(cls, value: object) -> Knob | None:
        # Searches stored before the optimiser and the journal shared this enum say "sm_clock".
        return cls.SM_CLOCKS if value == "sm_clock" else None


@dataclass(frozen=True, slots=True)
class SettingSpace:
    """The settings a search may try.

    Attributes:
        knob: Power limit (values in mW) or locked top SM clock (values in MHz).
        min_value / max_value: The range, inclusive.
        step: Distance between candidates, from ``max_value`` down (mW or MHz).
    """

    knob: Knob
    min_value: int
    max_value: int
    step: int

    def __post_init__(self) -> None:
        if not 0 < self.min_value <= self.max_value:
            raise ValueError(
                f"a setting range needs 0 < min <= max, got {self.min_value}..{self.max_value}"
            )
        if self.step <= 0:
            raise ValueError(f"the step between settings must be positive, got {self.step}")

    @classmethod
    def power_limits(cls, min_mw: int, max_mw: int, step_mw: int = 25_000) -> SettingSpace:
        """Power limits from ``max_mw`` down in ``step_mw`` steps (Zeus's 25 W by default)."""
        return cls(Knob.POWER_LIMIT, min_mw, max_mw, step_mw)

    @classmethod
    def sm_clocks(cls, min_mhz: int, max_mhz: int, step_mhz: int = 90) -> SettingSpace:
        """Locked top SM clocks from ``max_mhz`` down in ``step_mhz`` steps."""
        return cls(Knob.SM_CLOCKS, min_mhz, max_mhz, step_mhz)

    def candidates(self) -> tuple[int, ...]:
        """Every candidate, highest first; the minimum is included even off the step grid."""
        values = list(range(self.max_value, self.min_value - 1, -self.step))
        if values[-1] != self.min_value:
            values.append(self.min_value)
        return tuple(values)


@dataclass(frozen=True, slots=True)
class Probe:
    """What one setting measured: a window of training steps after its warm-up.

    Attributes:
        setting: The setting (mW or MHz).
        steps / time_s / energy_j: The measured window (steps, seconds, joules).
        step_time_s: Mean seconds per step.
        power_w: Mean power over the window (W).
        step_time_rse / energy_rse / power_rse: Relative standard errors of the mean step time,
            energy per step and power (``inf`` when the window was too coarse to tell).
        warmup_steps / warmup_time_s / warmup_energy_j: The discarded warm-up before it.
    """

    setting: int
    steps: int
    time_s: float
    energy_j: float
    step_time_s: float
    power_w: float
    step_time_rse: float
    energy_rse: float
    power_rse: float
    warmup_steps: int = 0
    warmup_time_s: float = 0.0
    warmup_energy_j: float = 0.0

    @property
    def energy_per_step_j(self) -> float:
        """Joules per step."""
        return self.energy_j / self.steps

    @property
    def cost_steps(self) -> int:
        """Steps this probe held the job at its setting, warm-up included."""
        return self.steps + self.warmup_steps


class Objective(Protocol):
    """What a search minimises. Scores are per training step; lower is better.

    ``search`` picks the search: ``"descend"`` (walk down with the convexity stop) or
    ``"bisect"`` (find the highest feasible setting, for objectives that only want speed).
    """

    @property
    def name(self) -> str:
        """Short name, as ``--objective`` takes it."""
        ...

    @property
    def search(self) -> Literal["descend", "bisect"]:
        """Which search suits it."""
        ...

    def score(self, probe: Probe, top: Probe) -> float | None:
        """The probe's score, or None when it breaks a constraint. ``top``: the highest probe."""
        ...

    def score_rse(self, probe: Probe) -> float:
        """Relative standard error of ``score`` (from the probe's measurement noise)."""
        ...

    def nothing_below(self, probe: Probe, top: Probe, z: float) -> bool:
        """True when no lower setting than ``probe`` can satisfy the constraints."""
        ...


def _within_budget(probe: Probe, budget_w: float | None, z: float) -> bool:
    """Measured power fits the budget, with ``z`` standard errors to spare."""
    if budget_w is None:
        return True
    rse = probe.power_rse if math.isfinite(probe.power_rse) else 0.0
    return probe.power_w * (1.0 + z * rse) <= budget_w


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def _expected_loss(gap: float, sd: float) -> float:
    """``E[max(0, -X)]`` for ``X ~ Normal(gap, sd)``: how much worse, on average, keeping the
    best is than a challenger that measured ``gap`` worse with standard error ``sd``."""
    if sd <= 0 or not math.isfinite(sd):
        return max(0.0, -gap) if math.isfinite(sd) else math.inf
    z = gap / sd
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    cdf_neg = 0.5 * math.erfc(z / math.sqrt(2.0))
    return sd * pdf - gap * cdf_neg


#: Standard errors of headroom the constraints keep (``power + z*SE <= budget``).
_CONSTRAINT_Z = 2.0


@dataclass(frozen=True, slots=True)
class LeastEnergy:
    """Least energy per step (J), optionally within a wattage budget (W)."""

    power_budget_w: float | None = None
    name: ClassVar[ObjectiveName] = "energy"
    search: ClassVar[Literal["descend", "bisect"]] = "descend"

    def score(self, probe: Probe, top: Probe) -> float | None:
        if not _within_budget(probe, self.power_budget_w, _CONSTRAINT_Z):
            return None
        return probe.energy_per_step_j

    def score_rse(self, probe: Probe) -> float:
        return probe.energy_rse

    def nothing_below(self, probe: Probe, top: Probe, z: float) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class ZeusCost:
    """Zeus's cost per step: ``eta * E + (1 - eta) * max_power_w * T`` (J).

    Attributes:
        eta: Weight of energy against time, 0..1 (Zeus's eta knob).
        max_power_w: The job's maximum power (W): the top power limit times its GPU count.
        power_budget_w: Optional wattage budget (W).
    """

    eta: float
    max_power_w: float
    power_budget_w: float | None = None
    name: ClassVar[ObjectiveName] = "cost"
    search: ClassVar[Literal["descend", "bisect"]] = "descend"

    def __post_init__(self) -> None:
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must lie in 0..1, got {self.eta}")
        if self.max_power_w <= 0:
            raise ValueError(f"max_power_w must be positive, got {self.max_power_w}")

    def score(self, probe: Probe, top: Probe) -> float | None:
        if not _within_budget(probe, self.power_budget_w, _CONSTRAINT_Z):
            return None
        return (
            self.eta * probe.energy_per_step_j
            + (1.0 - self.eta) * self.max_power_w * probe.step_time_s
        )

    def score_rse(self, probe: Probe) -> float:
        e = self.eta * probe.energy_per_step_j
        t = (1.0 - self.eta) * self.max_power_w * probe.step_time_s
        # The two terms move together (a slow step also costs energy): add their errors.
        return (e * probe.energy_rse + t * probe.step_time_rse) / (e + t)

    def nothing_below(self, probe: Probe, top: Probe, z: float) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class MostThroughput:
    """Most throughput (least time per step) whose measured power fits a wattage budget (W)."""

    power_budget_w: float
    name: ClassVar[ObjectiveName] = "throughput"
    search: ClassVar[Literal["descend", "bisect"]] = "bisect"

    def __post_init__(self) -> None:
        if self.power_budget_w <= 0:
            raise ValueError(f"the wattage budget must be positive, got {self.power_budget_w}")

    def score(self, probe: Probe, top: Probe) -> float | None:
        if not _within_budget(probe, self.power_budget_w, _CONSTRAINT_Z):
            return None
        return probe.step_time_s

    def score_rse(self, probe: Probe) -> float:
        return probe.step_time_rse

    def nothing_below(self, probe: Probe, top: Probe, z: float) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class LeastEnergyWithinSlowdown:
    """Least energy per step with at most ``max_slowdown`` (0.1 = 10 %) more time per step than
    at the top setting; optionally within a wattage budget (W)."""

    max_slowdown: float
    power_budget_w: float | None = None
    name: ClassVar[ObjectiveName] = "slowdown"
    search: ClassVar[Literal["descend", "bisect"]] = "descend"

    def __post_init__(self) -> None:
        if self.max_slowdown < 0:
            raise ValueError(f"max_slowdown must be >= 0, got {self.max_slowdown}")

    def score(self, probe: Probe, top: Probe) -> float | None:
        if not _within_budget(probe, self.power_budget_w, _CONSTRAINT_Z):
            return None
        if probe.step_time_s > (1.0 + self.max_slowdown) * top.step_time_s:
            return None
        return probe.energy_per_step_j

    def score_rse(self, probe: Probe) -> float:
        return probe.energy_rse

    def nothing_below(self, probe: Probe, top: Probe, z: float) -> bool:
        # Lower settings only run slower: once a probe is clearly too slow, all below are too.
        rse = math.hypot(_finite(probe.step_time_rse), _finite(top.step_time_rse))
        return probe.step_time_s > (1.0 + self.max_slowdown) * top.step_time_s * (1.0 + z * rse)


def objective_from_name(
    name: str,
    *,
    max_power_w: float,
    eta: float = 0.5,
    power_budget_w: float | None = None,
    max_slowdown: float = 0.1,
) -> Objective:
    """An objective from its ``--objective`` name: energy, cost, throughput or slowdown.

    Args:
        name: ``energy``, ``cost``, ``throughput`` (needs ``power_budget_w``) or ``slowdown``.
        max_power_w: The job's top power (W): top limit times GPU count (for ``cost``).
        eta: Energy weight of ``cost``.
        power_budget_w: The job's wattage budget (W), a constraint on every objective.
        max_slowdown: Allowed slowdown of ``slowdown`` (0.1 = 10 %).

    Raises:
        ValueError: Unknown name, or ``throughput`` without a budget.
    """
    if name == "energy":
        return LeastEnergy(power_budget_w)
    if name == "cost":
        return ZeusCost(eta, max_power_w, power_budget_w)
    if name == "throughput":
        if power_budget_w is None:
            raise ValueError("objective 'throughput' needs a wattage budget")
        return MostThroughput(power_budget_w)
    if name == "slowdown":
        return LeastEnergyWithinSlowdown(max_slowdown, power_budget_w)
    raise ValueError(
        f"unknown objective {name!r}; choose one of: energy, cost, throughput, slowdown"
    )


@dataclass(frozen=True, slots=True)
class SearchConfig:
    """How the search measures and when it stops. Counts are training steps.

    Attributes:
        wait_steps: Steps to let pass before the first probe (compilation, cudnn autotune).
        warmup_steps / warmup_s: A probe's discarded warm-up after a setting changes: at least
            this many steps and seconds (NVML applies a power limit within about 100 ms).
        min_measure_steps / screen_steps: Bounds of a probe's first window; it ends between them
            as soon as the probe is clearly worse than the best so far.
        budget_steps_per_candidate: The whole search spends at most this many steps per
            candidate setting: ``k * budget_steps_per_candidate`` over ``k`` candidates, however
            they are shared out, counting the measured steps and ``warmup_steps`` per warm-up
            (a warm-up that fast steps stretch to ``warmup_s`` is charged no more). Zeus takes
            50 steps per candidate (10 warm-up, 40 measured); 24 is under half of that.
        refine_window / loss_tol: Once the walk stops, the search races the best against the
            challenger with the largest expected loss (how much worse, on average, committing to
            the best would be if the challenger were in fact better, given both scores'
            standard errors), ``refine_window`` steps at a time, on whichever of the two is
            measured less precisely. It stops when the summed expected loss of committing falls
            below ``loss_tol`` (relative to the best score) or the budget is spent: steps go to
            near-ties only while the choice can still matter.
        z: Standard errors that make two scores "clearly different".
        rise_tol: Relative margin above the best score that turns the walk down (with ``z``).
        rough_tol: A probe more than this (relative to the best score) and ``z`` standard
            errors above the chord of its two neighbours on the grid makes the curve rough: no
            turn is trusted, and the walk sweeps every candidate.
        steep_tol: A turning probe more than this above the best (relative) is a rise no bump
            makes: the turn stands at once, without the probes that confirm a milder one.
        bind_drop / bind_share: A cap binds when the power drawn fell by ``bind_drop`` (relative,
            against the top probe) and, for a power limit, reaches ``bind_share`` of the limit.
        monitor_s / monitor_min_steps: Length of the windows that watch throughput once done.
        shift_tol / shift_windows: A throughput shift of more than ``shift_tol`` (relative) in
            this many windows in a row starts a new search.
        revisions: The most times a search's choice is revised once done: the monitoring
            windows add to the held setting's probe, and whenever another probe scores better,
            the job moves there (after a warm-up). 0 revisions keeps the first choice.
        race_extension / race_share: Once done, a race still unsettled when the budget is spent
            may spend ``race_share`` of the steps measured at the held setting more, up to
            ``race_extension`` times the budget (0 keeps to the budget).
    """

    wait_steps: int = 1
    warmup_steps: int = 2
    warmup_s: float = 0.1
    min_measure_steps: int = 8
    screen_steps: int = 16
    budget_steps_per_candidate: int = 24
    refine_window: int = 16
    loss_tol: float = 0.0005
    z: float = 3.0
    rise_tol: float = 0.05
    rough_tol: float = 0.02
    steep_tol: float = 0.25
    bind_share: float = 0.8
    bind_drop: float = 0.05
    monitor_s: float = 60.0
    monitor_min_steps: int = 20
    shift_tol: float = 0.15
    shift_windows: int = 2
    revisions: int = 20
    race_extension: float = 0.25
    race_share: float = 0.01

    def __post_init__(self) -> None:
        if self.wait_steps < 0 or self.warmup_steps < 0 or self.warmup_s < 0:
            raise ValueError("wait and warm-up must not be negative")
        if not 2 <= self.min_measure_steps <= self.screen_steps:
            raise ValueError("need 2 <= min_measure_steps <= screen_steps")
        if self.budget_steps_per_candidate < 1 or self.refine_window < 1:
            raise ValueError("budget_steps_per_candidate and refine_window must be >= 1")
        if self.loss_tol < 0:
            raise ValueError(f"loss_tol must be >= 0, got {self.loss_tol}")
        if self.monitor_min_steps < 1 or self.shift_windows < 1 or self.shift_tol <= 0:
            raise ValueError("monitor windows, shift windows and shift tolerance must be positive")
        if self.revisions < 0:
            raise ValueError(f"revisions must be >= 0, got {self.revisions}")
        if min(self.rough_tol, self.steep_tol, self.race_extension) < 0 or not (
            0 <= self.race_share <= 1
        ):
            raise ValueError("need rough_tol, steep_tol, race_extension >= 0 and 0 <= race_share "
                             "<= 1")


@dataclass(slots=True)
class _Window:
    """Running sums over a window of observations, each covering ``n`` steps."""

    steps: int = 0
    time_s: float = 0.0
    energy_j: float = 0.0
    chunks: int = 0
    # Step-weighted sums of per-step time, energy and power and their squares (for variances).
    _t2: float = 0.0
    _e2: float = 0.0
    _p: float = 0.0
    _p2: float = 0.0

    def add(self, steps: int, time_s: float, energy_j: float) -> None:
        t, e = time_s / steps, energy_j / steps
        p = energy_j / time_s if time_s > 0 else 0.0
        self.steps += steps
        self.time_s += time_s
        self.energy_j += energy_j
        self.chunks += 1
        self._t2 += steps * t * t
        self._e2 += steps * e * e
        self._p += steps * p
        self._p2 += steps * p * p

    def merge(self, other: _Window) -> None:
        """Add another window's observations (of the same setting) to this one."""
        self.steps += other.steps
        self.time_s += other.time_s
        self.energy_j += other.energy_j
        self.chunks += other.chunks
        self._t2 += other._t2
        self._e2 += other._e2
        self._p += other._p
        self._p2 += other._p2

    def _rse(self, mean: float, sum_sq: float) -> float:
        """Relative standard error of a step-weighted mean: per-step variance is estimated as
        ``sum n_i (x_i - mean)^2 / (k - 1)`` over the k chunks."""
        if self.chunks < 2 or mean <= 0:
            return math.inf
        var_step = max(0.0, sum_sq - self.steps * mean * mean) / (self.chunks - 1)
        return math.sqrt(var_step / self.steps) / mean

    def probe(self, setting: int, warmup: _Window) -> Probe:
        t = self.time_s / self.steps
        e = self.energy_j / self.steps
        p_weighted = self._p / self.steps
        return Probe(
            setting=setting,
            steps=self.steps,
            time_s=self.time_s,
            energy_j=self.energy_j,
            step_time_s=t,
            power_w=self.energy_j / self.time_s if self.time_s > 0 else 0.0,
            step_time_rse=self._rse(t, self._t2),
            energy_rse=self._rse(e, self._e2),
            power_rse=self._rse(p_weighted, self._p2),
            warmup_steps=warmup.steps,
            warmup_time_s=warmup.time_s,
            warmup_energy_j=warmup.energy_j,
        )


def _pool(probes: Sequence[Probe]) -> dict[str, tuple[float, float]]:
    """Per attribute (``step_time_rse``, ``energy_rse``, ``power_rse``): the sum of
    ``(n - 1) * per-step relative variance`` over the probes, and their degrees of freedom."""
    sums = {}
    for attr in ("step_time_rse", "energy_rse", "power_rse"):
        num = dof = 0.0
        for p in probes:
            rse = getattr(p, attr)
            if p.steps > 1 and math.isfinite(rse):
                num += (p.steps - 1) * rse * rse * p.steps
                dof += p.steps - 1
        sums[attr] = (num, dof)
    return sums


# -- states ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Ready:
    """Waiting ``steps_left`` steps at the top setting before the first probe.

    Ready -> Warmup once they have passed.
    """

    steps_left: int


@dataclass(slots=True)
class Warmup:
    """A setting was just applied; its first steps are discarded.

    Warmup -> Measuring after ``warmup_steps`` steps and ``warmup_s`` seconds.
    """

    setting: int
    window: _Window = field(default_factory=_Window)


@dataclass(slots=True)
class Measuring:
    """Measuring a setting.

    Measuring -> Warmup (the next setting) when the window is decided and the search goes on;
    Measuring -> Done when the search stops.
    """

    setting: int
    warmup: _Window
    window: _Window = field(default_factory=_Window)


@dataclass(slots=True)
class Done:
    """Holding the chosen setting and watching the job's throughput.

    Done -> Warmup (a new search from the top) when the throughput shifts for
    ``shift_windows`` windows in a row, or on ``retune``. Done -> Done at another setting on a
    revision.

    Attributes:
        setting: The setting in force.
        feasible: False when no setting met the constraints (the lowest one is held).
        reference_step_time_s: Seconds per step the chosen setting is expected to take.
        warmup: After a change of setting, the steps still discarded while it takes hold (None
            once it has).
        charge_warmup: Whether that warm-up is profiling (the way back from a verification).
        revisions: Revisions made since the search.
        checked_steps: The held setting's measured steps when the choice was last looked at.
    """

    setting: int
    feasible: bool
    reference_step_time_s: float
    window: _Window = field(default_factory=_Window)
    shifted_windows: int = 0
    warmup: _Window | None = None
    charge_warmup: bool = False
    revisions: int = 0
    checked_steps: int = 0


@dataclass(slots=True)
class Verifying:
    """Done, but a challenger of the held setting is measured for a window (after a warm-up).

    Verifying -> Done once the window is measured: back at the held setting, or at the
    challenger when it now scores better.
    """

    setting: int
    held: Done
    warmup: _Window = field(default_factory=_Window)
    window: _Window = field(default_factory=_Window)


State = Ready | Warmup | Measuring | Done | Verifying


UNFINISHED: Final = "unfinished"
"""How ``EnergyOptimizer.so_far`` starts the reason of a search still in progress."""


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One finished search.

    Attributes:
        setting: The chosen setting (mW or MHz); when not ``feasible``, the lowest probed.
        feasible: Whether the chosen setting meets the objective's constraints.
        score: Its score (per step), None when not feasible.
        probes: Every probe, in the order taken.
        profiling_steps / profiling_time_s / profiling_energy_j: What the probes cost the job
            (warm-ups included): steps, seconds, joules. Revisions add nothing: the windows that
            lead to one run the setting held at the time, as the job would anyway.
        reason: Why the search stopped, in words, and any revision since.
        revisions: How many times the choice was revised after the search.
    """

    setting: int
    feasible: bool
    score: float | None
    probes: tuple[Probe, ...]
    profiling_steps: int
    profiling_time_s: float
    profiling_energy_j: float
    reason: str
    revisions: int = 0


def select(
    probes: Sequence[Probe], objective: Objective
) -> tuple[Probe, float] | None:
    """The best probe for an objective and its score, or None when none is feasible.

    The top probe (highest setting) is the reference for slowdowns. Use it to re-select from an
    earlier search without probing again (e.g. the scheduler's ``slow`` energy-budget action
    picking the least-energy setting from the probes of a ``cost`` search).
    """
    if not probes:
        return None
    top = max(probes, key=lambda p: p.setting)
    scored = [(p, s) for p in probes if (s := objective.score(p, top)) is not None]
    if not scored:
        return None
    return min(scored, key=lambda ps: (ps[1], -ps[0].setting))


class EnergyOptimizer:
    """Finds the best setting of one job online; see the module docstring for how to drive it.

    Args:
        space: The settings to search (power limits in mW, or top SM clocks in MHz).
        objective: What to minimise (``LeastEnergy``, ``ZeusCost``, ``MostThroughput``,
            ``LeastEnergyWithinSlowdown``, or any ``Objective``).
        config: Measurement and stopping parameters.
    """

    def __init__(
        self, space: SettingSpace, objective: Objective, config: SearchConfig | None = None
    ) -> None:
        self.space = space
        self.objective = objective
        self.config = config if config is not None else SearchConfig()
        self._candidates = space.candidates()
        self.state: State = Ready(self.config.wait_steps)
        self.setting: int = self._candidates[0]
        self.results: list[SearchResult] = []
        self._probes: list[Probe] = []
        #: Every window measured per setting in this search: (measured, warm-up).
        self._windows: dict[int, tuple[_Window, _Window]] = {}
        #: ``_pooled`` of each probe in ``_probes`` (by id), and the sums behind it, until they
        #: change.
        self._pooled_cache: dict[int, Probe] = {}
        self._pool_sums: dict[str, tuple[float, float]] | None = None
        self._refining = False
        self._race_window = self.config.refine_window
        #: Budget spent by this search: measured steps, and ``warmup_steps`` per warm-up.
        self._spent = 0
        #: The most steps one search may spend: measured, and ``warmup_steps`` per warm-up.
        self._budget_steps = self.config.budget_steps_per_candidate * len(self._candidates)
        self._stop_reason = ""
        self._bisect_first = True
        #: The walk's latest setting (the bottom check is not on the walk).
        self._walked = self._candidates[0]
        #: Settings below a turn still to probe before it stands (``_gap_checks``).
        self._checks: list[int] = []
        #: The bottom did not confirm a turn: walk every candidate left, and why.
        self._sweep = False
        self._sweep_reason = ""
        #: A turn seen at the walk's latest probe (which the probe below must confirm), or
        #: the confirmed turn while the gap below is checked.
        self._turn = ""
        if self.config.wait_steps == 0:
            self._start_search()

    # -- what the driver reads -----------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Whether a search has finished and its setting is held."""
        return isinstance(self.state, Done)

    @property
    def settled(self) -> bool:
        """Whether the search is done and its choice can no longer be revised (a throughput
        shift or ``retune`` still starts a new search)."""
        st = self.state
        return isinstance(st, Done) and st.revisions >= self.config.revisions

    @property
    def result(self) -> SearchResult | None:
        """The latest finished search, if any."""
        return self.results[-1] if self.results else None

    def so_far(self) -> SearchResult | None:
        """The search as it stands: the finished one once done; else the one in progress as if
        it stopped now, at its best probe so far, with a ``reason`` that starts with
        ``UNFINISHED`` (for a job that ends mid-search). None before any probe is complete."""
        if isinstance(self.state, Done | Verifying):
            return self.result
        if not self._probes:
            return None
        steps, time_s, energy_j = self._open_cost()
        best = self._best()
        probes = tuple(self._probes)
        if best is None:
            chosen = min(probes, key=lambda p: p.power_w)
            return SearchResult(chosen.setting, False, None, probes, steps, time_s, energy_j,
                                f"{UNFINISHED}; no setting so far met the constraints")
        return SearchResult(best[0].setting, True, best[1], probes, steps, time_s, energy_j,
                            f"{UNFINISHED}; the best of {len(probes)} settings probed so far")

    @property
    def probes(self) -> tuple[Probe, ...]:
        """The probes of the search in progress (or of the last one, once done)."""
        if isinstance(self.state, Done) and self.results:
            return self.results[-1].probes
        return tuple(self._probes)

    @property
    def profiling_steps(self) -> int:
        """Steps spent in warm-ups and probes over all searches (the one in progress too)."""
        return sum(r.profiling_steps for r in self.results) + self._open_cost()[0]

    @property
    def profiling_time_s(self) -> float:
        """Seconds spent in warm-ups and probes over all searches."""
        return sum(r.profiling_time_s for r in self.results) + self._open_cost()[1]

    @property
    def profiling_energy_j(self) -> float:
        """Joules spent in warm-ups and probes over all searches."""
        return sum(r.profiling_energy_j for r in self.results) + self._open_cost()[2]

    @property
    def steps_wanted(self) -> int:
        """Steps to run before the next ``observe`` (the optimiser decides no sooner)."""
        cfg, st = self.config, self.state
        if isinstance(st, Ready):
            return max(1, st.steps_left)
        if isinstance(st, Warmup):
            return self._warmup_left(st.window)
        if isinstance(st, Measuring):
            # Every step of the window on its own, so its spread can be estimated.
            return 1
        if isinstance(st, Verifying):
            return 1 if st.window.steps or self._warmed_up(st.warmup) else (
                self._warmup_left(st.warmup))
        if st.warmup is not None:
            return self._warmup_left(st.warmup)
        wanted = max(cfg.monitor_min_steps, math.ceil(cfg.monitor_s / st.reference_step_time_s))
        return max(1, wanted - st.window.steps)

    # -- what the driver calls -------------------------------------------------------------------

    def observe(self, steps: int, time_s: float, energy_j: float) -> int:
        """Report ``steps`` steps run at ``self.setting``: their wall time and energy.

        Args:
            steps: Training steps completed (at least 1).
            time_s: Their wall time (s).
            energy_j: The energy the job's GPUs drew meanwhile (J), e.g. counter deltas summed.

        Returns:
            The setting to use from now on (``self.setting``).
        """
        if steps < 1 or time_s <= 0 or energy_j < 0:
            raise ValueError(
                f"need steps >= 1, time_s > 0, energy_j >= 0; got {steps}, {time_s}, {energy_j}"
            )
        st = self.state
        if isinstance(st, Ready):
            st.steps_left -= steps
            if st.steps_left <= 0:
                self._start_search()
        elif isinstance(st, Warmup):
            st.window.add(steps, time_s, energy_j)
            if self._warmed_up(st.window):
                self.state = Measuring(st.setting, st.window)
        elif isinstance(st, Measuring):
            st.window.add(steps, time_s, energy_j)
            if self._window_decided(st):
                self._record(st)
                self._advance()
        elif isinstance(st, Verifying):
            self._verify(st, steps, time_s, energy_j)
        else:
            self._watch(st, steps, time_s, energy_j)
        return self.setting

    def retune(self) -> None:
        """Search again from the top, e.g. after the job changed its batch size."""
        self._start_search()

    def discard_window(self) -> None:
        """Drop the measurement in progress (the driver saw a pause: evaluation, checkpoint)."""
        st = self.state
        if isinstance(st, Measuring):
            self.state = Measuring(st.setting, st.warmup)
        elif isinstance(st, Done | Verifying):
            st.window = _Window()

    # -- internals ---------------------------------------------------------------------------------

    def _warmed_up(self, window: _Window) -> bool:
        return window.steps >= self.config.warmup_steps and (
            window.time_s >= self.config.warmup_s
        )

    def _warmup_left(self, window: _Window) -> int:
        """Steps a warm-up still needs (to reach both ``warmup_steps`` and ``warmup_s``)."""
        cfg = self.config
        need = cfg.warmup_steps - window.steps
        if window.steps and window.time_s < cfg.warmup_s:
            need = max(need, math.ceil((cfg.warmup_s - window.time_s) * window.steps
                                       / window.time_s))
        return max(1, need)

    def _open_cost(self) -> tuple[int, float, float]:
        """Steps, seconds and joules of the search in progress."""
        if isinstance(self.state, Done | Ready):
            return 0, 0.0, 0.0
        if isinstance(self.state, Verifying):
            w, u = self.state.window, self.state.warmup
            return w.steps + u.steps, w.time_s + u.time_s, w.energy_j + u.energy_j
        steps = sum(p.cost_steps for p in self._probes)
        time_s = sum(p.time_s + p.warmup_time_s for p in self._probes)
        energy_j = sum(p.energy_j + p.warmup_energy_j for p in self._probes)
        windows = [self.state.window]
        if isinstance(self.state, Measuring):
            windows.append(self.state.warmup)
        for w in windows:
            steps, time_s, energy_j = steps + w.steps, time_s + w.time_s, energy_j + w.energy_j
        return steps, time_s, energy_j

    def _start_search(self) -> None:
        self._probes = []
        self._forget_pool()
        self._windows = {}
        self._refining = False
        self._race_window = self.config.refine_window
        self._spent = 0
        self._stop_reason = ""
        self._bisect_first = True
        self._walked = self._candidates[0]
        self._checks = []
        self._sweep = False
        self._sweep_reason = ""
        self._turn = ""
        self.setting = self._candidates[0]
        self.state = Warmup(self.setting)

    def _top(self) -> Probe:
        return self._probes[0]

    def _score(self, probe: Probe) -> float | None:
        return self.objective.score(probe, self._top() if self._probes else probe)

    def _best(self) -> tuple[Probe, float] | None:
        return select(self._probes, self.objective)

    def _record(self, st: Measuring) -> None:
        """Keep a finished window: a new probe, or more of an earlier one (refinement)."""
        # A warm-up is charged ``warmup_steps`` however long fast steps stretch it to
        # ``warmup_s``, so that fast steps do not starve the race.
        self._spent += st.window.steps + (self.config.warmup_steps if st.warmup.steps else 0)
        if st.setting in self._windows:
            window, warmup = self._windows[st.setting]
            window.merge(st.window)
            warmup.merge(st.warmup)
            self._refresh(st.setting)
        else:
            self._windows[st.setting] = (st.window, st.warmup)
            self._probes.append(st.window.probe(st.setting, st.warmup))
            self._forget_pool()

    def _forget_pool(self) -> None:
        self._pooled_cache.clear()
        self._pool_sums = None

    def _pooled(self, probe: Probe) -> Probe:
        """The probe with standard errors from the per-step spread pooled over this search.

        One job's step-to-step spread hardly depends on the setting, and the few steps of one
        window estimate it poorly; pooling every window's (by degrees of freedom) does better.
        """
        known = any(p is probe for p in self._probes)
        if known and id(probe) in self._pooled_cache:
            return self._pooled_cache[id(probe)]
        if known and self._pool_sums is None:
            self._pool_sums = _pool(self._probes)
        sums = self._pool_sums if known and self._pool_sums is not None else _pool(
            [*self._probes, probe])

        def pooled_rse(attr: str) -> float:
            num, dof = sums[attr]
            return math.sqrt(num / dof / probe.steps) if dof else math.inf

        pooled = replace(
            probe,
            step_time_rse=pooled_rse("step_time_rse"),
            energy_rse=pooled_rse("energy_rse"),
            power_rse=pooled_rse("power_rse"),
        )
        if known:
            self._pooled_cache[id(probe)] = pooled
        return pooled

    def _rse(self, probe: Probe) -> float:
        """Relative standard error of a probe's score, from the pooled spread."""
        return _finite(self.objective.score_rse(self._pooled(probe)))

    def _window_decided(self, st: Measuring) -> bool:
        """Whether the probe in progress has measured enough.

        The top probe, the reference of every later one, is measured in full. A later probe ends
        early only when it is clearly worse than the best so far (or clearly breaks a
        constraint): contenders are measured in full, since the choice among them is what the
        job pays for.
        """
        cfg, w = self.config, st.window
        if self._refining:
            return w.steps >= self._race_window
        if w.steps >= cfg.screen_steps:
            return True
        if w.steps < cfg.min_measure_steps or not self._probes:
            return False
        probe = self._pooled(w.probe(st.setting, st.warmup))
        score = self._score(probe)
        if score is None:
            return True  # the constraints already keep a margin of standard errors
        best = self._best()
        if best is None:
            return False
        best_probe, best_score = best
        both = math.hypot(self._rse(probe), self._rse(best_probe))
        return score > best_score * (1.0 + cfg.z * both)

    def _advance(self) -> None:
        """After a window: move to the next setting, refine, or finish."""
        nxt: int | None = None
        if not self._refining:
            if self.objective.search == "bisect":
                nxt, self._stop_reason = self._next_bisect()
            else:
                nxt, self._stop_reason = self._next_descend()
            self._refining = nxt is None and self.objective.search == "descend"
        if self._refining:
            nxt = self._next_refine()
        if nxt is None:
            self._finish(self._stop_reason)
        elif nxt == self.setting and self._refining:
            # Measuring the same setting again: it is warm already.
            self.state = Measuring(nxt, _Window())
        else:
            self.setting = nxt
            self.state = Warmup(nxt)

    def _race(self) -> tuple[Probe | None, str]:
        """The race's next measurement: the probe to measure, or None and why the race is over.

        The best races the challenger with the largest expected loss: of the two, the one whose
        score is less precise is measured next. The race is over when the expected losses summed
        over challengers fall below ``loss_tol`` of the best score: what is left to learn is
        worth less than it costs to measure.
        """
        best = self._best()
        if best is None:
            return None, "; nothing is feasible"
        best_probe, best_score = best
        top = self._top()
        best_sd = best_score * self._rse(best_probe)
        losses: list[tuple[float, Probe]] = []
        for p in self._probes:
            score = self.objective.score(p, top)
            if score is None or p is best_probe:
                continue
            sd = math.hypot(best_score * self._rse(best_probe), score * self._rse(p))
            losses.append((_expected_loss(score - best_score, sd), p))
        if not losses:
            return None, "; nothing left to race"
        if sum(el for el, _ in losses) <= self.config.loss_tol * best_score:
            return None, "; the choice is settled"
        _, challenger = max(losses, key=lambda lp: lp[0])
        challenger_score = self.objective.score(challenger, top) or best_score
        if best_sd >= challenger_score * self._rse(challenger):
            return best_probe, ""
        return challenger, ""

    def _race_window_for(self, pick: Probe, warmups: int, held: int | None = None) -> int | None:
        """Steps to measure ``pick`` for, within what is left of the budget once ``warmups``
        warm-ups are paid (None: too few).

        A window is at least as long as the warm-up it costs (fast steps need many to fill
        ``warmup_s``), so that switching settings does not eat the budget. Once the search is
        done (``held``: the setting the job holds), an unsettled race may go on past the budget
        as the job runs: ``race_share`` of the steps measured at the held setting, up to
        ``race_extension`` times the budget more (near-ties are where the choice is uncertain,
        and a long job pays for a wrong one longest).
        """
        cfg = self.config
        budget = self._budget_steps
        if held is not None and held in self._windows:
            budget += min(round(cfg.race_extension * self._budget_steps),
                          math.floor(cfg.race_share * self._windows[held][0].steps))
        left = budget - self._spent - warmups * cfg.warmup_steps
        if left < cfg.min_measure_steps:
            return None
        warmup = max(cfg.warmup_steps, math.ceil(cfg.warmup_s / max(pick.step_time_s, 1e-9)))
        return min(max(cfg.refine_window, warmup), left)

    def _next_refine(self) -> int | None:
        """The search's next race window, or None when the search ends.

        It ends when the race is over, when the budget is spent, or when the best is the one
        to measure: the job will run at it, which measures it at no profiling cost, and the
        race goes on from there (``_verify``).
        """
        pick, why = self._race()
        if pick is None:
            self._stop_reason += why
            return None
        best = self._best()
        if best is not None and pick is best[0]:
            self._stop_reason += "; the best is measured further as the job runs at it"
            return None
        window = self._race_window_for(pick, int(pick.setting != self.setting))
        if window is None:
            self._stop_reason += "; the profiling budget is spent"
            return None
        self._race_window = window
        return pick.setting

    def _binds(self, probe: Probe) -> bool:
        """Whether the cap visibly constrains the GPU at this probe.

        It does when the power drawn fell below the top probe's by ``bind_drop`` and clearly more
        than noise, and, for a power limit, comes near the limit (``bind_share``). Where nothing
        binds, score differences are noise or run-to-run variation, and the convexity stop does
        not apply.
        """
        cfg = self.config
        if self.space.knob is Knob.POWER_LIMIT and (
            probe.power_w < mw_to_w(cfg.bind_share * probe.setting)
        ):
            return False
        top = self._top()
        if probe is top:
            return False
        p, t = self._pooled(probe), self._pooled(top)
        noise = cfg.z * math.hypot(_finite(p.power_rse), _finite(t.power_rse))
        return probe.power_w <= top.power_w * (1.0 - max(cfg.bind_drop, noise))

    def _next_descend(self) -> tuple[int | None, str]:
        """The walk's next setting, or None and why it stops.

        The walk stops early only on a turn that the curve's shape makes certain. Energy-time
        curves are convex where they are smooth, so a probe that binds and scores clearly worse
        than the best (or whose secant predicts the next one will) means that nothing below is
        better. But a curve that is flat against its noise (a step time that hardly moves with
        the setting) or rough (measured run to run, with bumps of a few percent) can look turned
        at one probe and still fall further down. So a turn stands only when

        * the probe below it is clearly worse than the best too (one bump is not a turn);
        * no probe so far lies clearly above the chord of its neighbours (a rough curve);
        * the gap below is clearly worse as well, checked at its middle and at the bottom of
          the range (``_gap_checks``).

        When one of these fails, the walk goes on down every candidate left without stopping
        early (a sweep, as Zeus's, but with probes that end as soon as they are clearly worse).
        """
        cfg = self.config
        last = self._probes[-1]
        if self._checks and last.setting == self._checks[0]:
            self._checks.pop(0)
            best = self._best()
            score = self._score(last)
            if best is not None and score is not None and score <= self._margin(best, last):
                self._checks = []
                self._sweep = True
                self._sweep_reason = (
                    f"{self._turn}, but {last.setting} below scores "
                    f"{score / best[1] - 1:+.1%} against the best: the curve is too flat or "
                    "rough to stop early")
            elif self._checks:
                return self._checks[0], ""
            else:
                return None, f"{self._turn}; the settings checked below are clearly worse"
        below = [c for c in self._candidates[self._candidates.index(self._walked) + 1:]
                 if c not in self._windows]
        if not below:
            reason = "every candidate down to the minimum was probed"
            return None, f"{self._sweep_reason}; {reason}" if self._sweep else reason
        nxt = below[0]
        walked = next(p for p in self._probes if p.setting == self._walked)
        if self.objective.nothing_below(walked, self._top(), cfg.z):
            return None, f"no setting below {walked.setting} can meet the constraints"
        if not self._sweep:
            pending, self._turn = self._turn, ""
            turn = self._turned(walked, nxt)
            if turn and self._steep(walked):
                return None, f"{turn}: too steep a rise for a bump"
            if turn and pending and turn.startswith("past"):
                self._turn = f"{pending}, and {turn}"
                rough = self._rough()
                if rough:
                    self._sweep = True
                    self._sweep_reason = f"{self._turn}, but {rough}: the turn may be noise"
                else:
                    self._checks = self._gap_checks(below)
                    if not self._checks:
                        return None, self._turn
                    return self._checks[0], ""
            elif turn:
                # One probe is not a turn: a rough curve may rise at one setting and fall
                # again below it. The probe below must be clearly worse too.
                self._turn = turn
        self._walked = nxt
        return nxt, ""

    @staticmethod
    def _gap_checks(gap: Sequence[int]) -> list[int]:
        """The settings that check a gap of unprobed candidates below a turn (highest first):
        its middle, when at least two lie between it and the bottom, then the bottom."""
        if not gap:
            return []
        checks = [gap[len(gap) // 2]] if len(gap) >= 3 else []
        return [*checks, gap[-1]]

    def _steep(self, probe: Probe) -> bool:
        """Whether ``probe`` scores more than ``steep_tol`` above the best: a rise no bump of a
        rough curve makes, so the turn stands without the probes that would confirm it."""
        best = self._best()
        score = self._score(probe)
        return best is not None and score is not None and score > best[1] * (
            1.0 + self.config.steep_tol)

    def _rough(self) -> str:
        """Why the measured curve is too rough to trust a turn (a probe clearly above the chord
        of its neighbours on the grid: energy-time curves are convex where they are smooth);
        empty when it is not."""
        cfg = self.config
        best = self._best()
        if best is None:
            return ""
        probes = sorted((p for p in self._probes if self._score(p) is not None),
                        key=lambda p: p.setting)
        for a, b, c in zip(probes, probes[1:], probes[2:], strict=False):
            ia, ib, ic = (self._candidates.index(p.setting) for p in (a, b, c))
            if ia != ib + 1 or ib != ic + 1:
                continue  # not neighbours on the grid
            sa, sb, sc = (self._score(p) or 0.0 for p in (a, b, c))
            w = (b.setting - a.setting) / (c.setting - a.setting)
            chord = sa + w * (sc - sa)
            sd = math.sqrt((sb * self._rse(b)) ** 2 + ((1 - w) * sa * self._rse(a)) ** 2
                           + (w * sc * self._rse(c)) ** 2)
            bump = sb - chord
            if bump > max(cfg.rough_tol * best[1], cfg.z * sd):
                return (f"{b.setting} lies {bump / best[1]:+.1%} above the chord of its "
                        "neighbours")
        return ""

    def _margin(self, best: tuple[Probe, float], probe: Probe) -> float:
        """The score above which ``probe`` is clearly worse than the best: by ``rise_tol`` and
        by ``z`` standard errors of the two."""
        cfg = self.config
        best_probe, best_score = best
        score = self._score(probe) or best_score
        rse = math.hypot(score * self._rse(probe) / best_score, self._rse(best_probe))
        return best_score * (1.0 + max(cfg.rise_tol, cfg.z * rse))

    def _turned(self, last: Probe, nxt: int) -> str:
        """Why the curve has turned at ``last``, the walk's latest probe, with ``nxt`` the
        setting below it; empty when it has not.

        It has turned when ``last`` binds and scores clearly worse than the best, or when the
        secant through it and the walk's probe above it, both binding, extrapolates to ``nxt``
        clearly worse than the best (on a convex curve the secant bounds what lies below).
        """
        best = self._best()
        if best is None:
            return ""
        best_score = best[1]
        last_score = self._score(last)
        if last_score is None or not self._binds(last):
            return ""
        if last_score > self._margin(best, last):
            return (f"past the optimum: {last.setting} binds and scores "
                    f"{last_score / best_score - 1:+.1%} against the best")
        above = [p for p in self._probes if p.setting > last.setting]
        if not above:
            return ""
        prev = min(above, key=lambda p: p.setting)
        prev_score = self._score(prev)
        if prev_score is None or not self._binds(prev):
            return ""
        # predicted = last + r (last - prev): its error grows with the lever arm r.
        r = (last.setting - nxt) / (prev.setting - last.setting)
        predicted = last_score + r * (last_score - prev_score)
        sd = math.hypot((1.0 + r) * last_score * self._rse(last),
                        r * prev_score * self._rse(prev))
        cfg = self.config
        rse = math.hypot(sd / best_score, self._rse(best[0]))
        if predicted > best_score * (1.0 + max(cfg.rise_tol, cfg.z * rse)):
            return (f"the curve has turned: {nxt} extrapolates to "
                    f"{predicted / best_score - 1:+.1%} against the best")
        return ""

    def _next_bisect(self) -> tuple[int | None, str]:
        """Highest feasible candidate, by bisection over candidate indices."""
        cands = self._candidates
        top = self._top()
        feasible = {p.setting for p in self._probes if self.objective.score(p, top) is not None}
        probed = {p.setting for p in self._probes}
        infeasible_idx = [i for i, c in enumerate(cands) if c in probed and c not in feasible]
        feasible_idx = [i for i, c in enumerate(cands) if c in feasible]
        hi_bad = max(infeasible_idx, default=-1)  # lowest setting known to break the budget
        lo_good = min((i for i in feasible_idx if i > hi_bad), default=len(cands))
        if lo_good == hi_bad + 1:
            return None, "found the highest setting that fits the budget"
        if hi_bad == len(cands) - 1:
            return None, "even the lowest setting breaks the budget"
        nxt_idx = (hi_bad + lo_good) // 2
        if self._bisect_first:
            self._bisect_first = False
            budget = getattr(self.objective, "power_budget_w", None)
            if self.space.knob is Knob.POWER_LIMIT and budget is not None:
                # The firmware holds average power near the limit: start at the budget.
                at_budget = [i for i, c in enumerate(cands) if c <= w_to_mw(budget) and i > hi_bad]
                if at_budget:
                    nxt_idx = min(at_budget[0], lo_good - 1)
        nxt_idx = min(max(nxt_idx, hi_bad + 1), lo_good - 1)
        return cands[nxt_idx], ""

    def _finish(self, reason: str) -> None:
        best = self._best()
        probes = tuple(self._probes)
        steps = sum(p.cost_steps for p in probes)
        time_s = sum(p.time_s + p.warmup_time_s for p in probes)
        energy_j = sum(p.energy_j + p.warmup_energy_j for p in probes)
        if best is None:
            chosen = min(probes, key=lambda p: p.power_w)
            result = SearchResult(chosen.setting, False, None, probes, steps, time_s, energy_j,
                                  reason + "; no setting met the constraints")
        else:
            chosen, score = best
            result = SearchResult(chosen.setting, True, score, probes, steps, time_s, energy_j,
                                  reason)
        self.results.append(result)
        self.setting = chosen.setting
        self.state = Done(chosen.setting, result.feasible, chosen.step_time_s)

    def _watch(self, st: Done, steps: int, time_s: float, energy_j: float) -> None:
        """Done: compare each monitoring window's step time with the reference. A window in
        phase also measures the held setting further, which may revise the choice or send a
        challenger to be measured (``Verifying``)."""
        cfg = self.config
        if st.warmup is not None:
            st.warmup.add(steps, time_s, energy_j)
            if self._warmed_up(st.warmup):
                if st.charge_warmup:
                    self._charge(st.warmup)
                st.warmup = None
            return
        st.window.add(steps, time_s, energy_j)
        wanted = max(cfg.monitor_min_steps, math.ceil(cfg.monitor_s / st.reference_step_time_s))
        if st.window.steps < wanted:
            return
        window, st.window = st.window, _Window()
        step_time = window.time_s / window.steps
        ratio = step_time / st.reference_step_time_s
        if abs(ratio - 1.0) > cfg.shift_tol:
            st.shifted_windows += 1
            if st.shifted_windows >= cfg.shift_windows:
                self._start_search()
            return
        st.shifted_windows = 0
        # Follow slow drift so that only a real shift triggers a new search.
        st.reference_step_time_s = 0.9 * st.reference_step_time_s + 0.1 * step_time
        if st.setting in self._windows:
            measured = self._windows[st.setting][0]
            measured.merge(window)
            # What the held setting's measurement can change grows with the log of its steps:
            # look again each time it has grown by a quarter.
            if measured.steps >= 1.25 * st.checked_steps:
                st.checked_steps = measured.steps
                self._refresh(st.setting)
                if not self._revise(st):
                    self._start_verifying(st)
                self._sync_result()

    def _verify(self, st: Verifying, steps: int, time_s: float, energy_j: float) -> None:
        """Verifying: warm up, measure the challenger's window, then go back to Done."""
        if st.window.steps == 0 and not self._warmed_up(st.warmup):
            st.warmup.add(steps, time_s, energy_j)
            return
        st.window.add(steps, time_s, energy_j)
        if st.window.steps < self._race_window:
            return
        self._spent += st.window.steps + 2 * self.config.warmup_steps
        measured, warmup = self._windows[st.setting]
        measured.merge(st.window)
        warmup.merge(st.warmup)
        self._refresh(st.setting)
        self._charge(st.warmup, st.window)
        held = st.held
        held.checked_steps = 0
        self.state = held
        if self._revise(held) and held.setting == st.setting:
            held.warmup = None  # the challenger won, and the GPU is at it, warm, already
        elif held.setting != st.setting:
            self.setting = held.setting
            if held.warmup is None:  # back to the held setting, which takes a warm-up again
                held.warmup, held.charge_warmup = _Window(), True
        self._sync_result()

    def _refresh(self, setting: int) -> None:
        """Rebuild a setting's probe from its windows."""
        measured, warmup = self._windows[setting]
        i = next(i for i, p in enumerate(self._probes) if p.setting == setting)
        self._probes[i] = measured.probe(setting, warmup)
        self._forget_pool()

    def _charge(self, *windows: _Window) -> None:
        """Add windows measured after the search (verifications) to its profiling cost."""
        r = self.results[-1]
        self.results[-1] = replace(
            r,
            profiling_steps=r.profiling_steps + sum(w.steps for w in windows),
            profiling_time_s=r.profiling_time_s + sum(w.time_s for w in windows),
            profiling_energy_j=r.profiling_energy_j + sum(w.energy_j for w in windows),
        )

    def _sync_result(self) -> None:
        """Keep the latest result's probes and score up to date with the measurements since."""
        best = self._best()
        r = self.results[-1]
        score = best[1] if best is not None and best[0].setting == r.setting else r.score
        self.results[-1] = replace(r, probes=tuple(self._probes), score=score)

    def _revise(self, st: Done) -> bool:
        """Move to the best probe whenever it is not the one held (at most ``revisions`` times).

        The job holds what it believes best. A move on a lucky window costs little: the job
        measures the new setting as it runs, and moves back as soon as the setting it left
        scores better again. (Waiting for a clear margin instead kept jobs at settings that a
        short window had measured unluckily: bench/optimizer.py's costs and regrets were worse.)
        """
        cfg = self.config
        best = self._best()
        if best is None or st.revisions >= cfg.revisions:
            return False
        chosen, score = best
        held = next(p for p in self._probes if p.setting == st.setting)
        if chosen is held:
            return False
        held_score = self._score(held)
        if held_score is None:
            shown = "breaks the constraints"
        elif score > 0:
            shown = f"scores {held_score / score - 1:+.1%} against it"
        else:  # a window that drew no energy: a counter that stood still
            shown = f"scores {held_score:.4g} against its {score:.4g}"
        st.revisions += 1
        r = self.results[-1]
        self.results[-1] = replace(
            r, setting=chosen.setting, feasible=True, score=score, revisions=st.revisions,
            reason=f"{r.reason}; revised to {chosen.setting}: {st.setting}, measured over "
                   f"{held.steps} steps, {shown}",
        )
        self.setting = st.setting = chosen.setting
        st.feasible = True
        st.reference_step_time_s = chosen.step_time_s
        st.window, st.shifted_windows, st.checked_steps = _Window(), 0, 0
        st.warmup, st.charge_warmup = _Window(), False
        return True

    def _start_verifying(self, st: Done) -> None:
        """Measure the race's challenger for a window, when the race goes on and budget is left.

        The held setting is measured as the job runs at it, so the race's next measurement,
        whenever it is the held one, costs nothing; only the challengers' windows (and the
        warm-ups around them) are profiling, and charged to the search's budget.
        """
        if st.revisions >= self.config.revisions:
            return  # a verification could change nothing
        best = self._best()
        pick, _ = self._race()
        if pick is None or best is None or pick is best[0] or best[0].setting != st.setting:
            return
        window = self._race_window_for(pick, 2, st.setting)  # there, and back
        if window is None:
            return
        self._race_window = window
        self.setting = pick.setting
        self.state = Verifying(pick.setting, st)


# -- the micro-batch lever ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JointResult:
    """A joint search of micro-batch and setting: what it chose and what finding it cost.

    Attributes:
        micro_batch: The chosen micro-batch (samples per micro-batch; the global batch stays).
        default_micro_batch: The job's own micro-batch.
        setting: The chosen setting (mW or MHz).
        feasible: Whether the choice meets the objective's constraints.
        micro_batch_probes: What each micro-batch measured: at the top setting first, then the
            chosen micro-batch's neighbours at the chosen setting (``Probe.setting`` holds the
            micro-batch).
        micro_batch_probe_settings: The setting each of ``micro_batch_probes`` ran at.
        search: The setting search at the chosen micro-batch (the latest one).
        profiling_steps / profiling_time_s / profiling_energy_j: What every probe cost,
            micro-batch probes and setting searches together.
        reason: Why the micro-batch was chosen, in words.
    """

    micro_batch: int
    default_micro_batch: int
    setting: int
    feasible: bool
    micro_batch_probes: tuple[Probe, ...]
    micro_batch_probe_settings: tuple[int, ...]
    search: SearchResult | None
    profiling_steps: int
    profiling_time_s: float
    profiling_energy_j: float
    reason: str


class JointOptimizer:
    """Searches a job's micro-batch jointly with its power limit or locked clock.

    At a fixed global batch (gradient accumulation keeps it), a larger micro-batch amortises
    the fixed costs of each micro-batch (kernel launches, the optimizer's reads of the weights,
    synchronisation) until the GPU's occupancy or memory saturates: energy and time per sample
    fall, then flatten or rise. The setting's curve depends on the micro-batch too, but the two
    levers act mostly apart, so the search takes them in turn, in the same windows as
    ``EnergyOptimizer``:

    1. At the top setting, from the job's own micro-batch, it walks up the allowed micro-batches
       while each one scores better than the best so far (an out-of-memory report ends the walk
       up: ``out_of_memory``), then, when going up did not pay, down the same way.
    2. At the best micro-batch, ``EnergyOptimizer`` searches the setting.
    3. At that setting, it measures the chosen micro-batch's neighbours. A neighbour that looks
       better but not clearly is measured on, up to a candidate's step budget; one that scores
       clearly better than the (longer measured) choice, or still better once the budget is
       spent, replaces it, and a short search of the settings around the chosen one follows at
       it. The checks then go on in the direction that paid, one micro-batch further each
       time, until one does not: the best micro-batch at a low setting need not be the one
       that scored best at the top (a larger one may draw past the top limit there).

    Then it holds the choice, and the setting search goes on as ``EnergyOptimizer``'s does
    (revisions, a new search after a throughput shift). A micro-batch change takes effect at a
    step boundary: the driver applies ``micro_batch`` before the next step it runs, and the first
    steps after a change are a discarded warm-up, as after a setting change. Scores are per
    optimizer step, which at a fixed global batch is per sample.

    Drive it as ``EnergyOptimizer``, and apply ``micro_batch`` too::

        opt = JointOptimizer(space, LeastEnergy(), micro_batches=(8, 16, 32), default=16)
        while job.running:
            gpu.set_power_limit(0, opt.setting); job.micro_batch = opt.micro_batch
            steps = opt.steps_wanted
            opt.observe(steps, *job.run(steps))

    Args:
        space: The settings to search.
        objective: What to minimise (any ``Objective``); the slowdown objective's reference is
            the job's own micro-batch at the top setting.
        micro_batches: The micro-batches the job allows (divisors of its global batch that fit
            its memory).
        default: The job's own micro-batch, one of them.
        config: Measurement and stopping parameters (the setting search's too).
    """

    def __init__(
        self,
        space: SettingSpace,
        objective: Objective,
        micro_batches: Sequence[int],
        default: int,
        config: SearchConfig | None = None,
    ) -> None:
        allowed = sorted(set(micro_batches))
        if not allowed or allowed[0] < 1:
            raise ValueError(f"need positive micro-batches, got {list(micro_batches)}")
        if default not in allowed:
            raise ValueError(f"the default micro-batch {default} is not one of {allowed}")
        self.space = space
        self.objective = objective
        self.config = config if config is not None else SearchConfig()
        self.default_micro_batch = default
        self.micro_batch = default
        self.setting = space.candidates()[0]
        self._allowed = allowed
        self._phase: Literal["wait", "micro", "setting", "check", "held"] = "wait"
        self._wait_left = self.config.wait_steps
        self._warmup = _Window()
        self._window = _Window()
        #: Micro-batch probes at the top setting, in the order taken; then the checks.
        self._probes: list[Probe] = []
        self._checks: list[Probe] = []
        self._ran_at: dict[Probe, int] = {}  # the setting each micro-batch probe ran at
        self._going_up = True
        self._to_check: list[int] = []
        self._checked = False
        #: After a check paid: the direction it went (+1 up, -1 down), where the next goes.
        self._heading: int | None = None
        self._chosen = default
        self._inner: EnergyOptimizer | None = None
        self._searches: list[EnergyOptimizer] = []
        self._own = _Window()  # what the micro-batch probes and checks cost
        self._reason = ""
        if self._wait_left <= 0:
            self._phase = "micro"

    # -- what the driver reads -----------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Whether the micro-batch and the setting are chosen and held."""
        return self._phase == "held" and self._inner is not None and self._inner.done

    @property
    def settled(self) -> bool:
        """Whether the choice can no longer be revised (see ``EnergyOptimizer.settled``)."""
        return self.done and self._inner is not None and self._inner.settled

    @property
    def steps_wanted(self) -> int:
        """Steps to run before the next ``observe``."""
        if self._phase == "wait":
            return max(1, self._wait_left)
        if self._phase in ("micro", "check"):
            if not self._warmed_up():
                return self._warmup_left()
            return 1
        assert self._inner is not None
        return self._inner.steps_wanted

    @property
    def allowed(self) -> tuple[int, ...]:
        """The micro-batches still allowed (an out-of-memory report removes the larger ones)."""
        return tuple(self._allowed)

    @property
    def profiling_steps(self) -> int:
        """Steps spent in warm-ups and probes, micro-batches and settings."""
        return self._own.steps + sum(s.profiling_steps for s in self._searches)

    @property
    def profiling_time_s(self) -> float:
        """Seconds spent in warm-ups and probes."""
        return self._own.time_s + sum(s.profiling_time_s for s in self._searches)

    @property
    def profiling_energy_j(self) -> float:
        """Joules spent in warm-ups and probes."""
        return self._own.energy_j + sum(s.profiling_energy_j for s in self._searches)

    @property
    def result(self) -> JointResult | None:
        """The choice so far: None before the setting search has a result."""
        search = self._inner.result if self._inner is not None else None
        return self._result(search) if search is not None else None

    def so_far(self) -> JointResult | None:
        """The choice as it stands, for a job that ends mid-search: once the setting search has
        begun, its best so far (``EnergyOptimizer.so_far``, whose ``reason`` starts with
        ``UNFINISHED`` while it is not done) at the micro-batch it runs; None before."""
        search = self._inner.so_far() if self._inner is not None else None
        return self._result(search) if search is not None else None

    def _result(self, search: SearchResult) -> JointResult:
        # While a neighbour is checked, the choice is still the micro-batch it is checked against.
        chosen = self._chosen if self._phase == "check" else self.micro_batch
        return JointResult(
            micro_batch=chosen, default_micro_batch=self.default_micro_batch,
            setting=search.setting, feasible=search.feasible,
            micro_batch_probes=(probes := (*self._probes, *self._checks)),
            micro_batch_probe_settings=tuple(self._ran_at[p] for p in probes), search=search,
            profiling_steps=self.profiling_steps, profiling_time_s=self.profiling_time_s,
            profiling_energy_j=self.profiling_energy_j, reason=self._reason,
        )

    # -- what the driver calls -------------------------------------------------------------------

    def observe(self, steps: int, time_s: float, energy_j: float) -> int:
        """Report ``steps`` steps run at ``setting`` and ``micro_batch`` (see
        ``EnergyOptimizer.observe``). Returns the setting to use from now on."""
        if steps < 1 or time_s <= 0 or energy_j < 0:
            raise ValueError(
                f"need steps >= 1, time_s > 0, energy_j >= 0; got {steps}, {time_s}, {energy_j}"
            )
        if self._phase == "wait":
            self._wait_left -= steps
            if self._wait_left <= 0:
                self._phase = "micro"
        elif self._phase in ("micro", "check"):
            self._own.add(steps, time_s, energy_j)
            if not self._warmed_up():
                self._warmup.add(steps, time_s, energy_j)
            else:
                self._window.add(steps, time_s, energy_j)
                if self._window_decided():
                    self._record()
        else:
            assert self._inner is not None
            self._inner.observe(steps, time_s, energy_j)
            self.setting = self._inner.setting
            if self._phase == "setting" and self._inner.done:
                self._start_checks()
        return self.setting

    def out_of_memory(self) -> None:
        """The job ran out of memory at ``micro_batch``: it and every larger one are dropped,
        and the search goes on at a smaller one.

        Raises:
            ValueError: Not even the smallest allowed micro-batch fits.
        """
        fits = [m for m in self._allowed if m < self.micro_batch]
        if not fits:
            raise ValueError(f"micro-batch {self.micro_batch} is the smallest allowed, and it "
                             "does not fit")
        self._allowed = fits
        self._reason += f"{'; ' if self._reason else ''}{self.micro_batch} ran out of memory"
        self._warmup, self._window = _Window(), _Window()
        if self._phase == "micro":
            self._next_micro()  # going up, there is no larger one now
        elif self._phase == "check":
            self._next_check()
        else:  # the chosen micro-batch itself: fall back to the best that fits, search again
            self._phase = "micro"
            self._going_up = False
            self._probes = [p for p in self._probes if p.setting < self.micro_batch]
            self._next_micro()

    # -- internals -----------------------------------------------------------------------------

    def _warmed_up(self) -> bool:
        cfg = self.config
        return self._warmup.steps >= cfg.warmup_steps and self._warmup.time_s >= cfg.warmup_s

    def _warmup_left(self) -> int:
        cfg, w = self.config, self._warmup
        need = cfg.warmup_steps - w.steps
        if w.steps and w.time_s < cfg.warmup_s:
            need = max(need, math.ceil((cfg.warmup_s - w.time_s) * w.steps / w.time_s))
        return max(1, need)

    def _reference(self) -> Probe | None:
        """The slowdown objective's reference: the job's own micro-batch at the top setting."""
        return next((p for p in self._probes if p.setting == self.default_micro_batch),
                    self._probes[0] if self._probes else None)

    def _score(self, probe: Probe) -> float | None:
        ref = self._reference()
        return self.objective.score(probe, ref if ref is not None else probe)

    def _best(self, probes: Sequence[Probe]) -> tuple[Probe, float] | None:
        scored = [(p, s) for p in probes if (s := self._score(p)) is not None]
        return min(scored, key=lambda ps: ps[1]) if scored else None

    def _window_decided(self) -> bool:
        """A micro-batch probe ends at ``screen_steps``, or from ``min_measure_steps`` on as soon
        as it is clearly worse than the best so far. A check (against the choice) that looks
        better but not clearly goes on, to the step budget of a candidate."""
        cfg, w = self.config, self._window
        checking = self._phase == "check"
        if w.steps >= (cfg.budget_steps_per_candidate if checking else cfg.screen_steps):
            return True
        if w.steps < cfg.min_measure_steps:
            return False
        probe = w.probe(self.micro_batch, self._warmup)
        held = self._held_probe() if checking else None
        best = self._best(self._probes if held is None else [held])
        score = self._score(probe)
        if best is None or score is None:
            return score is None and best is not None
        rse = math.hypot(_finite(self.objective.score_rse(probe)),
                         _finite(self.objective.score_rse(best[0])))
        if score > best[1] * (1.0 + cfg.z * rse):
            return True  # clearly worse
        if not checking:
            return False
        # A check stops once it is clearly better, or once screened and no better at all.
        return (score < best[1] * (1.0 - cfg.z * rse)
                or (w.steps >= cfg.screen_steps and score >= best[1]))

    def _record(self) -> None:
        probe = self._window.probe(self.micro_batch, self._warmup)
        self._ran_at[probe] = self.setting
        self._warmup, self._window = _Window(), _Window()
        if self._phase == "micro":
            self._probes.append(probe)
            self._next_micro()
        else:
            self._checks.append(probe)
            self._judge_check(probe)

    def _next_micro(self) -> None:
        """After a micro-batch probe at the top setting: the next micro-batch, or the setting
        search at the best one."""
        measured = {p.setting for p in self._probes}
        best = self._best(self._probes)
        last = self._probes[-1] if self._probes else None
        improving = last is not None and best is not None and best[0] is last
        if self._going_up:
            up = [m for m in self._allowed if m > (last.setting if last else self.micro_batch)
                  and m not in measured]
            if up and (improving or last is None):
                self.micro_batch = up[0]
                return
            self._going_up = False
            # Going up paid: the walk down from the job's own micro-batch would not.
            if best is not None and best[0].setting > self.default_micro_batch:
                return self._start_setting_search(best[0].setting, "larger micro-batches")
            last = None  # the walk down starts at the job's own micro-batch
        below = [m for m in self._allowed if m < (last.setting if last else
                                                   self.default_micro_batch)
                 and m not in measured]
        if below and (last is None or improving):
            self.micro_batch = below[-1]
            return
        if best is None:
            return self._start_setting_search(self.default_micro_batch, "nothing met the "
                                              "constraints at the top setting")
        self._start_setting_search(best[0].setting, "smaller micro-batches"
                                   if best[0].setting < self.default_micro_batch else "")

    def _start_setting_search(self, micro_batch: int, why: str) -> None:
        if micro_batch == self.default_micro_batch:
            said = f"the job's own micro-batch, {micro_batch}, scores best at the top setting"
        else:
            said = (f"micro-batch {micro_batch} scores best at the top setting ({why} "
                    "amortise more)")
        self._reason += f"{'; ' if self._reason else ''}{said}"
        self.micro_batch = micro_batch
        self._new_search(self.space)

    def _new_search(self, space: SettingSpace) -> None:
        self._inner = EnergyOptimizer(space, self.objective, replace(self.config, wait_steps=0))
        self._searches.append(self._inner)
        self.setting = self._inner.setting
        self._phase = "setting"

    def _start_checks(self) -> None:
        """The setting search is done: measure the chosen micro-batch's neighbours there (after
        a check that paid, only the next one in its direction)."""
        if self._checked and self._heading is None:
            self._phase = "held"
            return
        i = self._allowed.index(self.micro_batch)
        up = self._allowed[i + 1] if i + 1 < len(self._allowed) else 0
        down = self._allowed[i - 1] if i > 0 else 0
        if self._heading is None:
            self._to_check = [m for m in (up, down) if m]
        else:
            self._to_check = [m for m in ((up if self._heading > 0 else down),) if m]
        self._checked, self._heading = True, None
        self._chosen = self.micro_batch
        self._phase = "check"
        self._next_check()

    def _held_probe(self) -> Probe | None:
        res = self._inner.result if self._inner is not None else None
        if res is None:
            return None
        return next((p for p in res.probes if p.setting == res.setting), None)

    def _next_check(self) -> None:
        if self._to_check:
            self.micro_batch = self._to_check.pop(0)
        else:
            self.micro_batch = self._chosen
            self._phase = "held"

    def _judge_check(self, probe: Probe) -> None:
        """A neighbour measured at the chosen setting: keep it when it scores clearly better
        than the choice, or better once measured for a candidate's whole step budget, and
        search the settings around the chosen one at it."""
        held = self._held_probe()
        score, held_score = self._score(probe), (self._score(held) if held else None)
        if score is not None and held is not None and held_score is not None:
            rse = math.hypot(_finite(self.objective.score_rse(probe)),
                             _finite(self.objective.score_rse(held)))
            clearly = score < held_score * (1.0 - self.config.z * rse)
            measured = probe.steps >= self.config.budget_steps_per_candidate
            if clearly or (measured and score < held_score):
                self._reason += (f"; at the chosen setting, micro-batch {probe.setting} scores "
                                 f"{score / held_score - 1:+.1%} against {self._chosen}")
                self._heading = 1 if probe.setting > self._chosen else -1
                self._to_check = []
                step, value = self.space.step, self.setting
                self._new_search(SettingSpace(
                    self.space.knob, max(self.space.min_value, value - step),
                    min(self.space.max_value, value + step), step))
                return
        self._next_check()
