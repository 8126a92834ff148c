"""Budgets at run time: each second, hold every running job to its wattage and energy budgets.

The control tick (``BudgetLoop.tick``) builds one ``scheduler.control.Observation`` per job from the
GPUs' 1 s average power (the sampler's latest readings) and the client's reports, runs the job's
controller (hw, clock or soft), its energy guard, and the node-cap guard, applies their commands
through the actuators (journaled), and stores every decision with the power and throughput before it
and, five seconds later, after it. The ``slow`` energy action and ``--objective`` hand the job to
the energy optimiser, driven with the same per-second measurements (``scheduler.optimising``). A
job's energy is added up from its GPUs' energy counters each tick (``energy.counters``).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace

from energy.counters import interval_energy
from energy.optimizer import Knob
from energy.units import mj_to_j, mw_to_w, wh_to_j
from scheduler.actuators import Actuators
from scheduler.control import (
    Command,
    Decision,
    EnergyAction,
    EnergyEvent,
    EnergyForecast,
    EnergyGuard,
    GpuFacts,
    GpuObservation,
    JobPower,
    LockClocks,
    ModeChoice,
    NodeCapGuard,
    Observation,
    PowerController,
    ResetClocks,
    ResetPowerLimit,
    SetMicroBatch,
    SetPace,
    SetPowerLimit,
    choose_mode,
    make_controller,
)
from scheduler.jobs import JobState, Mode
from scheduler.optimising import Optimising, setting_decision, start_optimising
from scheduler.store import JobRecord, JobStore
from telemetry.backends.base import BackendCapabilities, GpuInfo, GpuReading
from telemetry.clock import Clock, to_datetime
from telemetry.sampler import LatestReadings
from telemetry.store import SampleRecord

log = logging.getLogger(__name__)

AFTER_S = 5.0
"""A decision's "after" power and throughput are measured this long after it."""

THROUGHPUT_WINDOW_S = 5.0

STOP_LEAD_S = 0.5
"""For ``--on-exceed stop``: the job is stopped when its energy plus this many seconds at its
current power reaches the budget. Checks come once a control tick (1 s), so half a tick is the
lead that centres where the job ends on its budget."""

IDLE_SETTLE_S = 5.0
"""A GPU counts as idle for the idle-power estimate after this long without a job."""


@dataclass(slots=True)
class Progress:
    """What the service knows of a job's client (from its progress reports)."""

    reports: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=256))
    step_time_s: float | None = None
    #: The micro-batches the loop allows and its own one, as its client declares them
    #: (``Observation.micro_batches`` / ``default_micro_batch``).
    micro_batches: tuple[int, ...] = ()
    default_micro_batch: int | None = None

    def add(self, now_s: float, steps: int, tokens: int, step_time_s: float | None) -> None:
        self.reports.append((now_s, steps, tokens))
        if step_time_s:
            self.step_time_s = step_time_s

    @property
    def steps(self) -> int:
        return self.reports[-1][1] if self.reports else 0

    @property
    def tokens(self) -> int:
        return self.reports[-1][2] if self.reports else 0

    def rates(
        self, now_s: float, window_s: float = THROUGHPUT_WINDOW_S
    ) -> tuple[float | None, float | None]:
        """Steps/s and tokens/s over the last ``window_s`` of reports."""
        recent = [r for r in self.reports if r[0] >= now_s - window_s]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return None, None
        dt = recent[-1][0] - recent[0][0]
        return (recent[-1][1] - recent[0][1]) / dt, (recent[-1][2] - recent[0][2]) / dt


