"""The job service: what the API asks for, and the control loop that places, launches and reaps.

The API thread and the control loop both call in; one lock serialises them, so every decision
sees the store as the last one left it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pwd
import signal
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import psutil

from energy.units import mj_to_j, mw_to_w
from reports.queries import ReportInputError, ReportRequest, build_report
from scheduler.actuators import Actuators
from scheduler.budgets import BudgetLoop, Progress
from scheduler.cluster.ray.headroom import HeldPower, claim_env, headroom, ray_claim
from scheduler.errors import Caller, ConflictError, ForbiddenError, NotFoundError
from scheduler.jobs import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Action,
    Directive,
    Hold,
    JobState,
    MemberState,
)
from scheduler.launcher import Launcher, matching_process
from scheduler.placement import GpuSlot, Waiting, check_request, plan
from scheduler.runs import is_allocation_key, slurm_allocation_key, slurm_step_of
from scheduler.schemas import (
    AllocationEndRequest,
    AllocationRequest,
    AttachRequest,
    JobEnergy,
    JobView,
    LogChunk,
    MemberView,
    NodeUpdate,
    ProgressReport,
    SettingView,
    SubmitRequest,
    UpdateRequest,
)
from scheduler.settings import Settings
from scheduler.sim_adapter import Load, NoSimulation, SimAdapter
from scheduler.store import (
    JobRecord,
    JobStore,
    JournalStore,
    MemberRecord,
    MembershipError,
    NewJob,
    NewMember,
)
from telemetry.backends.base import GpuBackend, GpuError, GpuInfo
from telemetry.clock import Clock, WallClock, to_datetime
from telemetry.sampler import LatestReadings
from telemetry.store import Store

log = logging.getLogger(__name__)

ACTIVITY_TIMEOUT_S = 3.0
"""A simulated GPU counts as busy while its job reported a step within this many seconds."""

QUEUED_AND_ACTIVE = frozenset({JobState.QUEUED}) | ACTIVE_STATES

HOLD_LEAD_S = 3.0
"""A collective hold takes effect this many seconds of the fastest rank's steps ahead of the
furthest step reported: a rank learns of it at its next report (within its one-second report
interval) after having stepped on since its last one, and a rank on another node a control tick
later still."""


JOIN_GRACE_S = 30.0
"""A run whose every member has ended cleanly but that fewer ranks joined than its world size
completes this long after the last one ended (some ranks never used the client)."""

PROGRESS_LOG_S = 0.5
"""A job's progress series gets at most one row per this many seconds from this node (a run of
many ranks reports many times a second; each rank's own totals are kept on its member row)."""

RATE_WINDOW_S = 10.0
"""A member's step rate is measured over its reports of this many seconds."""


@dataclass(slots=True)
class _Live:
    """What the service keeps in memory about a job between control ticks."""

    last_step_at: float = -math.inf  # clock time of the last progress report that moved
    steps: int = 0
    progress: Progress = field(default_factory=Progress)
    logged_s: float = -math.inf  # when this node last added to the job's progress series
    terminate_at: float | None = None  # when ranks still running after a stop get a signal
    signalled: bool = False  # SIGTERM went to them: the next is SIGKILL
    step_time_s: dict[int, float] = field(default_factory=dict)  # member id -> its step time
    duty_shared: float | None = None  # the pacing this node last wrote for the run


@dataclass(frozen=True, slots=True)
class RunningJob:
    """A job active on this node as the last control tick left it: what ``/metrics`` shows
    (``scheduler.metrics``), kept in memory so that a scrape reads neither the store nor a GPU.

    Attributes:
        id / name / user / state / mode / mode_effective / on_exceed: As in its ``JobRecord``
            (the states and modes as their names).
        owner: This node owns the job (takes its energy decisions): ``energy_j``, ``tokens``
            and ``energy_budget_wh`` are the run's, from this node only.
        gpus: Its GPUs on this node.
        power_w: 1 s average power summed over those GPUs, W (``None``: none readable).
        budget_w: The wattage budget in force per GPU (the node-cap guard may hold it under the
            job's own), W; ``None``: none.
        energy_j: Its energy so far as the budget loop adds it up, J (``None`` off its owner).
        energy_budget_wh: Its energy budget, Wh.
        tokens: The run's tokens as last reported to this node.
    """

    id: int
    name: str
    user: str
    state: str
    mode: str
    mode_effective: str | None
    on_exceed: str
    owner: bool
    gpus: tuple[int, ...]
    power_w: float | None
    budget_w: float | None
    energy_j: float | None
    energy_budget_wh: float | None
    tokens: int


