"""A virtual-time harness: simulated training jobs run under the real job service and budget loop.

A ``SimNode`` is a daemon without its threads: the real ``scheduler.service.JobService`` (with its
``BudgetLoop`` and ``Actuators``), the real ``telemetry.sampler.Sampler`` and ``BatchWriter``
sampling into a SQLite store, and a ``SimulatedBackend``, all on one ``VirtualClock`` that only
this harness moves. Every 0.1 s of virtual time the sampler reads every GPU (the daemon's default
``interval_ms``, and the simulator's sensor period: the store's per-job energy is a counter delta
between samples, so a coarser rate would misplace a job's ends by up to a sampling period); every
second buffered samples are written and ``JobService.tick`` runs (reap, place, the budget loop
on the sampler's latest readings, and the simulated GPUs' load through the service's
``scheduler.sim_adapter.SimulatedGpus``), as the daemon's control job does.

A simulated job is the training process and its ``scheduler.client`` together. It attaches through
``JobService.attach`` (as ``track()`` does) or, with ``JobSpec.submit``, is submitted, placed by the
service and started through the launcher (as ``powertrain submit`` is); it reports its cumulative
steps, samples, tokens and step time through ``JobService.progress`` every report interval and obeys
the answer as ``scheduler.client.Job`` does: each step computes for the workload's ``step_time_s``
and is stretched by the directive's ``slowdown`` (which the service's simulator adapter reads from
the simulated GPU's clock), paced by its ``duty`` and ``pace_s``, and a ``pause`` or ``stop`` action
is obeyed after the step. A job that declares its micro-batches (``JobSpec.micro_batches``)
reports them as the client does; the ``micro_batch`` directive then changes its GPUs' load through
the service (the simulator's micro-batch term, ``energy.gpu_model``), and its steps' time through
the ``slowdown``, at a fixed global batch. GPU settings change only through the service's
actuators; which GPUs are busy, at what duty and micro-batch, is what the service sets from the
jobs' progress.
A job's energy budget, wattage budget, mode, objective, deadline and on-exceed policy reach the
service in the request, as the client or the CLI would send them.

What the harness models itself is only what a real node would: processes (a launcher that starts
and signals simulated processes: SIGTERM ends one at once, as ``examples/pretrain_gpt.py`` installs
no handler), the load a job puts on its GPUs (``JobSpec.workload``, ``SimNode.set_activity``; the
service names the generic ``training`` workload, the node runs the job's own), a client that
ignores pacing (``JobSpec.obeys``), and a crash (``SimNode.crash``, then ``SimNode.restart`` as
``scheduler.daemon.Daemon`` starts: a new service and ``Actuators.recover``).

Used by ``tests/test_control.py``, ``tests/test_budgets_sim.py``, ``tests/test_optimizer_sim.py``
and ``bench/budget.py``::

    with SimNode(gpus=1) as node:
        job = node.add_job(JobSpec("a", gpus=(0,), mode="soft", budget_w=300.0))
        node.run(120.0)
        stats = node.stats(job, limit_w=300.0)
"""

from __future__ import annotations

import bisect
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Literal

import psutil

from energy.gpu_model import micro_batch_time_factor
from energy.optimizer import ObjectiveName
from scheduler.client import Directive, _parse_directive
from scheduler.control import WINDOW_TOLERANCE, EnergyAction, GpuFacts, ModeChoice, PowerController
from scheduler.errors import Caller
from scheduler.jobs import Mode, OnExceed
from scheduler.launcher import Launched, Launcher, ProcessState, ProcessStatus
from scheduler.schemas import AttachRequest, ProgressReport, SubmitRequest, UpdateRequest
from scheduler.service import JobService
from scheduler.settings import Settings
from scheduler.sim_adapter import SimulatedGpus
from scheduler.store import DecisionRecord, JobRecord, JobStore, JournalEntry, JournalStore
from telemetry.backends.profiles import Workload, get_workload
from telemetry.backends.simulated import SimulatedBackend
from telemetry.clock import VirtualClock, to_datetime
from telemetry.sampler import BatchWriter, Sampler
from telemetry.store import Store, open_store