@dataclass(slots=True)
class _JobControl:
    """Per-job control state kept between ticks."""

    choice: ModeChoice | None = None
    controller: PowerController | None = None
    forecast: EnergyForecast | None = None
    guard: EnergyGuard | None = None
    optimising: Optimising | None = None
    energy_j: float = 0.0
    counters: dict[int, int] = field(default_factory=dict)
    #: Other nodes' GPUs of a run this node owns: store id -> (their latest stored sample's
    #: time s, its counter mJ).
    remote: dict[int, tuple[float, int | None]] = field(default_factory=dict)
    budget_wh: float | None = None
    followed: bool = False  # another node owns the run and takes its energy decisions
    following: tuple[Knob, int] | None = None  # the owner's optimiser setting applied here
    gpus: tuple[int, ...] = ()  # the GPUs the controller was made for
    last_s: float | None = None
    #: (tick time, ``energy_j`` then) of the last ticks, to read the energy at a report's time.
    energy_at: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=32))
    duty: float = 1.0
    micro_batch: int | None = None
    pending: list[tuple[float, int]] = field(default_factory=list)
    last_obs: Observation | None = None
    stop_reason: str | None = None


class BudgetLoop:
    """Holds the running jobs of one node to their budgets, one ``tick`` a second.

    Args:
        capabilities: What the node's GPUs can do (their backend's, probed at open).
        jobs: The job store (decisions, mode, energy at adoption).
        actuators: The only way settings change.
        infos: The GPUs' probed facts, by index.
        readings: The GPUs' latest readings (the sampler's: the loop reads no GPU itself). A GPU
            without a fresh one (lost, failing) is observed with no power, as is its job.
        node_cap: The node power cap, W, or ``None`` when no cap is set (called each tick: an
            admin may set or change it). Without one, nothing is held: the cards' own power
            limits already keep the node under the sum of their maximum limits.
        clock: Time source.
        on_pause / on_resume / on_stop: How the service pauses, resumes or stops a job.
        remote_samples: The latest stored samples of GPUs by store id (another node's GPUs of a
            run this node owns); ``None``: this node owns no such run.
    """

    def __init__(
        self,
        capabilities: BackendCapabilities,
        jobs: JobStore,
        actuators: Actuators,
        infos: Mapping[int, GpuInfo],
        *,
        readings: LatestReadings,
        node_cap: Callable[[], float | None],
        clock: Clock,
        on_pause: Callable[[JobRecord, str], None],
        on_resume: Callable[[JobRecord, str], None],
        on_stop: Callable[[JobRecord, str], None],
        remote_samples: Callable[[Sequence[int]], Mapping[int, SampleRecord]] | None = None,
    ) -> None:
        self._remote_samples = remote_samples
        self._capabilities = capabilities
        self._readings = readings
        self._jobs = jobs
        self._actuators = actuators
        self._infos = dict(infos)
        self._node_cap = node_cap
        self._clock = clock
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._on_stop = on_stop
        self._controls: dict[int, _JobControl] = {}
        self._failing: dict[int, str] = {}  # job id -> the error its control last failed with
        self._cap_w = node_cap()
        self._cap_guard = None if self._cap_w is None else NodeCapGuard(self._cap_w)
        self._hw_permitted: tuple[bool, str] | None = None
        self._idle_mw: dict[int, int] = {}
        self._free_since: dict[int, float] = {}
        self._facts = {i: self._probe_facts(info) for i, info in self._infos.items()}

    # -- what the service calls ------------------------------------------------------------------

    def forget(self, job_id: int) -> None:
        """The job ended: drop its state (the service undoes its settings). A search it ended
        in the middle of is stored as it stood (``EnergyOptimizer.so_far``)."""
        control = self._controls.pop(job_id, None)
        self._failing.pop(job_id, None)
        if control is not None and control.optimising is not None:
            control.optimising.stop(self._clock.now())

    def budget_changed(self, job: JobRecord) -> None:
        """``powertrain budget``: the energy guard takes the new budget at the next tick."""
        control = self._controls.get(job.id)
        if control is None or control.followed:
            return
        if job.energy_budget_wh is None:
            return
        if control.guard is None:
            _arm_energy(control, job)
        else:
            control.guard.set_budget(wh_to_j(job.energy_budget_wh))

    def resumed_by_hand(self, job_id: int) -> None:
        control = self._controls.get(job_id)
        if control is not None and control.guard is not None:
            control.guard.resume()

    def stop_reason(self, job_id: int) -> str | None:
        control = self._controls.get(job_id)
        return control.stop_reason if control else None

    def job_figures(self, job_id: int) -> tuple[float | None, Observation | None]:
        """A job's energy so far as this loop adds it up, J (``None`` before its first tick, or
        where another node owns the run and counts its energy), and its last observation
        (``None`` before its first tick)."""
        control = self._controls.get(job_id)
        if control is None:
            return None, None
        energy_j = None if control.followed or control.last_s is None else control.energy_j
        return energy_j, control.last_obs

    def duty(self, job_id: int) -> float:
        """The share of wall time the job's loop may compute (1.0: not paced)."""
        control = self._controls.get(job_id)
        return control.duty if control else 1.0

    def tick(
        self,
        active: Sequence[JobRecord],
        progress: Mapping[int, Progress],
        *,
        followed: Set[int] = frozenset(),
        remote_gpus: Mapping[int, Sequence[int]] | None = None,
    ) -> None:
        """One control tick for every active job of this node.

        Args:
            active: The jobs, each narrowed to this node's GPUs (``JobRecord.on``).
            progress: What each job's clients reported (a run's totals over its members).
            followed: Jobs another node owns (a run's rank 0 is elsewhere): this node holds
                their wattage budget on its GPUs, and leaves energy decisions to the owner.
            remote_gpus: For runs this node owns, the store ids of their GPUs on other nodes,
                whose energy counts into the run's energy budget (read from the store).
        """
        now_s = self._clock.now()
        readings = self._read_all()
        busy = {i for job in active for i in job.gpus}
        for index, reading in readings.items():
            if index in busy:
                self._free_since.pop(index, None)
                continue
            since = self._free_since.setdefault(index, now_s)
            # What a free GPU draws, once its 1 s average no longer remembers its last job.
            if now_s - since >= IDLE_SETTLE_S and reading.power_avg_mw is not None:
                self._idle_mw[index] = reading.power_avg_mw

        # A job whose control fails (a bug, a store error) is skipped this tick, not every job.
        failed: set[int] = set()
        observations: dict[int, Observation] = {}
        for job in active:
            with self._contained(job, failed):
                control = self._controls.get(job.id)
                if control is None:
                    control = self._controls[job.id] = self._start(job, job.id in followed)
                self._account(control, job, readings, now_s)
                self._account_remote(control, (remote_gpus or {}).get(job.id, ()))
                observations[job.id] = self._observe(job, control, readings,
                                                     progress.get(job.id, Progress()), now_s)

        # The node cap shares itself among the jobs observed; the node's power it holds still
        # counts every GPU, a failing job's too.
        working = [job for job in active if job.id in observations]
        budgets = self._node_cap_tick(working, observations, readings, now_s)
        for job in working:
            with self._contained(job, failed):
                control = self._controls[job.id]
                obs = replace(observations[job.id],
                              budget_w=budgets.get(job.id, job.watts_per_gpu))
                control.last_obs = obs
                if job.state == JobState.RUNNING:
                    self._hold_power(job, control, obs, progress.get(job.id, Progress()))
                self._energy(job, control, obs, progress.get(job.id, Progress()))
                self._complete_decisions(control, obs, now_s)
        for job_id in self._failing.keys() - failed:
            del self._failing[job_id]
            log.info("job %d: its control works again", job_id)

    @contextlib.contextmanager
    def _contained(self, job: JobRecord, failed: set[int]) -> Iterator[None]:
        """Log a job's control failure (each new error once, with its traceback) and go on."""
        try:
            yield
        except Exception as exc:
            failed.add(job.id)
            said = f"{type(exc).__name__}: {exc}"
            if self._failing.get(job.id) != said:
                self._failing[job.id] = said
                log.exception("job %d: control failed this tick (%s); other jobs go on",
                              job.id, said)

    # -- setup -----------------------------------------------------------------------------------

    def _start(self, job: JobRecord, followed: bool = False) -> _JobControl:
        control = _JobControl(followed=followed)
        if followed:  # the owner node takes the run's energy decisions
            return control
        # Every GPU of the run, on every node, up to now; each tick adds what came since.
        control.energy_j = mj_to_j(self._jobs.energy(job.id).energy_mj) if job.started_at else 0.0
        if job.energy_budget_wh is not None:
            _arm_energy(control, job)
        if job.objective is not None:
            self._start_optimiser(job, control, job.objective, why=f"--objective {job.objective}")
        return control

    def _probe_facts(self, info: GpuInfo) -> GpuFacts:
        caps = self._capabilities.gpu(info.index)
        # Without a known clock grid, 15 MHz (an H100's and A100's step).
        step = 15 if caps.sm_clock_step_mhz is None else max(1, round(caps.sm_clock_step_mhz))
        max_mw = info.max_limit_mw or 0
        return GpuFacts(
            index=info.index,
            min_limit_mw=info.min_limit_mw or max_mw,
            max_limit_mw=max_mw,
            default_limit_mw=info.default_limit_mw or max_mw,
            min_sm_clock_mhz=info.min_sm_clock_mhz or 0,
            max_sm_clock_mhz=info.max_sm_clock_mhz or 0,
            sm_clock_step_mhz=step,
            idle_power_mw=caps.idle_power_mw if caps.idle_power_mw is not None else max_mw // 10,
        )

    def _choose(self, job: JobRecord) -> ModeChoice:
        if self._hw_permitted is None:
            self._hw_permitted = self._actuators.probe_power_limit_permission(job.gpus[0])
            log.info("power limits %s: %s",
                     "may be set" if self._hw_permitted[0] else "may not be set",
                     self._hw_permitted[1])
        permitted, why = self._hw_permitted
        try:
            choice = choose_mode(job.mode, hw_permitted=permitted, clocks_permitted=permitted)
        except ValueError as exc:
            choice = ModeChoice(Mode.SOFT, f"{exc}; falling back to soft ({why})")
        if job.mode is Mode.AUTO and not permitted:
            choice = ModeChoice(Mode.SOFT, f"auto: {why}, so soft (pacing)")
        return choice

    # -- energy accounting -------------------------------------------------------------------------

    def _read_all(self) -> dict[int, GpuReading]:
        """This node's GPUs' latest readings (about a sampling period old in the daemon; the
        sampler leaves out a GPU whose last read failed or whose reading went stale)."""
        latest = self._readings.latest()
        return {index: latest[index] for index in self._infos if index in latest}

    def _account(
        self, control: _JobControl, job: JobRecord, readings: Mapping[int, GpuReading],
        now_s: float,
    ) -> None:
        """Add the job's GPUs' energy since the last tick (``energy.counters``: the counter's
        delta since its last reading; power over the tick across a reset or without a counter)."""
        for index in job.gpus:
            r = readings.get(index)
            if r is None:
                continue
            if control.last_s is not None:
                # Only the tick's end carries a power: the 1 s average read now is the tick's
                # power, held over it. A wall clock that stepped back gives the tick no length.
                part = interval_energy(
                    (min(control.last_s, now_s), control.counters.get(index), None),
                    (now_s, r.energy_mj, r.power_avg_mw),
                )
                control.energy_j += mj_to_j(part.energy_mj or 0.0)
            if r.energy_mj is not None:
                control.counters[index] = r.energy_mj
        control.last_s = now_s
        control.energy_at.append((now_s, control.energy_j))

    def _account_remote(self, control: _JobControl, gpu_ids: Sequence[int]) -> None:
        """Add the energy of a run's GPUs on other nodes since their last stored sample seen
        (their daemons sample them into the shared store; a flush interval behind)."""
        if not gpu_ids or self._remote_samples is None:
            return
        for gpu_id, sample in self._remote_samples(gpu_ids).items():
            t_s = sample.sampled_at.timestamp()
            before = control.remote.get(gpu_id)
            control.remote[gpu_id] = (t_s, sample.energy_mj)
            if before is None or t_s <= before[0]:
                continue  # the first sample seen starts the count (the job's start was read)
            part = interval_energy(
                (before[0], before[1], None), (t_s, sample.energy_mj, sample.power_avg_mw)
            )
            control.energy_j += mj_to_j(part.energy_mj or 0.0)
        if control.energy_at:
            control.energy_at[-1] = (control.energy_at[-1][0], control.energy_j)

    def _observe(
        self, job: JobRecord, control: _JobControl, readings: Mapping[int, GpuReading],
        progress: Progress, now_s: float,
    ) -> Observation:
        gpus = []
        for index in job.gpus:
            r = readings.get(index)
            facts = self._facts[index]
            if index in self._idle_mw:
                facts = replace(facts, idle_power_mw=self._idle_mw[index])
            locked = self._actuators_locked(index)
            gpus.append(GpuObservation(
                facts=facts,
                power_avg_mw=r.power_avg_mw if r else None,
                limit_mw=r.power_limit_mw if r else None,
                locked_max_mhz=locked,
            ))
        steps_per_s, tokens_per_s = progress.rates(now_s)
        step_s = progress.step_time_s
        # The pace the duty directive means at today's step time (see ``_apply``).
        pace_s = step_s * (1.0 / control.duty - 1.0) if step_s and control.duty < 1.0 else 0.0
        return Observation(
            now_s=now_s, gpus=tuple(gpus), budget_w=job.watts_per_gpu, steps_per_s=steps_per_s,
            tokens_per_s=tokens_per_s, step_time_s=step_s, pace_s=pace_s,
            micro_batch=control.micro_batch, micro_batches=progress.micro_batches,
            default_micro_batch=progress.default_micro_batch,
        )

    def _actuators_locked(self, index: int) -> int | None:
        for entry in self._actuators.applied(index):
            if entry.setting == Knob.SM_CLOCKS:
                return entry.value
        return None

    # -- wattage -----------------------------------------------------------------------------------

    def _hold_power(
        self, job: JobRecord, control: _JobControl, obs: Observation, progress: Progress
    ) -> None:
        if control.optimising is not None:
            self._drive_optimiser(job, control, obs, progress)
            return
        if control.followed and job.knob is not None and job.knob_setting is not None:
            self._follow_setting(job, control, obs, (job.knob, job.knob_setting))
            return
        if control.controller is not None and control.gpus != job.gpus:
            # A rank joined with its GPUs (the ranks of a run join one by one): the controller
            # starts again on the job's GPUs as they are now.
            control.controller = None
        if obs.budget_w is None:
            if control.controller is not None:
                self._apply(job, control, control.controller.undo(obs))
                control.controller = None
            return
        if control.controller is None:
            control.gpus = job.gpus
            control.choice = self._choose(job)
            control.controller = make_controller(control.choice.mode)
            self._jobs.set_fields(job.id, mode_effective=control.choice.mode,
                                  mode_reason=control.choice.reason)
            log.info("job %d holds %.0f W per GPU in %s mode: %s", job.id, obs.budget_w,
                     control.choice.mode, control.choice.reason)
        for decision in control.controller.tick(obs):
            self._decide(job, control, decision)

    def _decide(self, job: JobRecord, control: _JobControl, decision: Decision) -> None:
        self._apply(job, control, decision.commands)
        decision_id = self._jobs.add_decision(
            job.id, at=to_datetime(decision.at_s), source=decision.source, what=decision.what,
            why=decision.why, power_before_w=decision.power_before_w,
            steps_per_s_before=decision.steps_per_s_before,
        )
        control.pending.append((decision.at_s + AFTER_S, decision_id))
        log.debug("job %d: %s (%s)", job.id, decision.what, decision.why)

    def _apply(self, job: JobRecord, control: _JobControl, commands: Sequence[Command]) -> None:
        for command in commands:
            if isinstance(command, SetPowerLimit):
                self._actuators.set_power_limit(job.id, command.index, command.limit_mw,
                                                reapply=command.reapply)
            elif isinstance(command, ResetPowerLimit):
                self._actuators.reset_setting(
                    command.index, Knob.POWER_LIMIT, f"job {job.id} released it"
                )
            elif isinstance(command, LockClocks):
                self._actuators.lock_sm_clocks(job.id, command.index, command.max_mhz,
                                               reapply=command.reapply)
            elif isinstance(command, ResetClocks):
                self._actuators.reset_setting(
                    command.index, Knob.SM_CLOCKS, f"job {job.id} released it"
                )
            elif isinstance(command, SetPace):
                # The controller thinks in pace per step at the step time it saw; the client is
                # told the duty that pace means, so it paces each step by its real duration.
                step_s = control.last_obs.step_time_s if control.last_obs else None
                control.duty = (
                    step_s / (step_s + command.pace_s) if step_s and command.pace_s > 0 else 1.0
                )
                self._send_directives(job, control)
            elif isinstance(command, SetMicroBatch):
                control.micro_batch = command.micro_batch
                self._send_directives(job, control)

    def _send_directives(self, job: JobRecord, control: _JobControl) -> None:
        self._actuators.set_directives(
            job.id, micro_batch=control.micro_batch,
            duty=control.duty if control.duty < 1.0 else None,
        )

    def _complete_decisions(self, control: _JobControl, obs: Observation, now_s: float) -> None:
        due = [(t, i) for t, i in control.pending if t <= now_s]
        if not due:
            return
        control.pending = [(t, i) for t, i in control.pending if t > now_s]
        for _, decision_id in due:
            self._jobs.complete_decision(decision_id, power_after_w=obs.mean_power_w(),
                                         steps_per_s_after=obs.steps_per_s)

    # -- the node cap ------------------------------------------------------------------------------

    @property
    def node_cap_w(self) -> float | None:
        """The node cap this loop holds at run time, W; ``None`` when none is set."""
        return self._node_cap()

    def _node_cap_tick(
        self, active: Sequence[JobRecord], observations: Mapping[int, Observation],
        readings: Mapping[int, GpuReading], now_s: float,
    ) -> dict[int, float | None]:
        cap_w = self._node_cap()
        if cap_w != self._cap_w:
            self._cap_guard = None if cap_w is None else NodeCapGuard(cap_w)
            self._cap_w = cap_w
        if self._cap_guard is None:
            return {job.id: job.watts_per_gpu for job in active}
        node_w = mw_to_w(sum((r.power_avg_mw or 0) for r in readings.values()))
        powers = [
            JobPower(
                job_id=job.id, priority=job.priority, gpus=len(job.gpus),
                power_w=mw_to_w(sum((g.power_avg_mw or 0) for g in observations[job.id].gpus)),
                budget_w=job.watts_per_gpu,
                floor_w=mw_to_w(max((self._facts[i].min_limit_mw for i in job.gpus), default=0)),
            )
            for job in active if job.state == JobState.RUNNING and job.gpus
        ]
        decision = self._cap_guard.tick(now_s, node_w, powers)
        if decision is not None and decision.sentence:
            log.warning("node cap: %s", decision.sentence)
            for job_id in decision.changed:
                obs = observations[job_id]
                budget = decision.budgets_w.get(job_id)
                self._jobs.add_decision(
                    job_id, at=to_datetime(now_s), source="node-cap",
                    what="budget back to its own" if budget is None
                    else f"budget held to {budget:.0f} W per GPU",
                    why=decision.sentence, power_before_w=obs.mean_power_w(),
                    steps_per_s_before=obs.steps_per_s,
                )
        return {p.job_id: self._cap_guard.effective_budget_w(p) for p in powers}

    # -- energy ------------------------------------------------------------------------------------

    def _energy(
        self, job: JobRecord, control: _JobControl, obs: Observation, progress: Progress
    ) -> None:
        if control.followed:
            return
        if job.energy_budget_wh != control.budget_wh:  # changed here or on another node
            control.budget_wh = job.energy_budget_wh
            self.budget_changed(job)
        if control.guard is None or control.forecast is None:
            return
        if control.guard.state == "paused" and job.state == JobState.RUNNING:
            control.guard.resume()  # resumed by hand, through this node or another
        control.forecast.declare(job.total_steps, job.total_tokens)
        forecast = control.forecast.update(obs.now_s, control.energy_j, progress.steps,
                                           progress.tokens)
        event = control.guard.tick(forecast)
        if event is None:
            return
        self._record_energy_event(job, obs, event)
        if event.action is EnergyAction.WARN:
            log.warning("job %d energy budget: %s", job.id, event.why)
        elif event.action is EnergyAction.SLOW:
            self._start_optimiser(job, control, "energy", why=event.why)
        elif event.action is EnergyAction.PAUSE:
            self._on_pause(job, event.why)
        elif event.action is EnergyAction.RESUME:
            self._on_resume(job, event.why)
        elif event.action is EnergyAction.STOP:
            control.stop_reason = f"energy budget: {event.why}"
            self._on_stop(job, control.stop_reason)

    def _record_energy_event(self, job: JobRecord, obs: Observation, event: EnergyEvent) -> None:
        self._jobs.add_decision(
            job.id, at=to_datetime(event.at_s), source="energy", what=event.action.value,
            why=event.why, power_before_w=obs.mean_power_w(), steps_per_s_before=obs.steps_per_s,
        )

    # -- the optimiser -----------------------------------------------------------------------------

    def _start_optimiser(
        self, job: JobRecord, control: _JobControl, objective: str, *, why: str
    ) -> None:
        """Hand the job's setting to the energy optimiser (``scheduler.optimising``)."""
        if not job.gpus:
            return
        choice = control.choice or self._choose(job)
        gpu = job.gpus[0]
        locked = self._actuators_locked(gpu) if choice.mode is Mode.CLOCK else None
        opt = start_optimising(job, choice.mode, self._facts[gpu], locked, objective, why=why,
                               jobs=self._jobs)
        if opt is None:
            return
        control.optimising = opt
        control.choice = choice

    def _drive_optimiser(
        self, job: JobRecord, control: _JobControl, obs: Observation, progress: Progress
    ) -> None:
        """One tick of the job's optimiser; the settings it asks for are decided here."""
        opt = control.optimising
        assert opt is not None
        opt.drive(job.gpus, obs, progress.reports, control.energy_at,
                  lambda decision: self._decide(job, control, decision))
        # The run's other nodes apply the same setting to their GPUs of it.
        if opt.applied is not None and (job.knob, job.knob_setting) != (opt.space.knob,
                                                                        opt.applied):
            self._jobs.set_fields(job.id, knob=opt.space.knob, knob_setting=opt.applied)

    def _follow_setting(
        self, job: JobRecord, control: _JobControl, obs: Observation, setting: tuple[Knob, int]
    ) -> None:
        """Apply the setting the run's owner node's optimiser holds it at, on this node's GPUs
        of it (in place of this node's own wattage controller)."""
        if control.following == setting:
            return
        knob, value = setting
        self._decide(job, control, setting_decision(
            knob, value, job.gpus, obs,
            why=f"the energy optimiser of node {job.host}, which owns the run",
        ))
        control.following = setting
        control.controller = None  # the owner's setting replaces this node's own control


def _arm_energy(control: _JobControl, job: JobRecord) -> None:
    """Give a job with an energy budget its forecast and guard."""
    assert job.energy_budget_wh is not None
    control.budget_wh = job.energy_budget_wh
    control.forecast = EnergyForecast(
        total_steps=job.total_steps, total_tokens=job.total_tokens,
        deadline_s=job.deadline_at.timestamp() if job.deadline_at else None,
    )
    control.guard = EnergyGuard(
        wh_to_j(job.energy_budget_wh), job.on_exceed, stop_lead_s=STOP_LEAD_S
    )
