"""A virtual-time harness: simulated training jobs held to budgets by ``scheduler.control``.

It runs the per-job controllers, the energy guard and the node-cap guard against a
``SimulatedBackend`` on a ``VirtualClock``, the way the daemon does at 1 Hz, but applies their
commands to the simulated GPUs directly (the daemon goes through its actuators and journal). A
simulated job steps with step time ``t_max * slowdown(f)`` (the simulator's clock), obeys pace
directives a report interval after they are given, and makes its GPUs' duty
``t_step / (t_step + pace)``, as the daemon does for paced jobs. Results come from the
simulator's exact energy: per-GPU 1 s and 10 s average power, throughput, energy per token.

Lives in bench/ because it changes simulated GPU settings directly, which product code may do
only through ``scheduler.actuators``. Used by ``tests/test_control.py`` and ``bench/budget.py``::

    node = SimNode(gpus=1)
    job = node.add_job(JobSpec("a", gpus=(0,), mode="soft", budget_w=300.0))
    node.run(120.0)
    stats = node.stats(job, limit_w=300.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from energy.gpu_model import least_energy_clock_mhz
from scheduler.control import (
    WINDOW_TOLERANCE,
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
    NodeCapDecision,
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
from telemetry.backends.base import GpuPermissionError, NotSupportedError
from telemetry.backends.profiles import Workload, get_workload
from telemetry.backends.simulated import SimulatedBackend
from telemetry.clock import VirtualClock

__all__ = ["JobSpec", "JobStats", "SimJob", "SimMode", "SimNode"]

SimMode = Literal["none", "hw", "clock", "soft", "auto"]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A simulated training job.

    Attributes:
        name: A label.
        gpus: GPU indices it runs on (data-parallel: every step waits for the slowest GPU).
        mode: Enforcement mode; ``none`` runs unconstrained with no controller.
        budget_w: Wattage budget per GPU, W (None: none).
        priority: Higher is more important (the node-cap guard tightens the lowest first).
        workload: The simulated workload (``training``: about 655 W on an H100 SXM).
        tokens_per_step: Tokens one step processes.
        total_steps: Declared total steps (the job ends there), or None.
        energy_budget_wh: Energy budget, Wh, or None.
        on_exceed: The energy-budget policy.
        start_s: When the job starts, s after the node's start.
        obeys: Whether its client obeys pace directives (an attached job may not).
        stop_grace_s: How long a stopped job keeps running before it exits, s.
    """

    name: str
    gpus: tuple[int, ...] = (0,)
    mode: SimMode = "none"
    budget_w: float | None = None
    priority: int = 0
    workload: Workload | str = "training"
    tokens_per_step: int = 4096
    total_steps: int | None = None
    energy_budget_wh: float | None = None
    on_exceed: Literal["warn", "slow", "pause", "stop"] = "warn"
    start_s: float = 0.0
    obeys: bool = True
    stop_grace_s: float = 1.0


@dataclass(slots=True)
class SimJob:
    """A running simulated job (the harness's state of it)."""

    spec: JobSpec
    workload: Workload
    id: int
    choice: ModeChoice | None = None
    controller: PowerController | None = None
    forecast: EnergyForecast | None = None
    guard: EnergyGuard | None = None
    steps: float = 0.0
    pace_s: float = 0.0
    micro_batch: int | None = None
    pending_pace: list[tuple[float, float]] = field(default_factory=list)
    started: bool = False
    paused: bool = False
    stop_at: float | None = None
    ended_at: float | None = None
    energy_origin_mj: dict[int, float] = field(default_factory=dict)
    energy_end_mj: dict[int, float] = field(default_factory=dict)
    counter_origin_mj: dict[int, int] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    energy_events: list[EnergyEvent] = field(default_factory=list)
    apply_errors: list[str] = field(default_factory=list)
    step_log: list[tuple[float, float]] = field(default_factory=list)  # (s, steps) each second
    _due_after: list[tuple[float, int]] = field(default_factory=list)  # (time, decision index)

    @property
    def running(self) -> bool:
        """Started and not ended."""
        return self.started and self.ended_at is None

    @property
    def tokens(self) -> float:
        """Tokens processed so far."""
        return self.steps * self.spec.tokens_per_step


