"""The energy optimiser in the daemon: starts a job's search, feeds it windows, stores its searches.

A job is handed to the optimiser (``energy.optimizer``) by ``--objective`` or by the ``slow``
energy action. ``start_optimising`` picks the knob (the power limit in ``hw`` mode, the locked SM
clock in ``clock`` mode; ``soft`` has none) and a candidate grid of about ten steps. Once a
control tick, ``Optimising.drive`` applies the setting the optimiser asks for (through the budget
loop's ``decide``) and feeds it windows that start and end at progress reports, with the job's
energy interpolated between ticks; every change of the search is stored with its probes
(``optimizer_searches`` / ``optimizer_probes``, read by ``reports/optimizer.py``), and
``Optimising.stop`` stores a search the job's end cut short as it stood.

A job whose training loop declares the micro-batches it allows (``track(micro_batches=...)``)
and whose GPUs are all on this node gets the micro-batch searched with its setting
(``JointOptimizer``): the micro-batch goes to the loop as the ``micro_batch`` directive, which
its ranks take at their next step boundary, so no step is lost; the first steps at a new
micro-batch are the probe's discarded warm-up. A loop that reports an out-of-memory (it
withdraws micro-batches) stops the search going higher. A run spread over nodes searches the
setting alone: the other nodes' daemons follow its setting, not its micro-batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise

from energy.optimizer import (
    UNFINISHED,
    EnergyOptimizer,
    JointOptimizer,
    JointResult,
    Knob,
    LeastEnergy,
    Objective,
    SearchConfig,
    SearchResult,
    SettingSpace,
    objective_from_name,
)
from energy.units import mw_to_w, w_to_mw
from scheduler.control import (
    Command,
    Decision,
    GpuFacts,
    LockClocks,
    Observation,
    SetMicroBatch,
    SetPowerLimit,
)
from scheduler.jobs import Mode
from scheduler.store import JobRecord, JobStore, ProbeRecord, SearchRecord
from telemetry.clock import to_datetime
from telemetry.store.errors import StoreError

__all__ = [
    "DAEMON_GRID_INTERVALS",
    "Optimising",
    "daemon_search",
    "grid_step",
    "report_point",
    "start_optimising",
]

log = logging.getLogger(__name__)


def daemon_search(step_time_s: float) -> SearchConfig:
    """The optimiser's windows in the daemon, for a job whose steps take ``step_time_s``.

    It observes once per progress report (about a second of steps at a time), and the steps of
    a real loop vary with everything else on the host, so windows are set in seconds and turned
    into steps at the job's pace: the search starts after 5 s (a loop's first steps are slow:
    compilation, caches, data loaders); a probe warms up for 1.5 s and measures 2-4 s, the race
    4 s at a time; a search spends at most 10 s per candidate; and only a large throughput shift
    (30 %) starts a new search.
    """

    def steps(seconds: float, least: int) -> int:
        return max(least, math.ceil(seconds / step_time_s))

    return SearchConfig(
        wait_steps=steps(5.0, 1), warmup_steps=steps(0.5, 2), warmup_s=1.5,
        min_measure_steps=steps(2.0, 8), screen_steps=steps(4.0, 16),
        refine_window=steps(4.0, 16), budget_steps_per_candidate=steps(10.0, 40),
        shift_tol=0.3,
    )


DAEMON_GRID_INTERVALS = 10
"""The daemon's search spans a setting range in about this many steps (at least 25 W or 90 MHz
each): a 200-700 W H100 gets 50 W steps, 11 candidates, where Zeus's 25 W would make 21 and a
search of several seconds per probe would take minutes."""


def start_optimising(
    job: JobRecord,
    mode: Mode,
    facts: GpuFacts,
    locked_mhz: int | None,
    objective: str,
    *,
    why: str,
    jobs: JobStore,
) -> Optimising | None:
    """Hand the job's setting to the energy optimiser (hw: power limits; clock: clocks).

    Args:
        job: The job (its GPUs and wattage budget).
        mode: The job's resolved mode; ``soft`` has no setting that saves energy.
        facts: The probed facts of the job's first GPU.
        locked_mhz: The SM clock locked on that GPU now, MHz (clock mode searches below it).
        objective: The objective's name (``energy`` for ``--on-exceed slow``).
        why: What handed the job over, for the log.
        jobs: Where the searches are stored.

    Returns:
        The optimiser's driver for the job; None in soft mode (logged as a warning).
    """
    budget_w = job.watts_per_gpu
    if mode == Mode.SOFT:
        log.warning("job %d: %s, but soft mode has no setting that saves energy (pacing "
                    "adds idle time); only warning", job.id, why)
        return None
    if mode == Mode.HW:
        top_mw = max(facts.min_limit_mw, facts.max_limit_mw if budget_w is None else min(
            facts.max_limit_mw, round(w_to_mw(budget_w))))
        space = SettingSpace.power_limits(
            facts.min_limit_mw, top_mw, grid_step(top_mw - facts.min_limit_mw, 25_000))
    else:
        top = locked_mhz or facts.max_sm_clock_mhz
        space = SettingSpace.sm_clocks(
            facts.min_sm_clock_mhz, top, grid_step(top - facts.min_sm_clock_mhz, 90))
    goal = LeastEnergy(power_budget_w=budget_w) if objective == "energy" else (
        objective_from_name(objective, max_power_w=mw_to_w(facts.max_limit_mw) * len(job.gpus),
                            power_budget_w=budget_w)
    )
    log.info("job %d: the energy optimiser takes over (%s): %s over %s", job.id, why,
             goal.name, space.knob)
    return Optimising(job.id, jobs, space, goal,
                      micro_batch_lever=len(set(job.gpu_hosts) | {job.host}) == 1)


@dataclass(slots=True)
class Optimising:
    """The energy optimiser driving a job (``slow``, ``--objective``).

    Attributes:
        job_id: The job.
        jobs: Where its searches are stored.
        space / goal: What it searches (its ``knob`` says which actuator), and for what.
        micro_batch_lever: The job's micro-batch may be searched too (its GPUs are all on this
            node); it is when its loop declares its micro-batches.
        optimizer: The optimiser, made once the job's step time is known (its windows are set
            in seconds, see ``daemon_search``): a ``JointOptimizer`` when the micro-batch is
            searched too.
        applied / applied_at: The setting last applied, and when (s).
        applied_micro_batch: The micro-batch last asked of the loop (None: not searched).
        mark: Where the window being measured starts: a progress report's time (s), the
            job's steps then, and its energy then (J, interpolated between ticks).
        saved: The search result last stored.
    """

    job_id: int
    jobs: JobStore
    space: SettingSpace
    goal: Objective
    micro_batch_lever: bool = False
    optimizer: EnergyOptimizer | JointOptimizer | None = None
    applied: int | None = None
    applied_at: float = 0.0
    applied_micro_batch: int | None = None
    mark: tuple[float, int, float] | None = None
    saved: SearchResult | JointResult | None = None

    def drive(
        self,
        gpus: Sequence[int],
        obs: Observation,
        reports: Sequence[tuple[float, int, int]],
        energy_at: Sequence[tuple[float, float]],
        decide: Callable[[Decision], None],
    ) -> None:
        """One control tick: feed the optimiser windows that start and end at progress reports.

        A report says how many steps the job had done when it was received; the job's energy
        then is interpolated between the ticks around it. Steps counted at tick time instead
        would be off by up to a report interval's worth at each end of a window.

        Args:
            gpus: The job's GPU indices.
            obs: This tick's observation of the job.
            reports: The job's progress reports ``(time s, steps, tokens)``, oldest first.
            energy_at: ``(tick time s, the job's energy then J)`` of the last ticks.
            decide: Applies and records a decision (a new setting) for the job.
        """
        if self.optimizer is None:
            if not obs.step_time_s:
                return  # no step reported yet
            self.optimizer = self._make_optimizer(obs, daemon_search(obs.step_time_s))
        if isinstance(self.optimizer, JointOptimizer):
            self._obey_memory(obs)
        if (self.applied, self.applied_micro_batch) != self._wanted():
            self._apply_setting(gpus, obs, decide)
            return
        point = report_point(reports, energy_at, self.applied_at)
        if point is None:
            return
        if self.mark is None:
            self.mark = point
            return
        (t0, steps0, e0), (t1, steps1, e1) = self.mark, point
        done = steps1 - steps0
        if done >= self.optimizer.steps_wanted and t1 > t0:
            self.optimizer.observe(done, t1 - t0, max(e1 - e0, 0.0))
            self.mark = point
            if (self.applied, self.applied_micro_batch) != self._wanted():
                self._apply_setting(gpus, obs, decide)
            self._save_search(obs.now_s, self.optimizer.result)

    def _make_optimizer(
        self, obs: Observation, config: SearchConfig
    ) -> EnergyOptimizer | JointOptimizer:
        """A joint search when the loop declared at least two micro-batches (its own among
        them) and the lever is allowed; else the setting's search alone."""
        allowed, own = obs.micro_batches, obs.default_micro_batch
        if self.micro_batch_lever and len(allowed) >= 2 and own in allowed:
            assert own is not None
            log.info("job %d: the optimiser searches the micro-batch too, among %s (the "
                     "loop's own: %d)", self.job_id, ", ".join(map(str, allowed)), own)
            return JointOptimizer(self.space, self.goal, allowed, own, config)
        return EnergyOptimizer(self.space, self.goal, config)

    def _wanted(self) -> tuple[int, int | None]:
        """The setting and micro-batch the optimiser asks for now."""
        opt = self.optimizer
        assert opt is not None
        return opt.setting, opt.micro_batch if isinstance(opt, JointOptimizer) else None

    def _obey_memory(self, obs: Observation) -> None:
        """The loop withdrew micro-batches (it ran out of memory): a search at one of them
        drops it and every larger one, and the window it was measuring."""
        opt = self.optimizer
        assert isinstance(opt, JointOptimizer)
        while obs.micro_batches and opt.micro_batch > obs.micro_batches[-1]:
            log.warning("job %d: micro-batch %d ran out of memory", self.job_id,
                        opt.micro_batch)
            try:
                opt.out_of_memory()
            except ValueError as exc:
                log.warning("job %d: %s", self.job_id, exc)
                return
            self.mark = None

    def stop(self, now_s: float) -> None:
        """The job ended: store a search it ended in the middle of as it stood
        (``so_far``; a joint search once its setting search has begun)."""
        opt = self.optimizer
        if opt is not None and not opt.done:
            self._save_search(now_s, opt.so_far())

    def _save_search(self, now_s: float, result: SearchResult | JointResult | None) -> None:
        """Store a search whenever it changed (done, revised, measured further; or as it stood
        when the job ended), for ``powertrain report``."""
        opt = self.optimizer
        assert opt is not None
        # A joint search's result is made anew at each read: compared by value.
        if result is None or result is self.saved or result == self.saved:
            return
        if isinstance(result, JointResult):
            record = self._joint_record(now_s, result)
        else:
            assert isinstance(opt, EnergyOptimizer)
            finished = opt.results
            number = len(finished) if finished and result is finished[-1] else len(finished) + 1
            record = SearchRecord(
                job_id=self.job_id, number=number, at=to_datetime(now_s),
                objective=opt.objective.name, knob=opt.space.knob,
                setting=result.setting, top_setting=opt.space.max_value,
                feasible=result.feasible, reason=result.reason, revisions=result.revisions,
                profiling_steps=result.profiling_steps,
                profiling_time_s=result.profiling_time_s,
                profiling_energy_j=result.profiling_energy_j,
                probes=tuple(ProbeRecord(p.setting, p.steps, p.time_s, p.energy_j)
                             for p in sorted(result.probes, key=lambda p: -p.setting)),
            )
        try:
            self.jobs.save_search(record)
        except StoreError as exc:
            log.warning("job %d: could not store the optimiser's search: %s", self.job_id, exc)
            return
        self.saved = result

    def _joint_record(self, now_s: float, result: JointResult) -> SearchRecord:
        """A joint search as one stored search: the setting probes of its latest setting
        search (at the chosen micro-batch) and every micro-batch probe (at the setting it ran
        at: the top one, or the chosen one for the checks after the setting search)."""
        opt = self.optimizer
        assert isinstance(opt, JointOptimizer)
        search = result.search
        top = self.space.max_value
        probes: dict[tuple[int | None, int], ProbeRecord] = {}
        for p, at in zip(result.micro_batch_probes, result.micro_batch_probe_settings,
                         strict=True):
            probes[(p.setting, at)] = ProbeRecord(at, p.steps, p.time_s, p.energy_j, p.setting)
        if search is not None:
            for p in search.probes:  # a setting's longer measurement wins over a short probe
                probes[(result.micro_batch, p.setting)] = ProbeRecord(
                    p.setting, p.steps, p.time_s, p.energy_j, result.micro_batch)
        return SearchRecord(
            job_id=self.job_id, number=1, at=to_datetime(now_s), objective=opt.objective.name,
            knob=opt.space.knob, setting=result.setting, top_setting=top,
            feasible=result.feasible,
            # an unfinished search says so first (``OptimizerSummary.finished``)
            reason="; ".join(r for r in sorted(
                (result.reason, search.reason if search else ""),
                key=lambda r: not r.startswith(UNFINISHED)) if r),
            revisions=search.revisions if search is not None else 0,
            profiling_steps=result.profiling_steps, profiling_time_s=result.profiling_time_s,
            profiling_energy_j=result.profiling_energy_j,
            probes=tuple(sorted(probes.values(),
                                key=lambda p: (-p.setting, -(p.micro_batch or 0)))),
            micro_batch=result.micro_batch, default_micro_batch=result.default_micro_batch,
        )

    def _apply_setting(
        self, gpus: Sequence[int], obs: Observation, decide: Callable[[Decision], None]
    ) -> None:
        opt = self.optimizer
        assert opt is not None
        value, micro_batch = self._wanted()
        if isinstance(opt, JointOptimizer):
            phase = "holding" if opt.done else "searching, micro-batch and setting"
        else:
            phase = type(opt.state).__name__.lower()
        decision = setting_decision(
            self.space.knob, value, gpus, obs,
            why=f"energy optimiser ({opt.objective.name}, {phase})",
        )
        if micro_batch is not None and micro_batch != self.applied_micro_batch:
            decision = replace(
                decision, what=f"{decision.what}, micro-batch {micro_batch}",
                commands=(*decision.commands, SetMicroBatch(micro_batch)),
            )
        decide(decision)
        self.applied, self.applied_at, self.mark = value, obs.now_s, None
        self.applied_micro_batch = micro_batch


def setting_decision(
    knob: Knob, value: int, gpus: Sequence[int], obs: Observation, *, why: str
) -> Decision:
    """The decision that puts ``gpus`` at an optimiser setting: a power limit (``value`` mW) or
    locked SM clocks (MHz). The owner node's optimiser decides it; the run's other nodes apply
    the same setting to their GPUs of the run."""
    commands: tuple[Command, ...] = tuple(
        SetPowerLimit(index, value) if knob is Knob.POWER_LIMIT else LockClocks(index, value)
        for index in gpus
    )
    shown = f"{mw_to_w(value):g} W" if knob is Knob.POWER_LIMIT else f"{value:g} MHz"
    return Decision(
        at_s=obs.now_s, source="optimizer", what=f"{knob.replace('_', ' ')} {shown}", why=why,
        commands=commands, power_before_w=obs.mean_power_w(), steps_per_s_before=obs.steps_per_s,
    )


def grid_step(span: int, least: int) -> int:
    """A candidate step that splits ``span`` into about ``DAEMON_GRID_INTERVALS`` steps: a
    multiple of ``least``."""
    return least * max(1, -(-span // (least * DAEMON_GRID_INTERVALS)))


def report_point(
    reports: Sequence[tuple[float, int, int]],
    energy_at: Sequence[tuple[float, float]],
    since_s: float,
) -> tuple[float, int, float] | None:
    """The latest progress report received at or after ``since_s`` that the energy readings
    reach: its time (s), the steps it reported, and the job's energy then (J), interpolated
    between the ticks around it. None when there is no such report.

    Args:
        reports: Progress reports ``(time s, steps, tokens)``, oldest first.
        energy_at: ``(tick time s, energy J)`` of the last ticks, oldest first.
        since_s: Reports before this time (the setting's change) do not count, s.
    """
    if len(energy_at) < 2:
        return None
    first_s, last_s = energy_at[0][0], energy_at[-1][0]
    for t, steps, _tokens in reversed(reports):
        if t > last_s:
            continue
        if t < since_s or t < first_s:
            return None
        for (ta, ea), (tb, eb) in pairwise(energy_at):
            if ta <= t <= tb:
                energy = ea if tb == ta else ea + (eb - ea) * (t - ta) / (tb - ta)
                return t, steps, energy
        return None
    return None