__all__ = [
    "HOST",
    "SAMPLE_HZ",
    "JobSpec",
    "JobStats",
    "ObjectiveName",
    "SimCapDecision",
    "SimDecision",
    "SimJob",
    "SimMode",
    "SimNode",
]

SimMode = Mode | Literal["none"]
"""A job's ``scheduler.jobs.Mode`` (or its name), or ``none``: no wattage budget."""

HOST = "sim"
"""The node's name in the store (unless given: several nodes may share one store)."""

SAMPLE_HZ = 10
"""Samples per second of virtual time (the daemon's default ``interval_ms`` of 100)."""

_EPS = 1e-9
_SIGTERM_STATUS = 143  # 128 + SIGTERM: the example job installs no SIGTERM handler
_STOPPED_STATUS = 1  # JobStopped is a SystemExit with a message: exit status 1


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A simulated training job.

    Attributes:
        name: The job's name.
        gpus: GPU indices it runs on (data-parallel: every step waits for the slowest GPU); a
            count for a submitted job that placement places.
        mode: Enforcement mode asked for; ``none``: the client's default (``auto``) without a
            wattage budget.
        budget_w: Wattage budget per GPU, W (None: none).
        priority: Higher is more important (placement and the node cap). An attached job gets
            it right after attaching, through ``JobService.update`` (``powertrain budget``).
        workload: The load it puts on its GPUs (``training``: about 655 W on an H100 SXM).
        tokens_per_step / samples_per_step: What one step processes.
        total_steps: Declared total steps (the job also ends there), or None.
        energy_budget_wh: Energy budget, Wh, or None.
        on_exceed: The energy-budget policy.
        objective: The optimiser's objective (``--objective``; submitted jobs only).
        deadline_s: Deadline, s after the node's start (``--deadline``; submitted jobs only).
        start_s: When it attaches or is submitted, s after the node's start.
        max_s: The process exits (status 0) at the first step that begins this long after it
            started (the example job's ``--max-seconds``), or None.
        obeys: Whether its client obeys pacing (duty, pace); a client that does not keeps its
            GPU busy whatever the service asks.
        client: Whether the process reports progress at all (False: a plain command such as
            ``sleep``, which needs ``max_s`` to end).
        submit: Submitted and placed by the service (``powertrain submit``) instead of attached.
        report_interval_s: Seconds between the client's progress reports.
        run_key / rank / world_size: A rank of a distributed run (``scheduler.runs``): the ranks
            of one run, on one node or several, join one job. A rank steps on its own here (the
            simulator has no collectives).
        micro_batches / micro_batch: The micro-batches its loop declares and its own one
            (``track(micro_batches=..., micro_batch=...)``); none: not a lever.
    """

    name: str
    gpus: tuple[int, ...] | int = (0,)
    mode: SimMode = "none"
    budget_w: float | None = None
    priority: int = 0
    workload: Workload | str = "training"
    tokens_per_step: int = 4096
    samples_per_step: int = 8
    total_steps: int | None = None
    energy_budget_wh: float | None = None
    on_exceed: OnExceed | str = OnExceed.WARN
    objective: ObjectiveName | None = None
    deadline_s: float | None = None
    start_s: float = 0.0
    max_s: float | None = None
    obeys: bool = True
    client: bool = True
    submit: bool = False

    report_interval_s: float = 1.0
    run_key: str | None = None
    rank: int = 0
    world_size: int = 1
    micro_batches: tuple[int, ...] = ()
    micro_batch: int | None = None

    def __post_init__(self) -> None:
        if self.micro_batches and self.micro_batch not in self.micro_batches:
            raise ValueError(f"{self.name}: micro_batch is one of micro_batches")
        if self.mode == "none" and self.budget_w is not None:
            raise ValueError(f"{self.name}: a wattage budget needs a mode (auto, hw, clock, soft)")
        if not self.submit and (self.objective or self.deadline_s is not None):
            raise ValueError(f"{self.name}: an objective or deadline needs submit=True")
        if not self.submit and isinstance(self.gpus, int):
            raise ValueError(f"{self.name}: an attached job names its GPUs")
        if not self.client and self.max_s is None:
            raise ValueError(f"{self.name}: a job without a client needs max_s to end")


@dataclass(frozen=True, slots=True)
class SimDecision:
    """A decision the budget loop stored for a job, timed in seconds since the node's start."""

    at_s: float
    source: str
    what: str
    why: str
    power_before_w: float | None
    steps_per_s_before: float | None
    power_after_w: float | None
    steps_per_s_after: float | None


@dataclass(frozen=True, slots=True)
class SimCapDecision:
    """One node-cap decision: the jobs whose budgets it changed, and its sentence."""

    at_s: float
    changed: tuple[int, ...]
    sentence: str


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


class SimJob:
    """A simulated job: its process, its client's state, and views of what the service stored.

    Times (``started_at``, ``ended_at``, ``step_log``) are seconds since the node's start.
    """

    def __init__(self, node: SimNode, spec: JobSpec) -> None:
        self.spec = spec
        self.workload = get_workload(spec.workload) if isinstance(spec.workload, str) else (
            spec.workload
        )
        self._node = node
        self.id: int | None = None
        self.member_id: int | None = None
        self.gpus: tuple[int, ...] = spec.gpus if isinstance(spec.gpus, tuple) else ()
        # The process.
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.exit_code: int | None = None
        self.energy_origin_mj: dict[int, float] = {}
        self.energy_end_mj: dict[int, float] = {}
        # The client (``scheduler.client.Job``): cumulative totals, the last delivered report's
        # steps and busy time, and the last directive.
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self._busy_s = 0.0
        self._sent: tuple[int, float] = (0, 0.0)
        self.directive = Directive()
        self.paused = False  # checkpointed and waiting for the service to let it run
        self.step_log: list[tuple[float, int]] = []  # (s, steps) each whole second
        # What the process does next: ("compute", t) a step's compute ends; ("after", t) a
        # step's sleeps end (then the directive's action, the end checks, the next step).
        self._next: tuple[str, float] | None = None
        self._after_action: str | None = None
        self._next_report_s: float | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Its process has started and not ended."""
        return self.started_at is not None and self.ended_at is None

    @property
    def record(self) -> JobRecord | None:
        """The job as the store has it (None before it attached or was submitted)."""
        return None if self.id is None else JobStore(self._node.store).get(self.id)

    @property
    def choice(self) -> ModeChoice | None:
        """The mode the service chose for the wattage budget, and why (from the store)."""
        record = self.record
        if record is None or record.mode_effective is None:
            return None
        return ModeChoice(record.mode_effective, record.mode_reason or "")

    @property
    def controller(self) -> PowerController | None:
        """The budget loop's controller of this job (its state, for tests that look inside)."""
        control = self._node.service.budgets._controls.get(self.id or -1)
        return None if control is None else control.controller

    @property
    def decisions(self) -> list[SimDecision]:
        """The decisions stored for this job, oldest first."""
        if self.id is None:
            return []
        return [self._node._decision(d) for d in JobStore(self._node.store).decisions(self.id)]

    @property
    def energy_actions(self) -> list[EnergyAction]:
        """The energy guard's actions on this job, in order."""
        return [EnergyAction(d.what) for d in self.decisions if d.source == "energy"]

    @property
    def settings(self) -> list[JournalEntry]:
        """The settings journal's entries of this job, oldest first."""
        if self.id is None:
            return []
        return JournalStore(self._node.store).entries(self._node.host, job_id=self.id)

    # -- the process and its client --------------------------------------------------------

    def _next_event_s(self) -> float | None:
        times = [t for t in (self._next[1] if self._next else None, self._next_report_s)
                 if t is not None]
        return min(times, default=None)

    def _begin(self, now_s: float) -> None:
        """The process starts: its client registers (or adopts its launched id) and reports."""
        node = self._node
        self.started_at = now_s
        self.energy_origin_mj = {i: node.backend.true_energy_mj(i) for i in self.gpus}
        self.step_log.append((now_s, 0))
        for i in self.gpus:
            node._gpu_job[i] = self
        if not self.spec.client:
            self._next = ("after", now_s + (self.spec.max_s or 0.0))
            return
        if self.id is None:
            self._attach()
        self._report(now_s)
        self._next_report_s = now_s + self.spec.report_interval_s
        self._next = ("compute", now_s + self._compute_s())

    def _attach(self) -> None:
        node, spec = self._node, self.spec
        total_tokens = spec.total_steps * spec.tokens_per_step if spec.total_steps else None
        view = node.service.attach(node.caller, AttachRequest(
            name=spec.name, pid=os.getpid(), gpu_ids=list(self.gpus),
            total_steps=spec.total_steps, total_tokens=total_tokens, watts=spec.budget_w,
            energy_wh=spec.energy_budget_wh, mode="auto" if spec.mode == "none" else spec.mode,
            on_exceed=spec.on_exceed, run_key=spec.run_key, rank=spec.rank,
            local_rank=spec.rank, world_size=spec.world_size,
        ))
        self.id, self.member_id = view.id, view.member_id
        if spec.priority:
            node.service.update(node.caller, view.id, UpdateRequest(priority=spec.priority))

    def _report(self, now_s: float, *, final: bool = False) -> None:
        """One exchange with the service, as ``Job._report``: totals out, the directive back."""
        assert self.id is not None
        spec = self.spec
        new_steps = self.steps - self._sent[0]
        total_tokens = spec.total_steps * spec.tokens_per_step if spec.total_steps else None
        answer = self._node.service.progress(self._node.caller, self.id, ProgressReport(
            steps=self.steps, samples=self.samples, tokens=self.tokens,
            step_time_s=(self._busy_s - self._sent[1]) / new_steps if new_steps > 0 else None,
            total_steps=spec.total_steps, total_tokens=total_tokens, final=final,
            member=self.member_id,
            micro_batches=list(spec.micro_batches) if spec.micro_batches else None,
            micro_batch_default=spec.micro_batch if spec.micro_batches else None,
        ))
        self._sent = (self.steps, self._busy_s)
        self.directive = _parse_directive(asdict(answer))
        if self.paused and not final:
            self._check_paused(now_s)

    def _check_paused(self, now_s: float) -> None:
        """``Job._obey``'s wait: stop, or run again once the job is running with no action."""
        current = self.directive
        if current.action == "stop":
            self._exit(now_s, _STOPPED_STATUS)
        elif current.action is None and current.state == "running":
            self.paused = False
            self._loop(now_s)

    def _step_done(self, now_s: float) -> None:
        """A step's compute ended: count it, then sleep as ``Job._record`` does."""
        spec, directive = self.spec, self.directive
        compute_s = self._compute_s()
        stretch_s = compute_s * (directive.slowdown - 1.0)
        self.steps += 1
        self.samples += spec.samples_per_step
        self.tokens += spec.tokens_per_step
        self._busy_s += compute_s + stretch_s
        sleep_s = stretch_s
        if spec.obeys:
            sleep_s += directive.pace_s
            if directive.duty < 1.0:
                sleep_s += (compute_s + stretch_s) * (1.0 / directive.duty - 1.0)
        self._after_action = directive.action
        self._next = ("after", now_s + sleep_s)

    def _after_step(self, now_s: float) -> None:
        """The step's sleeps ended: obey the action, or end, or compute the next step."""
        spec = self.spec
        if not spec.client:
            self._exit(now_s, 0)
            return
        if self._after_action == "stop":
            self._exit(now_s, _STOPPED_STATUS)
            return
        if self._after_action == "pause":
            self.paused = True
            self._next = None
            self._check_paused(now_s)  # a report may already have let it run again
            return
        self._loop(now_s)

    def _loop(self, now_s: float) -> None:
        """The training loop goes round: it ends (status 0) after its last step or once past
        ``max_s`` (checked before each step, as the example job does), else steps again."""
        spec = self.spec
        assert self.started_at is not None
        done = spec.total_steps is not None and self.steps >= spec.total_steps
        late = spec.max_s is not None and now_s - self.started_at > spec.max_s + _EPS
        if done or late:
            self._exit(now_s, 0)
            return
        self._next = ("compute", now_s + self._compute_s())

    def _compute_s(self) -> float:
        """A step's compute at the top clock: the workload's, times the micro-batch term's
        ``T(s)`` at the micro-batch the directive asks for (the simulator's ``slowdown`` is the
        clock's alone)."""
        own, asked = self.spec.micro_batch, self.directive.micro_batch
        if not own or not asked or asked == own:
            return self.workload.step_time_s
        return self.workload.step_time_s * micro_batch_time_factor(self.workload.model,
                                                                   asked / own)

    def _exit(self, now_s: float, status: int | None, *, report: bool = True) -> None:
        """The process ends (``status`` None: killed with the node, nothing recorded)."""
        if self.ended_at is not None:
            return
        if report and status is not None and self.spec.client and self.id is not None:
            self._report(now_s, final=True)  # Job.close(): the final report
        self.ended_at = now_s
        self.exit_code = status
        self._next = self._next_report_s = None
        self.paused = False
        self.energy_end_mj = {i: self._node.backend.true_energy_mj(i) for i in self.gpus}

    def _advance(self, now_s: float) -> None:
        """Handle everything this job has due at ``now_s``: step first, then the report."""
        while self._next is not None and self._next[1] <= now_s + _EPS:
            kind, t = self._next
            if kind == "compute":
                self._step_done(t)
            else:
                self._after_step(t)
        if self._next_report_s is not None and self._next_report_s <= now_s + _EPS:
            self._next_report_s += self.spec.report_interval_s
            self._report(now_s)


class _SimGpus(SimulatedBackend):
    """The simulated node, where a busy GPU runs its job's own load.

    The service marks a job's GPUs busy with the generic ``training`` workload at the duty it
    asked the client for; the node runs the job's workload instead, and at full duty for a client
    that ignores pacing. Settings are untouched: they change only through the service.
    """

    def __init__(self, gpus: int, sku: str, *, clock: VirtualClock, seed: int,
                 job_on: Callable[[int], SimJob | None]) -> None:
        super().__init__(gpus, sku, clock=clock, seed=seed)
        self._job_on = job_on

    def set_workload(self, index: int, workload: Workload | str | None, *,
                     pids: Iterable[int] = (), duty: float = 1.0,
                     micro_batch_scale: float = 1.0) -> None:
        job = self._job_on(index) if workload is not None else None
        if job is not None:
            workload = job.workload
            if not job.spec.obeys:
                duty = 1.0
        super().set_workload(index, workload, pids=pids, duty=duty,
                             micro_batch_scale=micro_batch_scale)


class _SimLauncher(Launcher):
    """The node's processes as the service's launcher sees them: starting a placed job starts
    its simulated process, SIGTERM ends it at once, and ``poll`` reports how it ended as
    ``Launcher.poll`` would (an attached job's status is never known; a process killed with the
    node left no exit status)."""

    def __init__(self, node: SimNode) -> None:
        super().__init__(clock=node.clock)
        self._node = node

    def launch(self, job: JobRecord, gpu_indices: Sequence[int], *, socket_path: Path,
               log_dir: Path, extra_env: Mapping[str, str] | None = None) -> Launched:
        self._node._launched(job.id, tuple(gpu_indices))
        return Launched(pid=os.getpid(), create_time=self._node._create_time,
                        stdout_path=log_dir / "stdout.log", stderr_path=log_dir / "stderr.log")

    def poll(self, job: JobRecord) -> ProcessStatus:
        sim = self._node._job_by_id.get(job.id)
        if sim is None:
            return ProcessStatus(ProcessState.VANISHED, reason="lost: not a process of this node")
        if sim.ended_at is None:
            return ProcessStatus(ProcessState.RUNNING)
        if job.attached:
            return ProcessStatus(ProcessState.VANISHED,
                                 reason="the attached process ended (its exit status is not "
                                 "known here)")
        if sim.exit_code is None:
            return ProcessStatus(ProcessState.VANISHED,
                                 reason="lost: the process is gone and left no exit status")
        return ProcessStatus(ProcessState.EXITED, sim.exit_code, f"exit status {sim.exit_code}")

    def terminate(self, job: JobRecord, grace_s: float = 10.0) -> bool:
        sim = self._node._job_by_id.get(job.id)
        if sim is None or not sim.running:
            return False
        sim._exit(self._node.now_s, _SIGTERM_STATUS, report=False)
        return True

    def kill_overdue(self, now: float | None = None) -> list[int]:
        return []  # SIGTERM already ended the process

    def forget(self, job: JobRecord) -> None:
        pass


class SimNode:
    """Simulated GPUs, simulated jobs and the daemon's service on one virtual clock.

    Args:
        gpus: GPUs on the node.
        sku: SKU profile.
        seed: Sensor noise seed.
        node_cap_w: Node power cap, W (the daemon's ``--node-cap-w``; None: none set).
        permission_denied: Inject ``PERMISSION_DENIED`` on every GPU (no root).
        dry_run: The daemon's ``--dry-run``.
        home: The daemon's home (store, job folders); a temporary folder removed by ``close``
            when None.
        host: The node's name in the store.
        store_url: The store (several nodes may share one); default a SQLite file in ``home``.
    """

    def __init__(
        self,
        gpus: int = 1,
        sku: str = "H100-SXM",
        *,
        seed: int = 0,
        node_cap_w: float | None = None,
        permission_denied: bool = False,
        dry_run: bool = False,
        home: Path | None = None,
        host: str = HOST,
        store_url: str | None = None,
    ) -> None:
        self.host = host
        self.clock = VirtualClock()
        self.t0 = self.clock.now()
        self._gpu_job: dict[int, SimJob] = {}
        self.backend = _SimGpus(gpus, sku, clock=self.clock, seed=seed,
                                job_on=self._gpu_job.get)
        if permission_denied:
            for i in range(gpus):
                self.backend.inject_fault(i, "permission_denied")
        tmp = None if home is not None else Path(tempfile.mkdtemp(prefix="simnode-"))
        self.home = home if home is not None else tmp
        assert self.home is not None
        self.store: Store = open_store(store_url or f"sqlite:///{self.home / 'powertrain.db'}")
        # Closed (and a temporary home removed) by ``close``, or when the node is collected.
        self._close = weakref.finalize(self, _close, self.store, tmp)
        self.gpu_ids = self.store.register_gpus(
            self.backend.devices(), host=host, backend=self.backend.name,
            seen_at=to_datetime(self.t0),
        )
        self.settings = Settings(home=self.home, node_cap_w=node_cap_w, dry_run=dry_run)
        me = psutil.Process()
        self._create_time = me.create_time()
        self.caller = Caller(pid=me.pid, uid=os.getuid(), gid=os.getgid(), user="sim",
                             admin=False)
        self.jobs: list[SimJob] = []
        self._job_by_id: dict[int, SimJob] = {}
        self._to_begin: list[SimJob] = []
        self._tick = 0  # sampling ticks done (the next one is at _tick / SAMPLE_HZ s)
        self._now_s = 0.0
        self.energy_log: list[dict[int, float]] = []  # true energy each whole second, mJ
        self.recovered: list[JournalEntry] = []
        self._start_daemon()

    # --- the daemon ---------------------------------------------------------------------------

    def _start_daemon(self) -> None:
        """What ``Daemon.__init__`` does: a writer and sampler, the service, then recovery."""
        self.writer = BatchWriter(self.store, max_rows=self.settings.buffer_max_rows)
        self.sampler = Sampler(self.backend, self.gpu_ids, self.writer, clock=self.clock)
        self.service = JobService(self.settings, self.store, self.backend, self.gpu_ids,
                                  host=self.host, readings=self.sampler,
                                  launcher=_SimLauncher(self),
                                  sim=SimulatedGpus(self.backend), clock=self.clock)
        self.recovered = self.service.actuators.recover()

    def crash(self) -> None:
        """The daemon dies with every process of the node: nothing is undone or flushed."""
        for job in self.jobs:
            if job.running:
                job._exit(self._now_s, None, report=False)
        del self.service, self.sampler, self.writer

    def restart(self) -> None:
        """Start a daemon again on the same store and GPUs (it recovers what was left)."""
        self._start_daemon()

    def close(self) -> None:
        """Close the store (and remove the temporary home)."""
        self._close()

    def __enter__(self) -> SimNode:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- set-up and events --------------------------------------------------------------------

    @property
    def now_s(self) -> float:
        """Seconds since the node started."""
        return self._now_s

    @property
    def facts(self) -> dict[int, GpuFacts]:
        """The budget loop's facts of each GPU (replace one to give the loop a wrong idea)."""
        return self.service.budgets._facts

    def add_job(self, spec: JobSpec) -> SimJob:
        """Add a job; it attaches or is submitted at ``spec.start_s``."""
        if spec.start_s < self._now_s - _EPS:
            raise ValueError(f"{spec.name}: starts at {spec.start_s} s, before now")
        job = SimJob(self, spec)
        self.jobs.append(job)
        return job

    def set_activity(self, job: SimJob, activity: float) -> None:
        """Change the job's load (a new phase): its workload's activity from now on."""
        job.workload = replace(job.workload, activity=activity)
        for i in job.gpus:
            if self.backend.workload(i) is not None:  # busy: the new load shows at once
                pids = [p.pid for p in self.backend.read(i).processes]
                self.backend.set_workload(i, job.workload, pids=pids, duty=self.backend.duty(i))

    def resume(self, job: SimJob) -> None:
        """``powertrain resume``."""
        assert job.id is not None
        self.service.resume(self.caller, job.id)

    def update(self, job: SimJob, request: UpdateRequest) -> None:
        """``powertrain budget``."""
        assert job.id is not None
        self.service.update(self.caller, job.id, request)

    # --- the loop -----------------------------------------------------------------------------

    def run(
        self, duration_s: float, *, events: Mapping[float, Callable[[SimNode], None]] | None = None
    ) -> None:
        """Advance ``duration_s`` of virtual time; ``events`` run at their times (s since start)."""
        pending = sorted((events or {}).items())
        end_s = self._now_s + duration_s
        while True:
            tick_s = self._tick / SAMPLE_HZ
            if tick_s > end_s + _EPS:
                break
            self._jobs_until(tick_s)
            self._goto(tick_s)
            while pending and pending[0][0] <= tick_s + _EPS:
                pending.pop(0)[1](self)
            self._start_jobs(tick_s)
            self._jobs_until(tick_s, inclusive=True)
            self._periodic(tick_s)
            self._tick += 1
        self._jobs_until(end_s, inclusive=True)
        self._goto(end_s)

    def _goto(self, t_s: float) -> None:
        if t_s > self._now_s:
            self.clock.advance(self.t0 + t_s - self.clock.now())
            self._now_s = t_s

    def _jobs_until(self, t_s: float, *, inclusive: bool = False) -> None:
        """Handle the jobs' events before ``t_s`` (and at it, if ``inclusive``), in time order."""
        limit = t_s + _EPS if inclusive else t_s - _EPS
        while True:
            due = [(t, i) for i, job in enumerate(self.jobs)
                   if (t := job._next_event_s()) is not None and t <= limit]
            if not due:
                return
            t, i = min(due)
            self._goto(t)
            self.jobs[i]._advance(t)

    def _start_jobs(self, now_s: float) -> None:
        for job in self.jobs:
            if job.id is None and job.started_at is None and job.spec.start_s <= now_s + _EPS:
                if job.spec.submit:
                    self._submit(job)
                else:
                    job._begin(now_s)
                    self._job_by_id[job.id or -1] = job

    def _submit(self, job: SimJob) -> None:
        spec = job.spec
        view = self.service.submit(self.caller, SubmitRequest(
            name=spec.name, argv=["simjob", spec.name], cwd=str(self.home),
            gpus=spec.gpus if isinstance(spec.gpus, int) else None,
            gpu_ids=list(spec.gpus) if isinstance(spec.gpus, tuple) else None,
            watts=spec.budget_w, energy_wh=spec.energy_budget_wh,
            mode="auto" if spec.mode == "none" else spec.mode, on_exceed=spec.on_exceed,
            priority=spec.priority, objective=spec.objective,
            deadline=None if spec.deadline_s is None else self.at(spec.deadline_s),
        ))
        job.id = view.id
        self._job_by_id[view.id] = job

    def _launched(self, job_id: int, gpus: tuple[int, ...]) -> None:
        """The service placed a job: its process starts right after this control tick."""
        job = self._job_by_id[job_id]
        job.gpus = gpus
        self._to_begin.append(job)

    def _periodic(self, t_s: float) -> None:
        """A sampling tick; each whole second also the flush and the control tick."""
        whole = self._tick % SAMPLE_HZ == 0
        if whole:
            self.energy_log.append(self._energies())
            for job in self.jobs:
                if job.running:
                    job.step_log.append((t_s, job.steps))
        self.sampler.tick()
        if whole:
            self.writer.flush()
            self.service.tick()
            for job in self._to_begin:
                job._begin(t_s)
            self._to_begin.clear()

    def _energies(self) -> dict[int, float]:
        return {d.index: self.backend.true_energy_mj(d.index) for d in self.backend.devices()}

    # --- what the store says ------------------------------------------------------------------

    def at(self, t_s: float) -> datetime:
        """The time ``t_s`` seconds after the node's start."""
        return to_datetime(self.t0 + t_s)

    def since_start_s(self, at: datetime) -> float:
        """Seconds after the node's start of a stored time."""
        return at.timestamp() - self.t0

    def _decision(self, d: DecisionRecord) -> SimDecision:
        return SimDecision(self.since_start_s(d.at), d.source, d.what, d.why, d.power_before_w,
                           d.steps_per_s_before, d.power_after_w, d.steps_per_s_after)

    @property
    def cap_decisions(self) -> list[SimCapDecision]:
        """The node-cap guard's decisions, as stored with the jobs they changed, in order."""
        by: dict[tuple[float, str], list[int]] = {}
        for job in self.jobs:
            for d in job.decisions:
                if d.source == "node-cap":
                    by.setdefault((d.at_s, d.why), []).append(job.id or -1)
        return [SimCapDecision(at, tuple(sorted(ids)), why)
                for (at, why), ids in sorted(by.items())]

    def stored_windows_w(self, indices: Sequence[int], since_s: float, until_s: float,
                         window_s: float = 10.0) -> list[float]:
        """10 s averages of the summed power of GPUs (1 s stride) from the stored samples'
        energy counters, interpolated between samples, W."""
        self.writer.flush()
        series = []
        for index in indices:
            rows = [(s.sampled_at.timestamp() - self.t0, s.energy_mj)
                    for s in self.store.samples(self.gpu_ids[index])]
            series.append(([t for t, _ in rows], [e for _, e in rows]))

        def energy_at(times: list[float], counters: list[int | None], t: float) -> float:
            i = min(max(bisect.bisect_left(times, t), 1), len(times) - 1)
            t0, t1 = times[i - 1], times[i]
            e0, e1 = counters[i - 1], counters[i]
            assert e0 is not None and e1 is not None
            return e0 + (e1 - e0) * (t - t0) / (t1 - t0)

        out = []
        start = since_s
        while start + window_s <= until_s + _EPS:
            mj = sum(energy_at(t, e, start + window_s) - energy_at(t, e, start) for t, e in series)
            out.append(mj / 1000 / window_s)
            start += 1.0
        return out

    # --- measurements from the simulator's exact energy --------------------------------------

    def gpu_power_w(self, index: int, start_s: float, end_s: float) -> float:
        """Exact mean power of a GPU over whole seconds ``[start_s, end_s]`` since start, W."""
        a, b = round(start_s), round(end_s)
        log = self.energy_log
        return (log[b][index] - log[a][index]) / 1000.0 / (b - a)

    def node_windows_w(self, start_s: float, end_s: float, window_s: int = 10) -> list[float]:
        """10 s averages of the whole node's power (1 s stride) within the span, W."""
        out = []
        for a in range(math.ceil(start_s), math.floor(end_s) - window_s + 1):
            out.append(sum(self.gpu_power_w(i, a, a + window_s) for i in self.gpu_ids))
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
            job: The job (started).
            limit_w: The per-GPU budget windows are judged against, W (None: not judged).
            measure_from_s: Throughput and energy are measured from this long after the job's
                start (steady state), s.
            until_s: End of the span, s since the node's start (default: the job's end or now).
            window_s: Window length, s.
        """
        assert job.started_at is not None, f"{job.spec.name} has not started"
        start = round(job.started_at)
        end = math.floor(until_s if until_s is not None else (job.ended_at or self.now_s))
        gpus = job.gpus
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


def _close(store: Store, tmp: Path | None) -> None:
    store.close()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def _steps_at(log: Mapping[float, int], t: float) -> float:
    """Steps done at whole second ``t`` (the last logged value at or before it)."""
    best_t = max((k for k in log if k <= t + 1e-9), default=None)
    return 0.0 if best_t is None else float(log[best_t])