@dataclass(slots=True)
class _MemberRate:
    """A member's recent reports (clock time, steps), for its step rate."""

    reports: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=32))

    def add(self, now_s: float, steps: int) -> float | None:
        while self.reports and self.reports[0][0] < now_s - RATE_WINDOW_S:
            self.reports.popleft()
        if self.reports and steps < self.reports[-1][1]:  # restarted from a checkpoint
            self.reports.clear()
        self.reports.append((now_s, steps))
        (t0, s0), (t1, s1) = self.reports[0], self.reports[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None


class ClusterShares(Protocol):
    """This node's part of the cluster cap, as the leader last divided it."""

    def node_cap_w(self) -> float | None: ...
    def job_watts(self, job_id: int) -> float | None: ...


class JobService:
    """Jobs on one node: submit, attach, cancel, progress, and the control tick.

    Args:
        settings: Socket path, grace period, node cap, home (job logs go to ``home/jobs/<id>``).
        store: The store (jobs and samples).
        backend: This node's GPUs.
        gpu_ids: GPU index → the GPU's id in the store.
        host: This node's name (jobs of other nodes in a shared store are not touched).
        readings: The GPUs' latest readings, which the budget loop observes (the sampler).
        actuators: The only way GPU settings and soft directives change.
        launcher: Starts, polls and stops job processes.
        sim: What only simulated GPUs need (their load follows the jobs; the ``slowdown``
            directive); ``NoSimulation`` by default, for real GPUs.
        clock: Time source.
        cluster: This node's part of the cluster cap (``scheduler.cluster.cap``): a node cap and
            per-job watts, held as the lower of them and the node's and jobs' own.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        backend: GpuBackend,
        gpu_ids: dict[int, int],
        *,
        host: str,
        readings: LatestReadings,
        actuators: Actuators | None = None,
        launcher: Launcher | None = None,
        sim: SimAdapter | None = None,
        clock: Clock | None = None,
        cluster: ClusterShares | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._jobs = JobStore(store)
        self._backend = backend
        self._gpu_ids = gpu_ids
        self._host = host
        self._clock = clock or WallClock()
        self.actuators = actuators or Actuators(
            backend, store, host=host, gpu_ids=gpu_ids, dry_run=settings.dry_run, clock=self._clock
        )
        self._launcher = launcher or Launcher(
            clock=self._clock,
            log_dir_of=lambda job: self._log_dir(job.id),
            python=settings.runner_python,
        )
        self._lock = threading.RLock()
        self._live: dict[int, _Live] = {}
        self._rates: dict[int, _MemberRate] = {}  # member id ->
        self._run_duty: dict[int, float] = {}  # job id -> the lowest pacing any node asks
        self._controlled: set[int] = set()  # jobs the budget loop held last tick
        self._infos: dict[int, GpuInfo] = {d.index: d for d in backend.devices()}
        # Each GPU's idle power for Ray's headroom (``node``): the backend's, else as last read free
        self._idle_known = {c.index: c.idle_power_mw for c in backend.capabilities().gpus}
        self._idle_seen: dict[int, float] = {}
        self._sim = sim or NoSimulation()
        self._running: tuple[RunningJob, ...] = ()  # the last tick's snapshot (running_jobs)
        self._running_lock = threading.Lock()
        for job in self._active():
            # Adopted jobs count as stepping until their clients report again.
            self._live_of(job.id).last_step_at = self._clock.now()
            self._sim.adopt(job.gpus)
        self._cluster = cluster
        default_cap_w = sum(mw_to_w(d.max_limit_mw or 0) for d in self._infos.values())
        # Placement always checks against a cap (by default the sum of the maximum limits); the
        # run-time guard only holds one that is set: the default is the cards' own limits.
        self.node_cap_w = settings.node_cap_w or default_cap_w
        self._cap_set = settings.node_cap_w is not None
        self.budgets = BudgetLoop(
            backend.capabilities(), self._jobs, self.actuators, self._infos, readings=readings,
            node_cap=self._held_node_cap,
            clock=self._clock, on_pause=self._pause, on_resume=self._resume_for_budget,
            on_stop=self._stop_for_budget, remote_samples=store.latest_samples,
        )

    # -- the API ---------------------------------------------------------------------------------

    def submit(self, caller: Caller, req: SubmitRequest) -> JobView:
        """Queue a job to run as the caller."""
        if not os.path.isdir(req.cwd):
            raise ValueError(f"cwd: no such directory: {req.cwd}")
        check_request(
            req.gpu_ids or req.gpus or 1,
            req.watts,
            self._slots(busy=frozenset()),
            node_cap_w=self.node_cap_w,
        )
        new = NewJob(
            name=req.name or Path(req.argv[0]).name,
            user=caller.user,
            uid=caller.uid,
            gid=caller.gid,
            argv=tuple(req.argv),
            cwd=req.cwd,
            env=claim_env(req.env, caller.pid, _started_at(caller.pid)),  # Ray's, or none
            host=self._host,
            gpu_count=None if req.gpu_ids else (req.gpus or 1),
            gpu_ids_requested=tuple(req.gpu_ids) if req.gpu_ids else None,
            watts_per_gpu=req.watts,
            energy_budget_wh=req.energy_wh,
            mode=req.mode,
            on_exceed=req.on_exceed,
            priority=req.priority,
            objective=req.objective, deadline_at=req.deadline,
        )
        if req.deadline is not None and req.deadline <= self._now():
            raise ValueError(f"deadline: {req.deadline.isoformat()} has already passed")
        with self._lock:
            job = self._jobs.create(new, at=self._now())
        log.info("job %d (%s) submitted by %s", job.id, job.name, job.user)
        return self._view(job)

    def attach(self, caller: Caller, req: AttachRequest) -> JobView:
        """Register a process started elsewhere: a plain job of its own, a rank of a distributed
        run (every rank with the same ``run_key`` joins one job), or a process of a submitted
        job (``job_id``). The answer's ``member_id`` names the process in its reports."""
        pid = req.pid or caller.pid
        if pid is None:
            raise ValueError("pid: required over TCP (a token names no process of its own)")
        try:
            proc = psutil.Process(pid)
            uid, create_time = proc.uids().real, proc.create_time()
            argv, cwd = tuple(proc.cmdline()), proc.cwd()
        except psutil.NoSuchProcess:
            raise ValueError(f"pid: no process {pid}") from None
        except psutil.AccessDenied:
            raise ForbiddenError(f"process {pid} is not yours") from None
        if uid != caller.uid and not caller.admin:
            raise ForbiddenError(f"process {pid} belongs to uid {uid}, not to you")
        indices = sorted(req.gpu_ids if req.gpu_ids is not None else self._gpus_of_pid(proc))
        unknown = sorted(set(indices) - set(self._infos))
        if unknown:
            raise ValueError(
                f"gpu_ids: no GPU {unknown} on this node (GPUs: 0..{len(self._infos) - 1})"
            )
        if indices and req.job_id is None:
            check_request(tuple(indices), req.watts, self._slots(busy=frozenset()))
        member = NewMember(
            host=self._host, rank=req.rank, local_rank=req.local_rank,
            world_size=req.world_size, generation=req.generation, pid=pid,
            pid_create_time=create_time, gpus=tuple(indices),
        )
        gpus = [(self._gpu_ids[i], i) for i in indices]
        new = NewJob(
            name=req.name, user=caller.user, uid=caller.uid, gid=caller.gid, argv=argv,
            cwd=cwd, host=self._host, gpu_ids_requested=tuple(indices) or None,
            watts_per_gpu=req.watts, energy_budget_wh=req.energy_wh, mode=req.mode,
            on_exceed=req.on_exceed, total_steps=req.total_steps,
            total_tokens=req.total_tokens, attached=True, pid=pid, pid_create_time=create_time,
            run_key=req.run_key, world_size=req.world_size if req.run_key else None,
            generation=req.generation if req.run_key else None,
        )
        with self._lock:
            now = self._now()
            try:
                if req.job_id is not None:
                    self._owned(caller, req.job_id, "join")
                    job, joined = self._jobs.join(req.job_id, member, gpus=gpus, at=now)
                elif (held := self._allocation_for(caller, req.run_key, indices)) is not None:
                    job, joined = self._join_allocation(held, member, req.run_key)
                elif req.run_key is not None:
                    job, joined = self._jobs.join_run(new, member, gpus=gpus, at=now)
                else:
                    job = self._jobs.create(new, at=now)
                    job = self._jobs.transition(
                        job.id, JobState.RUNNING, "attached: already running", at=now, gpus=gpus
                    )
                    job, joined = self._jobs.join(job.id, member, gpus=gpus, at=now)
            except MembershipError as exc:
                log.warning("refused a member from pid %d: %s", pid, exc)
                raise ConflictError(str(exc)) from None
        log.info("job %d (%s): rank %d of %d joined: pid %d of %s on GPUs %s", job.id, job.name,
                 joined.rank, joined.world_size, pid, job.user, list(joined.gpus))
        return self._view(job).model_copy(update={"member_id": joined.id})

    def _allocation_for(
        self, caller: Caller, run_key: str | None, indices: Sequence[int]
    ) -> JobRecord | None:
        """The active Slurm allocation a process joins: its step's (``slurm:<job>.<step>``),
        else the one holding its GPUs on this node (a batch script, or ranks another launcher
        started inside the job); ``None``: none, the process attaches as any other.

        Raises:
            ForbiddenError: That allocation is another user's.
        """
        job: JobRecord | None = None
        step = slurm_step_of(run_key)
        if step is not None:
            job = self._jobs.latest_run(step[0])
            if job is not None and job.state not in ACTIVE_STATES:
                job = None
        if job is None and indices:
            job = next((
                j for j in self._jobs.list(states=ACTIVE_STATES)
                if is_allocation_key(j.run_key) and set(indices) & set(j.on(self._host).gpus)
            ), None)
        if job is not None and caller.uid != job.uid and not caller.admin:
            raise ForbiddenError(
                f"GPUs {list(job.on(self._host).gpus)} belong to job {job.id} "
                f"({job.run_key}) of {job.user}"
            )
        return job

    def _join_allocation(
        self, job: JobRecord, member: NewMember, run_key: str | None
    ) -> tuple[JobRecord, MemberRecord]:
        """A process joins a Slurm allocation: on the allocation's GPUs of this node (those it
        names among them, else all), in its step's generation (step ``s`` is generation
        ``s + 1``; 0 for processes outside any step, such as the batch script)."""
        local = job.on(self._host).gpus
        mine = tuple(i for i in member.gpus if i in local) or local
        step = slurm_step_of(run_key)
        generation = step[1] + 1 if step is not None and step[0] == job.run_key else (
            member.generation)
        return self._jobs.join(job.id, replace(member, gpus=mine, generation=generation),
                               gpus=[], at=self._now())

    def register_allocation(self, caller: Caller, req: AllocationRequest) -> JobView:
        """Register a Slurm job before it starts (its prolog): a job of ``req.user`` running on
        ``req.gpu_ids`` under its budgets, with no process of its own; the control loop holds
        its budgets from its next tick, and its ranks join it. Registering again (the prolog of
        another of its nodes, or the same one re-run) adds GPUs to the same job. An allocation
        still holding one of these GPUs had its epilog lost: it ends here, failed."""
        if not caller.admin:
            raise ForbiddenError("only root or the admin group may register a Slurm job")
        try:
            account = pwd.getpwnam(req.user)
        except KeyError:
            raise ValueError(f"user: no user {req.user!r} on this node") from None
        indices = sorted(req.gpu_ids)
        unknown = sorted(set(indices) - set(self._infos))
        if unknown:
            raise ValueError(
                f"gpu_ids: no GPU {unknown} on this node (GPUs: 0..{len(self._infos) - 1})"
            )
        check_request(tuple(indices), req.watts, self._slots(busy=frozenset()))
        key = slurm_allocation_key(req.slurm_job)
        new = NewJob(
            name=req.name, user=account.pw_name, uid=account.pw_uid, gid=account.pw_gid,
            argv=(), cwd=req.cwd or account.pw_dir, host=self._host,
            gpu_ids_requested=tuple(indices), watts_per_gpu=req.watts,
            energy_budget_wh=req.energy_wh, mode=req.mode, on_exceed=req.on_exceed,
            attached=True, run_key=key,
        )
        with self._lock:
            for stale in self._jobs.list(states=ACTIVE_STATES):
                taken = set(stale.on(self._host).gpus) & set(indices)
                if stale.run_key != key and is_allocation_key(stale.run_key) and taken:
                    self._end(stale, JobState.FAILED, f"its GPUs {sorted(taken)} went to Slurm "
                              f"job {req.slurm_job}: its epilog never reached the daemon")
            try:
                job = self._jobs.open_run(
                    new, gpus=[(self._gpu_ids[i], i) for i in indices], at=self._now()
                )
            except MembershipError as exc:
                raise ConflictError(str(exc)) from None
        log.info("job %d: Slurm job %d of %s on GPUs %s (%s W/GPU, %s Wh)", job.id,
                 req.slurm_job, job.user, indices, req.watts, req.energy_wh)
        return self._view(job)

    def end_allocation(self, caller: Caller, req: AllocationEndRequest) -> JobView:
        """End a Slurm job's job (its epilog) in ``req.state`` and undo every GPU setting made
        for it on this node. Ending it again changes nothing and undoes again (nothing is left
        behind either way)."""
        if not caller.admin:
            raise ForbiddenError("only root or the admin group may end a Slurm job")
        with self._lock:
            job = self._jobs.latest_run(slurm_allocation_key(req.slurm_job))
            if job is None:
                raise NotFoundError(f"no job for Slurm job {req.slurm_job}")
            if job.state in TERMINAL_STATES:
                self.actuators.undo_job(job.id, f"job {job.id}: Slurm job {req.slurm_job} ended")
            else:
                self._end(job, JobState(req.state), req.reason)
            job = self._job(job.id)
        return self._view(job)

    def job_settings(self, job_id: int) -> list[SettingView]:
        """The GPU settings powertrain may have in force for a job on this node (its
        outstanding settings-journal entries)."""
        self._job(job_id)
        return [
            SettingView(gpu=e.gpu_index, setting=e.setting.value, what=e.describe(),
                        status=e.status.value, dry_run=e.dry_run, applied_at=e.applied_at)
            for e in JournalStore(self._store).outstanding(self._host, job_id=job_id)
        ]

    def job_energy(self, job_id: int) -> JobEnergy:
        """A job's GPU energy as ``powertrain report --job`` counts it, and whether it is final
        (``JobEnergy``)."""
        job = self._job(job_id)
        try:
            report = build_report(self._store, ReportRequest(job_id=job.id))
        except ReportInputError:  # no span yet: it has just started
            report = None
        row = next((r for r in report.rows if r.key == str(job.id)), None) if report else None
        complete = False
        if job.ended_at is not None:
            latest = self._store.latest_samples(list(job.gpu_ids))
            complete = all(g in latest and latest[g].sampled_at >= job.ended_at
                           for g in job.gpu_ids)
        return JobEnergy(job=job.id, energy_j=row.energy_j if row else 0.0,
                         method=row.method if row else "none", complete=complete,
                         gpus=len(job.gpu_ids), started_at=job.started_at, ended_at=job.ended_at)

    def list_jobs(self, *, include_ended: bool) -> list[JobView]:
        """This node's jobs: queued and active ones, or all with ``include_ended``."""
        states = None if include_ended else QUEUED_AND_ACTIVE
        return [self._view(j) for j in self._jobs.list(states=states, node=self._host)]

    def get(self, job_id: int) -> JobView:
        return self._view(self._job(job_id))

    def cancel(self, caller: Caller, job_id: int) -> JobView:
        """Cancel a queued job at once; stop an active one: its ranks at one step, then SIGTERM
        (SIGKILL after the grace period)."""
        with self._lock:
            job = self._owned(caller, job_id, "cancel")
            if is_allocation_key(job.run_key) and job.state in ACTIVE_STATES:
                slurm_job = (job.run_key or "").removeprefix("slurm:")
                raise ConflictError(f"job {job_id} is Slurm job {slurm_job}: `scancel "
                                    f"{slurm_job}` ends it")
            reason = f"cancelled by {caller.user}"
            if job.state == JobState.QUEUED:
                job = self._jobs.transition(job.id, JobState.CANCELLED, reason, at=self._now())
            elif job.state in ACTIVE_STATES:
                job = self._hold(job, Hold.CANCEL, reason)
            else:
                raise ConflictError(f"job {job_id} has already ended ({job.state})")
        return self._view(job)

    def checkpoint(self, caller: Caller, job_id: int) -> JobView:
        """Ask every rank of a running job to call its checkpoint hook at one step, and go on."""
        with self._lock:
            job = self._owned(caller, job_id, "checkpoint")
            if job.state != JobState.RUNNING:
                raise ConflictError(f"job {job_id} is {job.state}, not running")
            if job.hold is not None and job.hold is not Hold.CHECKPOINT:
                raise ConflictError(f"job {job_id} is already held ({job.hold})")
            if not self._jobs.members([job.id])[job.id]:
                raise ConflictError(
                    f"job {job_id} has no process that uses the client: nothing to checkpoint"
                )
            job = self._hold(job, Hold.CHECKPOINT, f"checkpoint asked by {caller.user}")
        return self._view(job)

    def update(self, caller: Caller, job_id: int, req: UpdateRequest) -> JobView:
        """Change a job's budgets or priority."""
        with self._lock:
            job = self._owned(caller, job_id, "change")
            if job.state in TERMINAL_STATES:
                raise ConflictError(f"job {job_id} has already ended ({job.state})")
            fields: dict[str, Any] = {}
            if req.watts is not None:
                gpus = job.gpus or job.gpu_ids_requested or job.gpu_count or 1
                check_request(gpus, req.watts, self._slots(busy=frozenset()))
                fields["watts_per_gpu"] = req.watts
            if req.energy_wh is not None:
                fields["energy_budget_wh"] = req.energy_wh
            if req.priority is not None:
                fields["priority"] = req.priority
            if fields:
                job = self._jobs.set_fields(job.id, **fields)
                self.budgets.budget_changed(job)
                log.info("job %d changed by %s: %s", job.id, caller.user, fields)
        return self._view(job)

    def resume(self, caller: Caller, job_id: int) -> JobView:
        """Let a paused job run again: every rank is released at its next report."""
        with self._lock:
            job = self._owned(caller, job_id, "resume")
            if job.state != JobState.PAUSED:
                raise ConflictError(f"job {job_id} is {job.state}, not paused")
            job = self._jobs.transition(
                job.id, JobState.RUNNING, f"resumed by {caller.user}", at=self._now(),
                hold=None, hold_step=None, hold_reason=None,
            )
            self.budgets.resumed_by_hand(job.id)
        return self._view(job)

    def progress(self, caller: Caller, job_id: int, req: ProgressReport) -> Directive:
        """Record a member's cumulative totals; answer with the job's directives.

        The member is the one the report names, else the caller's process among the job's
        members; a job that has none yet takes the caller as its single member (rank 0).
        """
        with self._lock:
            job = self._job(job_id)
            member = self._reporting_member(caller, job, req)
            if job.state in ACTIVE_STATES and member.state is MemberState.RUNNING:
                self._record_progress(job, member, req)
                # every report repeats the declared totals: written when they change
                declared = {"total_steps": req.total_steps, "total_tokens": req.total_tokens}
                changed = {k: v for k, v in declared.items()
                           if v is not None and v != getattr(job, k)}
                if changed:
                    job = self._jobs.set_fields(job.id, **changed)
                if req.final:
                    self._member_said_it_ended(job, member, req.outcome)
            return self._directive(job)

    def _reporting_member(
        self, caller: Caller, job: JobRecord, req: ProgressReport
    ) -> MemberRecord:
        if req.member is not None:
            member = self._jobs.member(req.member)
            if member is None or member.job_id != job.id:
                raise ConflictError(f"member {req.member} is not a member of job {job.id}")
            if member.host != self._host:
                raise ConflictError(
                    f"member {req.member} of job {job.id} runs on {member.host}: it reports to "
                    "that node's daemon"
                )
            speaks_for = (member.pid == caller.pid
                          or (caller.pid is None and caller.uid == job.uid))  # a token: its user
            if not speaks_for and not caller.admin:
                raise ForbiddenError(
                    f"member {req.member} of job {job.id} is pid {member.pid}, not you "
                    f"(pid {caller.pid})"
                )
            return member
        members = self._jobs.members([job.id])[job.id]
        mine = [m for m in members if m.pid == caller.pid and m.host == self._host]
        if mine:
            return mine[-1]
        if caller.uid != job.uid and not caller.admin:
            raise ForbiddenError(
                f"job {job.id} belongs to {job.user}: only {job.user} or an admin may report "
                "progress for it"
            )
        if caller.pid is None:
            raise ConflictError(f"a report over TCP names its member of job {job.id} (member)")
        if members or job.state not in ACTIVE_STATES:
            raise ConflictError(
                f"pid {caller.pid} is not a member of job {job.id}: a process joins a job "
                "through POST /v1/jobs/attach"
            )
        try:  # a job's single process, reporting without having joined (an older client)
            create_time = psutil.Process(caller.pid).create_time()
        except psutil.Error:
            create_time = 0.0
        local = job.on(self._host).gpus
        _, member = self._jobs.join(job.id, NewMember(
            host=self._host, rank=0, local_rank=0, world_size=1, generation=job.generation or 0,
            pid=caller.pid, pid_create_time=create_time, gpus=local,
        ), gpus=[], at=self._now())
        return member

    def _record_progress(self, job: JobRecord, member: MemberRecord, req: ProgressReport) -> None:
        now_s = self._clock.now()
        live = self._live_of(job.id)
        rate = self._rates.setdefault(member.id, _MemberRate()).add(now_s, req.steps)
        log_it = req.final or now_s - live.logged_s >= PROGRESS_LOG_S
        totals = self._jobs.report(
            member, at=to_datetime(now_s), steps=req.steps, samples=req.samples,
            tokens=req.tokens, step_time_s=req.step_time_s, steps_per_s=rate,
            log_progress=log_it,
        )
        if log_it:
            live.logged_s = now_s
        if req.step_time_s:
            live.step_time_s[member.id] = req.step_time_s
        if totals.steps > live.steps:
            live.last_step_at = now_s
        live.steps = totals.steps
        # A run steps at its slowest rank's pace.
        slowest = max(live.step_time_s.values(), default=None)
        live.progress.add(now_s, totals.steps, totals.tokens, slowest)
        if req.micro_batches is not None:  # the loop's micro-batch is a lever
            live.progress.micro_batches = tuple(sorted(set(req.micro_batches)))
            live.progress.default_micro_batch = req.micro_batch_default

    def _member_said_it_ended(
        self, job: JobRecord, member: MemberRecord, outcome: str | None
    ) -> None:
        state = {"error": MemberState.FAILED, "stopped": MemberState.STOPPED}.get(
            outcome or "ok", MemberState.COMPLETED
        )
        reason = {
            MemberState.COMPLETED: "ended cleanly",
            MemberState.FAILED: "ended with an error",
            MemberState.STOPPED: "stopped as the daemon asked",
        }[state]
        if self._jobs.end_member(member.id, state, reason, at=self._now()):
            self._rates.pop(member.id, None)
            self._live_of(job.id).step_time_s.pop(member.id, None)
            log.info("job %d: rank %d (pid %d) %s", job.id, member.rank, member.pid, reason)

    def _directive(self, job: JobRecord) -> Directive:
        action: Action | None = None
        at_step: int | None = None
        if job.state in TERMINAL_STATES:
            action = Action.STOP
        elif job.hold is not None:
            action, at_step = job.hold.action, job.hold_step
        elif job.state == JobState.PAUSED:
            action = Action.PAUSE
        # The actuators hold this node's soft directives; a run spread over nodes is paced at
        # the lowest duty any of them asks, so that its ranks keep in step.
        own = self.actuators.directives(job.id)
        return replace(
            own,
            duty=min(own.duty, self._run_duty.get(job.id, 1.0)),
            slowdown=self._slowdown(job.on(self._host)),
            state=job.state.value,
            action=action,
            at_step=at_step,
        )

    def log_chunk(
        self,
        caller: Caller,
        job_id: int,
        stream: Literal["stdout", "stderr"],
        offset: int,
        limit: int,
    ) -> LogChunk:
        """Part of a job's stdout or stderr log (its owner and admins only)."""
        job = self._owned(caller, job_id, "read the log of")
        path = self._log_dir(job.id) / f"{stream}.log"
        data = b""
        if path.exists():
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read(limit)
        elif job.attached:
            raise ConflictError(f"job {job_id} was attached: its output is wherever it runs")
        return LogChunk(
            job_id=job.id,
            stream=stream,
            offset=offset,
            next_offset=offset + len(data),
            data=data.decode(errors="replace"),
            ended=job.state in TERMINAL_STATES,
        )

    def gpus(self) -> list[dict[str, Any]]:
        """Every GPU's live state and the job holding it (``power_w``: the 1 s average, W)."""
        holders = {i: j.id for j in self._active() for i in j.gpus}
        rows: list[dict[str, Any]] = []
        for index, info in sorted(self._infos.items()):
            row: dict[str, Any] = {
                "index": index,
                "uuid": info.uuid,
                "name": info.name,
                "job": holders.get(index),
            }
            try:
                r = self._backend.read(index)
            except GpuError as exc:
                row["error"] = str(exc)
            else:
                row.update(
                    power_w=_w(r.power_avg_mw),
                    power_limit_w=_w(r.power_limit_mw),
                    energy_j=None if r.energy_mj is None else mj_to_j(r.energy_mj),
                    sm_clock_mhz=r.sm_clock_mhz,
                    gpu_util_pct=r.gpu_util_pct,
                )
            rows.append(row)
        return rows

    def set_node(self, caller: Caller, req: NodeUpdate) -> dict[str, Any]:
        """Change the node power cap (root or the admin group)."""
        if not caller.admin:
            raise ForbiddenError("only root or the admin group may change node settings")
        with self._lock:
            self.node_cap_w = req.node_cap_w
            self._cap_set = True
        log.info("node power cap set to %.0f W by %s", req.node_cap_w, caller.user)
        return {"node_cap_w": self.node_cap_w}

    def node(self) -> dict[str, Any]:
        """This node's power (``GET /v1/node``): its cap, and under ``ray`` what Ray may place
        here beside the jobs outside Ray (``scheduler.cluster.ray.headroom``)."""
        with self._lock:
            active = self._active()
            jobs = [
                HeldPower(job.gpus, self._budget_w(job.watts_per_gpu, job.gpus),
                          self._ray_w(job))
                for job in active
            ]
            busy = {i for job in active for i in job.gpus}
            room = headroom(
                cap_w=self.node_cap_w,
                max_limits_w={i: mw_to_w(d.max_limit_mw or 0) for i, d in self._infos.items()},
                idle_w={i: self._steady_idle_w(i, busy=i in busy) for i in self._infos},
                jobs=jobs,
            )
        return {"node": self._host, "gpus": len(self._infos), "node_cap_w": self.node_cap_w,
                "cap_set": self._cap_set, "ray": room.as_json()}

    def _ray_w(self, job: JobRecord) -> float | None:
        """The watts Ray holds for ``job``: those its submission claimed, while the Ray worker
        that submitted it lives (its task waits on the job); else ``None``."""
        claim = ray_claim(job.env)
        if claim is None or matching_process(claim.pid, claim.create_time) is None:
            return None
        return claim.watts

    def _steady_idle_w(self, index: int, *, busy: bool) -> float:
        """A GPU's idle power for Ray's headroom: the backend's figure where it knows one (a
        simulated GPU), else its reading now while no job holds it, else its last such reading
        (its minimum limit before any)."""
        known = self._idle_known.get(index)
        if known is not None:
            return mw_to_w(known)
        if not busy:
            self._idle_seen[index] = self._idle_power_w(index)
        return self._idle_seen.get(index, mw_to_w(self._infos[index].min_limit_mw or 0))

    # -- the control loop ------------------------------------------------------------------------

    def tick(self) -> None:
        """Reap ended jobs, follow their members, place and launch waiting jobs, hold budgets,
        and keep simulated GPUs in step."""
        with self._lock:
            self._launcher.kill_overdue(self._clock.now())
            here = self._jobs.list(states=ACTIVE_STATES, node=self._host)
            members = self._jobs.members(job.id for job in here)
            reaped = self._reap(here, members)
            changed = self._follow_members(here, members, skip=reaped) or bool(reaped)
            changed = self._place(None if changed else here) or changed
            if changed:  # read again what ended or started
                here = self._jobs.list(states=ACTIVE_STATES, node=self._host)
                members = self._jobs.members(job.id for job in here)
            active = [self._within_cluster(job.on(self._host)) for job in here]
            followed = {job.id for job in here if job.host != self._host}
            remote = {
                job.id: [g for g, h in zip(job.gpu_ids, job.gpu_hosts, strict=True)
                         if h != self._host]
                for job in here if job.host == self._host and job.spans_nodes(self._host)
            }
            for job_id in self._controlled - {job.id for job in here}:
                self._release(job_id, "it ended")  # another node ended it, or it moved away
            self._controlled = {job.id for job in here}
            self.budgets.tick(active, {j.id: self._live_of(j.id).progress for j in active},
                              followed=followed, remote_gpus=remote)
            self._share_duty(here, members)
            if not isinstance(self._sim, NoSimulation):  # the budget loop may have held a job
                self._follow_activity(self._active())
            self._snapshot(active)

    def _held_node_cap(self) -> float | None:
        """The node cap held at run time: the lower of the node's own (when set) and its share
        of the cluster cap."""
        caps = [self.node_cap_w] if self._cap_set else []
        if self._cluster is not None and (share := self._cluster.node_cap_w()) is not None:
            caps.append(share)
        return min(caps, default=None)

    def _within_cluster(self, job: JobRecord) -> JobRecord:
        """``job`` with its budget lowered to its share of the cluster cap, if that is lower."""
        share = None if self._cluster is None else self._cluster.job_watts(job.id)
        if share is None or (job.watts_per_gpu is not None and job.watts_per_gpu <= share):
            return job
        return replace(job, watts_per_gpu=share)

    def running_jobs(self) -> tuple[RunningJob, ...]:
        """The jobs active on this node as the last control tick left them (memory only: for
        ``/metrics``, which must not wait for a tick or read the store)."""
        with self._running_lock:
            return self._running

    def _snapshot(self, active: Sequence[JobRecord]) -> None:
        """Keep what ``running_jobs`` shows: the budget loop's figures and the jobs' progress."""
        running = []
        for job in active:
            energy_j, obs = self.budgets.job_figures(job.id)
            powers = [g.power_avg_mw for g in obs.gpus if g.power_avg_mw is not None] if obs else []
            live = self._live.get(job.id)
            running.append(RunningJob(
                id=job.id, name=job.name, user=job.user, state=job.state.value,
                mode=job.mode.value,
                mode_effective=job.mode_effective.value if job.mode_effective else None,
                on_exceed=job.on_exceed.value, owner=job.host == self._host, gpus=job.gpus,
                power_w=mw_to_w(sum(powers)) if powers else None,
                budget_w=obs.budget_w if obs else job.watts_per_gpu,
                energy_j=energy_j, energy_budget_wh=job.energy_budget_wh,
                tokens=live.progress.tokens if live else 0,
            ))
        with self._running_lock:
            self._running = tuple(running)

    def _release(self, job_id: int, why: str) -> None:
        """This node no longer holds ``job_id``: forget its control and undo its settings."""
        self._live.pop(job_id, None)
        self._run_duty.pop(job_id, None)
        self.budgets.forget(job_id)
        self.actuators.undo_job(job_id, f"job {job_id}: {why}")

    def _reap(
        self, jobs: Sequence[JobRecord], members: Mapping[int, Sequence[MemberRecord]]
    ) -> set[int]:
        """End the jobs of this node whose process is gone: a launched job's runner, or an
        attached job's process that never joined as a member (the members of the others
        decide). The ids of those that ended."""
        ended: set[int] = set()
        for job in jobs:
            if job.host != self._host or (job.attached and members.get(job.id)):
                continue
            if is_allocation_key(job.run_key):  # no process of its own: its epilog ends it
                continue
            status = self._launcher.poll(job)
            if status.running:
                continue
            held = self._held_end(job)
            if held is not None:
                state, reason = held
            elif status.exit_code == 0:
                state, reason = JobState.COMPLETED, "exited with status 0"
            elif status.exit_code is None:
                state, reason = JobState.FAILED, status.reason or "process vanished"
            else:
                state, reason = JobState.FAILED, f"exited with status {status.exit_code}"
            self._end(job, state, reason, exit_code=status.exit_code)
            ended.add(job.id)
        return ended

    def _end(self, job: JobRecord, state: JobState, reason: str, **fields: Any) -> None:
        self._jobs.transition(job.id, state, reason, at=self._now(), **fields)
        self._launcher.forget(job)
        self._release(job.id, str(state))
        self._controlled.discard(job.id)
        log.info("job %d %s: %s", job.id, state, reason)

    def _follow_members(
        self, jobs: Sequence[JobRecord], members: Mapping[int, Sequence[MemberRecord]],
        *, skip: set[int],
    ) -> bool:
        """Check this node's members are alive; end the runs this node owns whose members have
        all ended; SIGTERM ranks that a stop has waited on too long. Whether a run ended."""
        now = self._now()
        gone = False
        jobs = [job for job in jobs if job.id not in skip]  # reaped this tick
        for job in jobs:
            for m in members.get(job.id, ()):
                if (m.host == self._host and m.state is MemberState.RUNNING
                        and matching_process(m.pid, m.pid_create_time) is None):
                    why = f"pid {m.pid} ended without saying it was done"
                    gone = self._jobs.end_member(m.id, MemberState.FAILED, why, at=now) or gone
                    self._rates.pop(m.id, None)
                    log.warning("job %d: rank %d on %s: %s", job.id, m.rank, m.host, why)
            if job.hold in (Hold.STOP, Hold.CANCEL):
                self._enforce_stop(job, members.get(job.id, ()))
        owned = [j for j in jobs if j.attached and j.host == self._host and members.get(j.id)
                 and not is_allocation_key(j.run_key)]  # a Slurm job ends at its epilog
        if gone:
            members = self._jobs.members(j.id for j in owned)
        ended = False
        for job in owned:
            ended = self._settle_run(job, members[job.id]) or ended
        return ended

    def _settle_run(self, job: JobRecord, members: Sequence[MemberRecord]) -> bool:
        """End an attached run once its members have: cancelled or stopped as held once every
        rank has ended (however it ended: a rank that had to be killed too); else failed when
        one failed, completed when every rank has ended cleanly."""
        generation = max(m.generation for m in members)
        current = [m for m in members if m.generation == generation]
        held = job.hold in (Hold.CANCEL, Hold.STOP)
        failed = next((m for m in current if m.state is MemberState.FAILED), None)
        if failed is not None and not held:
            self._end(job, JobState.FAILED,
                      f"rank {failed.rank} on {failed.host} failed: {failed.end_reason}")
            return True
        if any(m.state is MemberState.RUNNING for m in current):
            return False
        world = current[0].world_size
        if len(current) < world and not held:
            last = max(m.ended_at for m in current if m.ended_at is not None)
            if (self._now() - last).total_seconds() < JOIN_GRACE_S:
                return False
        ended = self._held_end(job)
        if ended is None and any(m.state is MemberState.STOPPED for m in current):
            ended = JobState.STOPPED, "stopped"
        if ended is not None:
            self._end(job, *ended)
        else:
            if world == 1:
                why = "its process ended cleanly"
            elif len(current) < world:
                why = f"{len(current)} of {world} ranks ended cleanly (the others never joined)"
            else:
                why = f"all {world} ranks ended cleanly"
            self._end(job, JobState.COMPLETED, why)
        return True

    def _held_end(self, job: JobRecord) -> tuple[JobState, str] | None:
        """How a job that was cancelled or stopped ends, and why; ``None`` when it was not."""
        if job.hold is Hold.CANCEL:
            return JobState.CANCELLED, job.hold_reason or "cancelled"
        stop_reason = self.budgets.stop_reason(job.id)
        if job.hold is Hold.STOP or stop_reason is not None:
            return JobState.STOPPED, job.hold_reason or stop_reason or "stopped"
        return None

    def _enforce_stop(self, job: JobRecord, members: Sequence[MemberRecord]) -> None:
        """Ranks that have not stopped at the held step in time (``HOLD_LEAD_S`` to reach it,
        then the grace period) get SIGTERM, and SIGKILL a grace period later."""
        live = self._live_of(job.id)
        now_s = self._clock.now()
        grace_s = self._settings.cancel_grace_s
        if live.terminate_at is None:
            live.terminate_at = now_s + HOLD_LEAD_S + grace_s
        if now_s < live.terminate_at:
            return
        if job.host == self._host and not job.attached:
            self._launcher.terminate(job, grace_s=grace_s)  # the runner's session; it escalates
            return
        how = signal.SIGKILL if live.signalled else signal.SIGTERM
        for m in members:
            mine = m.host == self._host and m.state is MemberState.RUNNING
            if mine and matching_process(m.pid, m.pid_create_time) is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(m.pid, how)
                    log.warning("job %d: rank %d (pid %d) had not stopped: %s", job.id,
                                m.rank, m.pid, how.name)
        live.signalled = True
        live.terminate_at = now_s + grace_s

    def _share_duty(
        self, jobs: Sequence[JobRecord], members: Mapping[int, Sequence[MemberRecord]]
    ) -> None:
        """A run on several nodes is paced at the lowest duty any node's controller asks: each
        node writes its own on its members, and reads the others' (as of this tick's start)."""
        for job in jobs:
            if not job.spans_nodes(self._host):
                continue
            live = self._live_of(job.id)
            duty = self.actuators.directives(job.id).duty
            if duty != live.duty_shared:
                self._jobs.set_duty(job.id, self._host, duty)
                live.duty_shared = duty
            duties = [m.duty for m in members.get(job.id, ())
                      if m.duty is not None and m.state is MemberState.RUNNING]
            if duty < 1.0:
                duties.append(duty)
            self._run_duty[job.id] = min(duties, default=1.0)

    def _place(self, here: Sequence[JobRecord] | None) -> bool:
        """Launch the waiting jobs that placement lets start (``here``: this node's active jobs,
        if known). Whether one was launched."""
        waiting_jobs = self._jobs.list(states=[JobState.QUEUED], host=self._host)
        if not waiting_jobs:
            return False
        active = self._active() if here is None else [job.on(self._host) for job in here]
        busy = frozenset(i for j in active for i in j.gpus)
        running_w = sum(self._budget_w(j.watts_per_gpu, j.gpus) for j in active)
        waiting = [
            Waiting(
                job_id=j.id,
                priority=j.priority,
                submitted_at=j.submitted_at,
                gpus=j.gpu_ids_requested or j.gpu_count or 1,
                watts_per_gpu=j.watts_per_gpu,
            )
            for j in waiting_jobs
        ]
        by_id = {j.id: j for j in waiting_jobs}
        launched = False
        for placement in plan(
            waiting,
            self._slots(busy=busy),
            node_cap_w=self.node_cap_w,
            running_budget_w=running_w,
            now=self._now(),
        ):
            self._launch(by_id[placement.job_id], placement.gpu_indices)
            launched = True
        return launched

    def _launch(self, job: JobRecord, indices: tuple[int, ...]) -> None:
        now = self._now()
        try:
            launched = self._launcher.launch(
                job,
                indices,
                socket_path=self._settings.socket_path,
                log_dir=self._log_dir(job.id),
            )
        except (OSError, ValueError, KeyError) as exc:
            self._jobs.transition(job.id, JobState.FAILED, f"could not start: {exc}", at=now)
            log.error("job %d could not start: %s", job.id, exc)
            return
        self._jobs.transition(
            job.id,
            JobState.RUNNING,
            f"placed on GPUs {list(indices)}",
            at=now,
            gpus=[(self._gpu_ids[i], i) for i in indices],
            pid=launched.pid,
            pid_create_time=launched.create_time,
        )
        log.info("job %d started on GPUs %s as pid %d", job.id, list(indices), launched.pid)

    def _hold(self, job: JobRecord, hold: Hold, why: str) -> JobRecord:
        """Hold every rank of ``job`` at one step (``scheduler.jobs.Hold``): the furthest step
        any rank reported, plus ``HOLD_LEAD_S`` of the fastest rank's steps. A job none of whose
        processes uses the client is signalled at once (pause has nothing to act on there); a
        job of one process obeys at its next step."""
        members = self._jobs.members([job.id])[job.id]
        running = [m for m in members if m.state is MemberState.RUNNING]
        if not running and hold in (Hold.STOP, Hold.CANCEL):
            self._launcher.terminate(job, grace_s=self._settings.cancel_grace_s)
            return self._jobs.set_fields(job.id, hold=hold, hold_step=None, hold_reason=why)
        step: int | None = None  # a single process obeys at its next step
        if len(running) > 1 or hold is Hold.CHECKPOINT:  # a checkpoint is done once, at its step
            furthest = max(m.steps for m in running)
            fastest = max(m.steps_per_s or 0.0 for m in running)
            step = furthest + math.ceil(fastest * HOLD_LEAD_S) + 1
        log.info("job %d: %s at step %s (%s)", job.id, hold, step or "next", why)
        fields: dict[str, Any] = {"hold": hold, "hold_step": step, "hold_reason": why}
        if hold is Hold.PAUSE:
            return self._jobs.transition(job.id, JobState.PAUSED, f"energy budget: {why}",
                                         at=self._now(), **fields)
        return self._jobs.set_fields(job.id, **fields)

    def _pause(self, job: JobRecord, why: str) -> None:
        """The energy guard pauses a job: every rank checkpoints at one step and waits."""
        self._hold(job, Hold.PAUSE, why)
        log.warning("job %d paused: %s", job.id, why)

    def _resume_for_budget(self, job: JobRecord, why: str) -> None:
        current = self._jobs.get(job.id)
        if current is not None and current.state == JobState.PAUSED:
            self._jobs.transition(job.id, JobState.RUNNING, why, at=self._now(),
                                  hold=None, hold_step=None, hold_reason=None)
            log.info("job %d resumed: %s", job.id, why)

    def _stop_for_budget(self, job: JobRecord, why: str) -> None:
        """The energy guard stops a job: every rank checkpoints and ends at one step; SIGTERM
        for what is left after the grace period."""
        log.warning("job %d stopping: %s", job.id, why)
        self._hold(job, Hold.STOP, f"energy budget: {why}")

    def _follow_activity(self, active: Sequence[JobRecord]) -> None:
        """On simulated GPUs, a job's GPUs are busy while its steps keep coming, else idle."""
        now = self._clock.now()
        busy: dict[int, Load] = {}
        for job in active:
            live = self._live.get(job.id)
            stepping = live is not None and now - live.last_step_at < ACTIVITY_TIMEOUT_S
            # A job being stopped or cancelled ends its GPU work with its loop: at the held
            # step, or at once when no process of it uses the client (SIGTERM).
            ending = live is not None and job.hold in (Hold.STOP, Hold.CANCEL) and (
                job.hold_step is None or live.steps >= job.hold_step
            )
            # A paused job's client learns of the pause at its next report and steps until
            # then: its GPU idles once its steps stop coming, not when the state changes, or
            # those steps would look free to the energy forecast (which then resumes the job).
            if stepping and live is not None and not ending:
                # A paced job keeps its GPU busy only while it steps, idle while it sleeps: the
                # client sleeps d * (1/duty - 1) after each step of duration d.
                duty = self.budgets.duty(job.id)
                scale = self._micro_batch_scale(job, live)
                for index in job.gpus:
                    busy[index] = ((job.pid,) if job.pid else (), round(duty, 3), scale)
        self._sim.follow(busy)

    def _micro_batch_scale(self, job: JobRecord, live: _Live) -> float:
        """The micro-batch the job trains in, as a multiple of its loop's own (1.0 when the
        daemon asks for none or the loop declared none)."""
        asked = self.actuators.directives(job.id).micro_batch
        own = live.progress.default_micro_batch
        return round(asked / own, 4) if asked and own else 1.0

    # -- helpers ---------------------------------------------------------------------------------

    def _now(self) -> datetime:
        return to_datetime(self._clock.now())

    def _job(self, job_id: int) -> JobRecord:
        """Any job in the store: a run's ranks on this node report for a job another node
        owns, and a user may act on a job from any node."""
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id}")
        return job

    def _owned(self, caller: Caller, job_id: int, verb: str) -> JobRecord:
        job = self._job(job_id)
        if caller.uid != job.uid and not caller.admin:
            raise ForbiddenError(
                f"job {job_id} belongs to {job.user}: only {job.user} or an admin may {verb} it"
            )
        return job

    def _live_of(self, job_id: int) -> _Live:
        return self._live.setdefault(job_id, _Live())

    def _active(self) -> list[JobRecord]:
        """Active jobs with work on this node, narrowed to this node's GPUs."""
        jobs = self._jobs.list(states=ACTIVE_STATES, node=self._host)
        return [job.on(self._host) for job in jobs]

    def _log_dir(self, job_id: int) -> Path:
        return self._settings.home / "jobs" / str(job_id)

    def _slots(self, *, busy: frozenset[int]) -> list[GpuSlot]:
        slots = []
        for index, info in sorted(self._infos.items()):
            slots.append(
                GpuSlot(
                    index=index,
                    busy=index in busy,
                    idle_power_w=self._idle_power_w(index),
                    min_limit_w=mw_to_w(info.min_limit_mw or 0),
                    max_limit_w=mw_to_w(info.max_limit_mw or 0),
                )
            )
        return slots

    def _idle_power_w(self, index: int) -> float:
        """What a free GPU draws now (1 s average); its minimum limit if it cannot be read."""
        try:
            power_mw = self._backend.read(index).power_avg_mw
        except GpuError:
            power_mw = None
        info = self._infos[index]
        return mw_to_w(power_mw if power_mw is not None else info.min_limit_mw or 0)

    def _budget_w(self, watts: float | None, gpus: int | tuple[int, ...] | list[int]) -> float:
        indices = range(gpus) if isinstance(gpus, int) else gpus
        if watts is not None:
            return watts * len(indices)
        if isinstance(gpus, int):  # not placed yet: the largest limit on the node
            top = mw_to_w(max((i.max_limit_mw or 0) for i in self._infos.values()))
            return top * gpus
        return sum(mw_to_w(self._infos[i].max_limit_mw or 0) for i in indices)

    def _slowdown(self, job: JobRecord) -> float:
        return self._sim.slowdown(job.gpus)

    def _gpus_of_pid(self, proc: psutil.Process) -> list[int]:
        """GPUs whose compute processes include ``proc`` or one of its children."""
        try:
            pids = {proc.pid} | {c.pid for c in proc.children(recursive=True)}
        except psutil.Error:
            pids = {proc.pid}
        found = []
        for index in self._infos:
            try:
                if any(p.pid in pids for p in self._backend.read(index).processes):
                    found.append(index)
            except GpuError:
                continue
        return found

    def _view(self, job: JobRecord) -> JobView:
        energy_j: float | None = None
        power_w: float | None = None
        if job.started_at is not None and job.gpus:
            energy_j = mj_to_j(self._jobs.energy(job.id).energy_mj)
        if job.state in ACTIVE_STATES and job.gpus:
            readings: list[int | None] = []
            for index in job.on(self._host).gpus:
                try:
                    readings.append(self._backend.read(index).power_avg_mw)
                except GpuError:
                    continue
            remote = [g for g, h in zip(job.gpu_ids, job.gpu_hosts, strict=True)
                      if h != self._host]
            if remote:  # another node's GPUs: their latest samples in the store
                readings += [r.power_avg_mw for r in self._store.latest_samples(remote).values()]
            known = [r for r in readings if r is not None]
            power_w = mw_to_w(sum(known)) if known else None
        members = self._jobs.members([job.id])[job.id]
        if members:  # exact: a run's totals over its members (the series may lag a report)
            steps, samples, tokens = self._jobs.run_totals(job.id)
        else:
            latest = self._jobs.latest_progress(job.id)
            steps, samples, tokens = (
                (latest.steps or 0, latest.samples or 0, latest.tokens or 0) if latest
                else (0, 0, 0)
            )
        rate = self._jobs.throughput(job.id)
        return JobView(
            id=job.id,
            name=job.name,
            user=job.user,
            state=job.state.value,
            attached=job.attached,
            argv=list(job.argv),
            cwd=job.cwd,
            gpus=list(job.gpus),
            gpu_count=job.gpu_count,
            watts=job.watts_per_gpu,
            energy_wh=job.energy_budget_wh,
            mode=job.mode.value,
            mode_effective=job.mode_effective.value if job.mode_effective else None,
            on_exceed=job.on_exceed.value,
            priority=job.priority,
            pid=job.pid,
            submitted_at=job.submitted_at,
            started_at=job.started_at,
            ended_at=job.ended_at,
            exit_code=job.exit_code,
            end_reason=job.end_reason,
            deadline=job.deadline_at,
            steps=steps,
            samples=samples,
            tokens=tokens,
            power_w=power_w,
            energy_j=energy_j,
            tokens_per_s=rate.tokens_per_s if rate else None,
            samples_per_s=rate.samples_per_s if rate else None,
            j_per_token=energy_j / tokens if energy_j is not None and tokens else None,
            node=job.host,
            gpu_nodes=list(job.gpu_hosts),
            run_key=job.run_key,
            world_size=job.world_size,
            hold=None if job.hold is None else job.hold.value,
            hold_step=job.hold_step,
            members=[_member_view(m) for m in members],
        )


def _started_at(pid: int | None) -> float | None:
    """When process ``pid`` started (s since the epoch), or ``None`` (no pid; gone)."""
    if pid is None:
        return None
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _w(mw: int | None) -> float | None:
    return None if mw is None else mw_to_w(mw)


def _member_view(m: MemberRecord) -> MemberView:
    return MemberView(
        id=m.id, node=m.host, rank=m.rank, local_rank=m.local_rank, world_size=m.world_size,
        generation=m.generation, pid=m.pid, gpus=list(m.gpus), state=m.state.value,
        joined_at=m.joined_at, ended_at=m.ended_at, end_reason=m.end_reason, steps=m.steps,
        samples=m.samples, tokens=m.tokens, steps_per_s=m.steps_per_s, step_time_s=m.step_time_s,
    )