@dataclass(frozen=True, slots=True)
class JobStats:
    """What a run measured for one job, from the simulator's exact energy.

    Attributes:
        settle_s: Seconds after the job's start until every later 1 s average of each of its
            GPUs stays at or under ``limit * 1.02`` (within the span); 0 without a limit.
        windows: 10 s windows (1 s stride, one per GPU) counted after settling.
        within_share: Share of those windows whose average is at or under ``limit * 1.02``.
        max_window_w: Highest 10 s average among them, W.
        mean_power_w: Mean power per GPU over the measured span, W.
        steps_per_s / tokens_per_s: Throughput over the measured span.
        energy_per_token_j: Energy of the job's GPUs per token over the span, J.
        energy_j: Energy of the job's GPUs from its start to its end (or now), J.
    """

    settle_s: float
    windows: int
    within_share: float
    max_window_w: float
    mean_power_w: float
    steps_per_s: float
    tokens_per_s: float
    energy_per_token_j: float
    energy_j: float


class SimNode:
    """Simulated GPUs, jobs and the 1 Hz control loop on one virtual clock.

    Args:
        gpus: GPUs on the node.
        sku: SKU profile.
        seed: Sensor noise seed.
        node_cap_w: Node power cap, W, held by a ``NodeCapGuard`` (None: no cap).
        tick_s: Simulation step, s (sensors update every 0.1 s).
        directive_delay_s: Time until a client obeys a new pace (its report interval), s.
        permission_denied: Inject ``PERMISSION_DENIED`` on every GPU (no root).
    """

    def __init__(
        self,
        gpus: int = 1,
        sku: str = "H100-SXM",
        *,
        seed: int = 0,
        node_cap_w: float | None = None,
        tick_s: float = 0.1,
        directive_delay_s: float = 1.0,
        permission_denied: bool = False,
    ) -> None:
        self.clock = VirtualClock()
        self.backend = SimulatedBackend(gpus, sku, clock=self.clock, seed=seed)
        if permission_denied:
            for i in range(gpus):
                self.backend.inject_fault(i, "permission_denied")
        self.t0 = self.clock.now()
        self._ticks = 0
        self._tick_s = tick_s
        self._per_s = round(1.0 / tick_s)
        self._delay_s = directive_delay_s
        self.jobs: list[SimJob] = []
        self.cap_guard = NodeCapGuard(node_cap_w) if node_cap_w is not None else None
        self.cap_decisions: list[NodeCapDecision] = []
        self._locks: dict[int, int] = {}
        self._duty: dict[int, float] = {}
        self._busy: dict[int, Workload | None] = {}
        sku_p = self.backend.sku
        self.facts = {
            d.index: GpuFacts(
                index=d.index,
                min_limit_mw=d.min_limit_mw or 0,
                max_limit_mw=d.max_limit_mw or 0,
                default_limit_mw=d.default_limit_mw or 0,
                min_sm_clock_mhz=d.min_sm_clock_mhz or 0,
                max_sm_clock_mhz=d.max_sm_clock_mhz or 0,
                sm_clock_step_mhz=round(sku_p.sm_clock_step_mhz),
                idle_power_mw=round(sku_p.idle_power_w * 1000),
            )
            for d in self.backend.devices()
        }
        self.energy_log: list[dict[int, float]] = [self._energies()]  # each second, mJ

    # --- set-up and events -------------------------------------------------------------------

    @property
    def now_s(self) -> float:
        """Seconds since the node started (exact: counted in ticks)."""
        return self._ticks / self._per_s

    def add_job(self, spec: JobSpec) -> SimJob:
        """Add a job; it starts at ``spec.start_s``."""
        wl = get_workload(spec.workload) if isinstance(spec.workload, str) else spec.workload
        job = SimJob(spec=spec, workload=wl, id=len(self.jobs) + 1)
        if spec.energy_budget_wh is not None:
            job.forecast = EnergyForecast(total_steps=spec.total_steps)
            job.guard = EnergyGuard(spec.energy_budget_wh * 3600.0, spec.on_exceed)
        self.jobs.append(job)
        return job

    def set_activity(self, job: SimJob, activity: float) -> None:
        """Change the job's load (a new phase): its workload's activity from now on."""
        job.workload = replace(job.workload, activity=activity)
        for i in job.spec.gpus:
            self._busy[i] = None  # force the GPU to take the new workload

    def run(
        self, duration_s: float, *, events: Mapping[float, Callable[[SimNode], None]] | None = None
    ) -> None:
        """Advance ``duration_s`` of virtual time; ``events`` run at their times (s since start)."""
        pending = sorted((events or {}).items())
        end_tick = self._ticks + round(duration_s * self._per_s)
        while self._ticks < end_tick:
            while pending and pending[0][0] <= self.now_s + 1e-9:
                pending.pop(0)[1](self)
            self._step()

    # --- the loop ----------------------------------------------------------------------------

    def _energies(self) -> dict[int, float]:
        return {d.index: self.backend.true_energy_mj(d.index) for d in self.backend.devices()}

    def _step(self) -> None:
        now = self.now_s
        for job in self.jobs:
            self._advance_job(job, now)
        self.clock.advance(self._tick_s)
        self._ticks += 1
        if self._ticks % self._per_s == 0:
            self.energy_log.append(self._energies())
            for job in self.jobs:
                if job.running:
                    job.step_log.append((self.now_s, job.steps))
            self._control()

    def _advance_job(self, job: SimJob, now: float) -> None:
        spec = job.spec
        if not job.started:
            if now + 1e-9 < spec.start_s:
                return
            job.started = True
            job.energy_origin_mj = {i: self.backend.true_energy_mj(i) for i in spec.gpus}
            job.counter_origin_mj = {i: self.backend.read(i).energy_mj or 0 for i in spec.gpus}
            job.step_log.append((now, 0.0))
            self._start_control(job)
        if job.ended_at is not None:
            return
        if job.stop_at is not None and now + 1e-9 >= job.stop_at:
            self._end(job, now)
            return
        while job.pending_pace and job.pending_pace[0][0] <= now + 1e-9:
            job.pace_s = job.pending_pace.pop(0)[1]
        busy_s = self._busy_step_s(job)
        if job.paused:
            duty = 0.0
        else:
            duty = busy_s / (busy_s + job.pace_s)
            job.steps += self._tick_s / (busy_s + job.pace_s)
        for i in spec.gpus:
            if self._busy.get(i) is not job.workload or abs(self._duty.get(i, -1.0) - duty) > 1e-9:
                self.backend.set_workload(i, job.workload, duty=duty)
                self._busy[i], self._duty[i] = job.workload, duty
        if spec.total_steps is not None and job.steps >= spec.total_steps:
            job.steps = float(spec.total_steps)
            self._end(job, now + self._tick_s)

    def _busy_step_s(self, job: SimJob) -> float:
        slow = max(self.backend.step_slowdown(i) for i in job.spec.gpus)
        return job.workload.step_time_s * slow

    def _end(self, job: SimJob, now: float) -> None:
        job.ended_at = now
        job.energy_end_mj = {i: self.backend.true_energy_mj(i) for i in job.spec.gpus}
        for i in job.spec.gpus:
            self.backend.set_workload(i, None)
            self._busy[i] = None
            self._duty[i] = 1.0
        if job.controller is not None:
            self._apply(job, job.controller.undo(self._observe(job)))

    def _start_control(self, job: SimJob) -> None:
        mode = job.spec.mode
        if mode == "none":
            return
        first = job.spec.gpus[0]
        hw_ok = clocks_ok = True
        if mode in ("auto", "hw", "clock"):
            # Probe once: set the current limit / unlock clocks (changes nothing if permitted).
            try:
                limit = self.backend.read(first).power_limit_mw or self.facts[first].max_limit_mw
                self.backend.set_power_limit(first, limit)
            except (GpuPermissionError, NotSupportedError):
                hw_ok = False
            try:
                self.backend.reset_sm_clocks(first)
            except (GpuPermissionError, NotSupportedError):
                clocks_ok = False
        job.choice = choose_mode(mode, hw_permitted=hw_ok, clocks_permitted=clocks_ok)
        job.controller = make_controller(job.choice.mode)

    def _observe(self, job: SimJob, budget_w: float | None = None) -> Observation:
        gpus = []
        for i in job.spec.gpus:
            r = self.backend.read(i)
            gpus.append(
                GpuObservation(self.facts[i], r.power_avg_mw, r.power_limit_mw, self._locks.get(i))
            )
        rate = None
        if len(job.step_log) >= 2:
            (t_a, s_a), (t_b, s_b) = job.step_log[max(len(job.step_log) - 6, 0)], job.step_log[-1]
            rate = (s_b - s_a) / (t_b - t_a) if t_b > t_a else None
        started = job.steps > 0
        return Observation(
            now_s=self.now_s,
            gpus=tuple(gpus),
            budget_w=budget_w,
            steps_per_s=rate,
            tokens_per_s=None if rate is None else rate * job.spec.tokens_per_step,
            step_time_s=self._busy_step_s(job) if started else None,
            pace_s=job.pace_s,
            micro_batch=job.micro_batch,
        )

    def _control(self) -> None:
        now = self.now_s
        running = [j for j in self.jobs if j.running]
        budgets = {j.id: j.spec.budget_w for j in running}
        if self.cap_guard is not None:
            node_w = sum((self.backend.read(i).power_avg_mw or 0) for i in self.facts) / 1000.0
            powers = []
            for j in running:
                power_w = sum((self.backend.read(i).power_avg_mw or 0) for i in j.spec.gpus)
                floor = min(self.facts[i].min_limit_mw for i in j.spec.gpus) / 1000.0
                powers.append(
                    JobPower(
                        j.id,
                        j.spec.priority,
                        len(j.spec.gpus),
                        power_w / 1000.0,
                        j.spec.budget_w,
                        floor,
                    )
                )
            cap = self.cap_guard.tick(now, node_w, powers)
            if cap is not None:
                self.cap_decisions.append(cap)
            budgets = {p.job_id: self.cap_guard.effective_budget_w(p) for p in powers}
        for job in running:
            obs = self._observe(job, budgets.get(job.id))
            for due, k in [d for d in job._due_after if d[0] <= now + 1e-9]:
                job.decisions[k] = job.decisions[k].after(obs)
                job._due_after.remove((due, k))
            if job.controller is not None and job.stop_at is None:
                for decision in job.controller.tick(obs):
                    self._apply(job, decision.commands)
                    job.decisions.append(decision)
                    job._due_after.append((now + 5.0, len(job.decisions) - 1))
            if job.guard is not None and job.forecast is not None:
                energy_j = (
                    sum(
                        (self.backend.read(i).energy_mj or 0) - job.counter_origin_mj[i]
                        for i in job.spec.gpus
                    )
                    / 1000.0
                )
                forecast = job.forecast.update(now, energy_j, job.steps, job.tokens)
                event = job.guard.tick(forecast)
                if event is not None:
                    job.energy_events.append(event)
                    self._energy_action(job, event)

    def _energy_action(self, job: SimJob, event: EnergyEvent) -> None:
        if event.action is EnergyAction.SLOW:
            # The least-energy setting the optimiser knows: here, the model's least-energy clock.
            clock = round(least_energy_clock_mhz(self.backend.sku.model, job.workload.model))
            self._apply(job, [LockClocks(i, clock) for i in job.spec.gpus])
        elif event.action is EnergyAction.PAUSE:
            job.paused = True
        elif event.action is EnergyAction.RESUME:
            job.paused = False
        elif event.action is EnergyAction.STOP:
            job.stop_at = self.now_s + job.spec.stop_grace_s

    def _apply(self, job: SimJob, commands: tuple[Command, ...] | list[Command]) -> None:
        for cmd in commands:
            try:
                if isinstance(cmd, SetPowerLimit):
                    self.backend.set_power_limit(cmd.index, cmd.limit_mw)
                elif isinstance(cmd, ResetPowerLimit):
                    self.backend.reset_power_limit(cmd.index)
                elif isinstance(cmd, LockClocks):
                    fmin = self.facts[cmd.index].min_sm_clock_mhz
                    self.backend.lock_sm_clocks(cmd.index, fmin, cmd.max_mhz)
                    self._locks[cmd.index] = cmd.max_mhz
                elif isinstance(cmd, ResetClocks):
                    self.backend.reset_sm_clocks(cmd.index)
                    self._locks.pop(cmd.index, None)
                elif isinstance(cmd, SetPace):
                    if job.spec.obeys:
                        job.pending_pace.append((self.now_s + self._delay_s, cmd.pace_s))
                elif isinstance(cmd, SetMicroBatch):
                    job.micro_batch = cmd.micro_batch
            except (GpuPermissionError, NotSupportedError) as exc:
                job.apply_errors.append(f"{cmd}: {exc}")

    # --- measurements ------------------------------------------------------------------------

    def gpu_power_w(self, index: int, start_s: float, end_s: float) -> float:
        """Exact mean power of a GPU over whole seconds ``[start_s, end_s]`` since start, W."""
        a, b = round(start_s), round(end_s)
        log = self.energy_log
        return (log[b][index] - log[a][index]) / 1000.0 / (b - a)

    def node_windows_w(self, start_s: float, end_s: float, window_s: int = 10) -> list[float]:
        """10 s averages of the whole node's power (1 s stride) within the span, W."""
        out = []
        for a in range(math.ceil(start_s), math.floor(end_s) - window_s + 1):
            out.append(sum(self.gpu_power_w(i, a, a + window_s) for i in self.facts))
        return out

    def stats(
        self,
        job: SimJob,
        *,
        limit_w: float | None = None,
        measure_from_s: float = 20.0,
        until_s: float | None = None,
        window_s: int = 10,
    ) -> JobStats:
        """Measure a job: settling, 10 s windows, throughput and energy per token.

        Args:
            job: The job.
            limit_w: The per-GPU budget windows are judged against, W (None: not judged).
            measure_from_s: Throughput and energy are measured from this long after the job's
                start (steady state), s.
            until_s: End of the span, s since the node's start (default: the job's end or now).
            window_s: Window length, s.
        """
        start = round(job.spec.start_s)
        end = math.floor(until_s if until_s is not None else (job.ended_at or self.now_s))
        gpus = job.spec.gpus
        settle = 0.0
        windows: list[float] = []
        if limit_w is not None:
            bar = limit_w * (1.0 + WINDOW_TOLERANCE)
            last_bad = start
            for t in range(start + 1, end + 1):
                if any(self.gpu_power_w(i, t - 1, t) > bar for i in gpus):
                    last_bad = t
            settle = float(last_bad - start)
            for a in range(last_bad, end - window_s + 1):
                windows.extend(self.gpu_power_w(i, a, a + window_s) for i in gpus)
        within = (
            sum(w <= limit_w * (1.0 + WINDOW_TOLERANCE) for w in windows) / len(windows)
            if windows and limit_w is not None
            else 1.0
        )
        m0 = min(start + round(measure_from_s), end - 1)
        steps = dict(job.step_log)
        s0 = _steps_at(steps, m0)
        s1 = _steps_at(steps, end)
        span = end - m0
        energy_span_j = sum(self.gpu_power_w(i, m0, end) for i in gpus) * span
        tokens = (s1 - s0) * job.spec.tokens_per_step
        ends = job.energy_end_mj or {i: self.backend.true_energy_mj(i) for i in gpus}
        energy_j = sum(ends[i] - job.energy_origin_mj[i] for i in gpus) / 1000.0
        return JobStats(
            settle_s=settle,
            windows=len(windows),
            within_share=within,
            max_window_w=max(windows) if windows else 0.0,
            mean_power_w=energy_span_j / span / len(gpus),
            steps_per_s=(s1 - s0) / span,
            tokens_per_s=tokens / span,
            energy_per_token_j=energy_span_j / tokens if tokens > 0 else math.inf,
            energy_j=energy_j,
        )


def _steps_at(log: Mapping[float, float], t: float) -> float:
    """Steps done at whole second ``t`` (the last logged value at or before it)."""
    best_t = max((k for k in log if k <= t + 1e-9), default=None)
    return 0.0 if best_t is None else log[best_t]
