"""The job service: what the API asks for, and the control loop that places, launches and reaps.

The API thread and the control loop both call in; one lock serialises them, so every decision
sees the store as the last one left it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import psutil

from energy.units import mj_to_j, mw_to_w
from scheduler.actuators import Actuators
from scheduler.budgets import BudgetLoop, Progress
from scheduler.errors import Caller, ConflictError, ForbiddenError, NotFoundError
from scheduler.jobs import ACTIVE_STATES, TERMINAL_STATES, Action, Directive, JobState
from scheduler.launcher import Launcher
from scheduler.placement import GpuSlot, Waiting, check_request, plan
from scheduler.schemas import (
    AttachRequest,
    JobView,
    LogChunk,
    NodeUpdate,
    ProgressReport,
    SubmitRequest,
    UpdateRequest,
)
from scheduler.settings import Settings
from scheduler.sim_adapter import Load, NoSimulation, SimAdapter
from scheduler.store import JobRecord, JobStore, NewJob
from telemetry.backends.base import GpuBackend, GpuError, GpuInfo
from telemetry.clock import Clock, WallClock, to_datetime
from telemetry.sampler import LatestReadings
from telemetry.store import Store

log = logging.getLogger(__name__)

ACTIVITY_TIMEOUT_S = 3.0
"""A simulated GPU counts as busy while its job reported a step within this many seconds."""

QUEUED_AND_ACTIVE = frozenset({JobState.QUEUED}) | ACTIVE_STATES


@dataclass(slots=True)
class _Live:
    """What the service keeps in memory about a job between control ticks."""

    last_step_at: float = -math.inf  # clock time of the last progress report that moved
    steps: int = 0
    cancel_reason: str | None = None
    progress: Progress = field(default_factory=Progress)


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
        self._infos: dict[int, GpuInfo] = {d.index: d for d in backend.devices()}
        self._sim = sim or NoSimulation()
        for job in self._active():
            # Adopted jobs count as stepping until their clients report again.
            self._live_of(job.id).last_step_at = self._clock.now()
            self._sim.adopt(job.gpus)
        default_cap_w = sum(mw_to_w(d.max_limit_mw or 0) for d in self._infos.values())
        # Placement always checks against a cap (by default the sum of the maximum limits); the
        # run-time guard only holds one that is set: the default is the cards' own limits.
        self.node_cap_w = settings.node_cap_w or default_cap_w
        self._cap_set = settings.node_cap_w is not None
        self.budgets = BudgetLoop(
            backend.capabilities(), self._jobs, self.actuators, self._infos, readings=readings,
            node_cap=lambda: self.node_cap_w if self._cap_set else None,
            clock=self._clock, on_pause=self._pause, on_resume=self._resume_for_budget,
            on_stop=self._stop_for_budget,
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
            env=dict(req.env),
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
        """Track a process that started elsewhere, on the GPUs it says (or NVML shows) it uses."""
        pid = req.pid or caller.pid
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
        indices = req.gpu_ids if req.gpu_ids is not None else self._gpus_of_pid(proc)
        unknown = sorted(set(indices) - set(self._infos))
        if unknown:
            raise ValueError(
                f"gpu_ids: no GPU {unknown} on this node (GPUs: 0..{len(self._infos) - 1})"
            )
        if indices:
            check_request(tuple(indices), req.watts, self._slots(busy=frozenset()))
        new = NewJob(
            name=req.name,
            user=caller.user,
            uid=caller.uid,
            gid=caller.gid,
            argv=argv,
            cwd=cwd,
            host=self._host,
            gpu_ids_requested=tuple(indices) or None,
            watts_per_gpu=req.watts,
            energy_budget_wh=req.energy_wh,
            mode=req.mode,
            on_exceed=req.on_exceed,
            total_steps=req.total_steps,
            total_tokens=req.total_tokens,
            attached=True,
            pid=pid,
            pid_create_time=create_time,
        )
        with self._lock:
            now = self._now()
            job = self._jobs.create(new, at=now)
            job = self._jobs.transition(
                job.id,
                JobState.RUNNING,
                "attached: already running",
                at=now,
                gpus=[(self._gpu_ids[i], i) for i in sorted(indices)],
            )
        log.info(
            "job %d (%s) attached by %s: pid %d on GPUs %s",
            job.id,
            job.name,
            job.user,
            pid,
            list(job.gpus),
        )
        return self._view(job)

    def list_jobs(self, *, include_ended: bool) -> list[JobView]:
        """This node's jobs: queued and active ones, or all with ``include_ended``."""
        states = None if include_ended else QUEUED_AND_ACTIVE
        return [self._view(j) for j in self._jobs.list(states=states, host=self._host)]

    def get(self, job_id: int) -> JobView:
        return self._view(self._job(job_id))

    def cancel(self, caller: Caller, job_id: int) -> JobView:
        """Cancel a queued job at once; SIGTERM an active one (SIGKILL after the grace period)."""
        with self._lock:
            job = self._owned(caller, job_id, "cancel")
            reason = f"cancelled by {caller.user}"
            if job.state == JobState.QUEUED:
                job = self._jobs.transition(job.id, JobState.CANCELLED, reason, at=self._now())
            elif job.state in ACTIVE_STATES:
                self._live_of(job.id).cancel_reason = reason
                self._launcher.terminate(job, grace_s=self._settings.cancel_grace_s)
            else:
                raise ConflictError(f"job {job_id} has already ended ({job.state})")
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
        """Let a paused job run again."""
        with self._lock:
            job = self._owned(caller, job_id, "resume")
            if job.state != JobState.PAUSED:
                raise ConflictError(f"job {job_id} is {job.state}, not paused")
            job = self._jobs.transition(
                job.id, JobState.RUNNING, f"resumed by {caller.user}", at=self._now()
            )
            self.budgets.resumed_by_hand(job.id)
        return self._view(job)

    def progress(self, caller: Caller, job_id: int, req: ProgressReport) -> Directive:
        """Record a client's cumulative totals; answer with the job's directives."""
        with self._lock:
            job = self._owned(caller, job_id, "report progress for")
            if job.state in ACTIVE_STATES:
                self._jobs.add_progress(
                    job.id, at=self._now(), steps=req.steps, samples=req.samples, tokens=req.tokens
                )
                if req.total_steps or req.total_tokens:
                    declared = {"total_steps": req.total_steps, "total_tokens": req.total_tokens}
                    job = self._jobs.set_fields(
                        job.id, **{k: v for k, v in declared.items() if v is not None}
                    )
                live = self._live_of(job.id)
                if req.steps > live.steps:
                    live.last_step_at = self._clock.now()
                live.steps = req.steps
                live.progress.add(self._clock.now(), req.steps, req.tokens, req.step_time_s)
            action: Action | None = None
            if job.state == JobState.PAUSED:
                action = Action.PAUSE
            elif job.state in TERMINAL_STATES:
                action = Action.STOP
            # The actuators hold the soft directives; the rest is the job's own.
            return replace(
                self.actuators.directives(job.id),
                slowdown=self._slowdown(job),
                state=job.state.value,
                action=action,
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

    # -- the control loop ------------------------------------------------------------------------

    def tick(self) -> None:
        """Reap ended jobs, place and launch waiting ones, and keep simulated GPUs in step."""
        with self._lock:
            self._reap()
            self._place()
            active = self._active()
            self.budgets.tick(active, {j.id: self._live_of(j.id).progress for j in active})
            self._follow_activity()

    def _reap(self) -> None:
        self._launcher.kill_overdue(self._clock.now())
        for job in self._active():
            status = self._launcher.poll(job)
            if status.running:
                continue
            live = self._live.pop(job.id, _Live())
            stop_reason = self.budgets.stop_reason(job.id)
            if live.cancel_reason is not None:
                state, reason = JobState.CANCELLED, live.cancel_reason
            elif stop_reason is not None:
                state, reason = JobState.STOPPED, stop_reason
            elif status.exit_code == 0:
                state, reason = JobState.COMPLETED, "exited with status 0"
            elif status.exit_code is None:
                state, reason = JobState.FAILED, status.reason or "process vanished"
            else:
                state, reason = JobState.FAILED, f"exited with status {status.exit_code}"
            self._jobs.transition(job.id, state, reason, at=self._now(), exit_code=status.exit_code)
            self._launcher.forget(job)
            self.budgets.forget(job.id)
            self.actuators.undo_job(job.id, f"job {job.id} {state}")
            log.info("job %d %s: %s", job.id, state, reason)

    def _place(self) -> None:
        waiting_jobs = self._jobs.list(states=[JobState.QUEUED], host=self._host)
        if not waiting_jobs:
            return
        active = self._active()
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
        for placement in plan(
            waiting,
            self._slots(busy=busy),
            node_cap_w=self.node_cap_w,
            running_budget_w=running_w,
            now=self._now(),
        ):
            self._launch(by_id[placement.job_id], placement.gpu_indices)

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

    def _pause(self, job: JobRecord, why: str) -> None:
        """The energy guard pauses a job: its client checkpoints and waits."""
        self._jobs.transition(job.id, JobState.PAUSED, f"energy budget: {why}", at=self._now())
        log.warning("job %d paused: %s", job.id, why)

    def _resume_for_budget(self, job: JobRecord, why: str) -> None:
        current = self._jobs.get(job.id)
        if current is not None and current.state == JobState.PAUSED:
            self._jobs.transition(job.id, JobState.RUNNING, why, at=self._now())
            log.info("job %d resumed: %s", job.id, why)

    def _stop_for_budget(self, job: JobRecord, why: str) -> None:
        """The energy guard stops a job: SIGTERM now, SIGKILL after the grace period."""
        log.warning("job %d stopping: %s", job.id, why)
        self._launcher.terminate(job, grace_s=self._settings.cancel_grace_s)

    def _follow_activity(self) -> None:
        """On simulated GPUs, a job's GPUs are busy while its steps keep coming, else idle."""
        now = self._clock.now()
        busy: dict[int, Load] = {}
        for job in self._active():
            live = self._live.get(job.id)
            stepping = live is not None and now - live.last_step_at < ACTIVITY_TIMEOUT_S
            # A job being stopped or cancelled got SIGTERM: its GPU work ends with its loop.
            ending = live is not None and (
                live.cancel_reason is not None or self.budgets.stop_reason(job.id) is not None
            )
            # A paused job's client learns of the pause at its next report and steps until
            # then: its GPU idles once its steps stop coming, not when the state changes, or
            # those steps would look free to the energy forecast (which then resumes the job).
            if stepping and live is not None and not ending:
                # A paced job keeps its GPU busy only while it steps, idle while it sleeps: the
                # client sleeps d * (1/duty - 1) after each step of duration d.
                duty = self.budgets.duty(job.id)
                for index in job.gpus:
                    busy[index] = ((job.pid,) if job.pid else (), round(duty, 3))
        self._sim.follow(busy)

    # -- helpers ---------------------------------------------------------------------------------

    def _now(self) -> datetime:
        return to_datetime(self._clock.now())

    def _job(self, job_id: int) -> JobRecord:
        job = self._jobs.get(job_id)
        if job is None or job.host != self._host:
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
        return self._jobs.list(states=ACTIVE_STATES, host=self._host)

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
            readings = []
            for index in job.gpus:
                try:
                    readings.append(self._backend.read(index).power_avg_mw)
                except GpuError:
                    continue
            known = [r for r in readings if r is not None]
            power_w = mw_to_w(sum(known)) if known else None
        latest = self._jobs.latest_progress(job.id)
        rate = self._jobs.throughput(job.id)
        tokens = (latest.tokens or 0) if latest else 0
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
            steps=(latest.steps or 0) if latest else 0,
            samples=(latest.samples or 0) if latest else 0,
            tokens=tokens,
            power_w=power_w,
            energy_j=energy_j,
            tokens_per_s=rate.tokens_per_s if rate else None,
            samples_per_s=rate.samples_per_s if rate else None,
            j_per_token=energy_j / tokens if energy_j is not None and tokens else None,
        )


def _w(mw: int | None) -> float | None:
    return None if mw is None else mw_to_w(mw)
