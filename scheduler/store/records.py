"""Plain records of the scheduler's rows: jobs, their events and progress, decisions, searches.

Frozen dataclasses, in the job vocabulary of ``scheduler.jobs``; times are aware UTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import NamedTuple

from energy.optimizer import Knob
from scheduler.jobs import Hold, JobState, MemberState, Mode, OnExceed


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job as submitted (or attached), before the store gives it an id.

    Attributes:
        name: Display name.
        user / uid / gid: The submitting user's login name and numeric ids (from the socket's
            peer credentials, never from the request).
        argv: The command; empty for an attached job that did not say.
        cwd: Working directory (absolute path).
        env: Environment of the job's process (the scheduler adds its own variables at launch).
        host: The node the job belongs to.
        gpu_count / gpu_ids_requested: How many GPUs, or which indices (at most one of the two;
            neither for an attached job, whose GPUs are recorded when it starts).
        watts_per_gpu: Wattage budget per GPU, W; ``None``: no budget.
        energy_budget_wh: Energy budget of the whole job, Wh; ``None``: none.
        mode: How the wattage budget is enforced.
        on_exceed: What to do when the energy budget runs out.
        priority: Higher runs first.
        objective: Name of an optimiser objective, for later use.
        total_steps / total_tokens: The job's declared size, from its client.
        attached: Started elsewhere and registered itself.
        pid / pid_create_time: An attached job's process and its psutil ``create_time`` (s since
            the epoch).
        deadline_at: When the job must end (aware UTC), or ``None``.
        run_key / world_size / generation: The distributed run the job is (``scheduler.runs``),
            or ``None`` for a job that is not one.
    """

    name: str
    user: str
    uid: int
    gid: int
    argv: tuple[str, ...]
    cwd: str
    host: str
    env: Mapping[str, str] = field(default_factory=dict)
    gpu_count: int | None = None
    gpu_ids_requested: tuple[int, ...] | None = None
    watts_per_gpu: float | None = None
    energy_budget_wh: float | None = None
    mode: Mode = Mode.AUTO
    on_exceed: OnExceed = OnExceed.WARN
    priority: int = 0
    objective: str | None = None
    total_steps: int | None = None
    total_tokens: int | None = None
    attached: bool = False
    pid: int | None = None
    pid_create_time: float | None = None
    deadline_at: datetime | None = None
    run_key: str | None = None
    world_size: int | None = None
    generation: int | None = None


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A stored job: every column of ``jobs`` plus its assigned GPUs.

    Attributes:
        id: Store key.
        name / user / uid / gid / argv / cwd / env / host: As in ``NewJob``.
        gpu_count / gpu_ids_requested: What was asked for.
        watts_per_gpu: Wattage budget per GPU, W.
        energy_budget_wh: Energy budget, Wh.
        mode: Requested enforcement mode; ``mode_effective`` the one in force (``None`` until
            chosen) and ``mode_reason`` why (e.g. "no permission to set power limits").
        on_exceed / priority / objective / total_steps / total_tokens / attached: As in ``NewJob``.
        state: Current state.
        pid / pid_create_time: The job's process (the runner, for launched jobs) and its psutil
            ``create_time`` in seconds since the epoch; a pid is trusted only with it.
        submitted_at / started_at / ended_at: Aware UTC; ``started_at`` is the first start.
        exit_code: The command's exit status (128 + n when killed by signal n).
        end_reason: Why the job ended (the reason of its final transition unless given).
        gpus: Assigned GPU indices, ascending (empty until placed).
        gpu_ids: The same GPUs' store ids (``gpus.id``), in the same order.
        deadline_at: When the job must end (aware UTC), or ``None``.
        run_key / world_size / generation: As in ``NewJob``.
        hold / hold_step / hold_reason: The collective action in force, the step every rank
            takes it at, and why (``None``: none).
        knob / knob_setting: The setting the owner node's energy optimiser holds a run at (mW
            or MHz), for the run's other nodes to apply; ``None``: none.
        gpu_hosts: The node of each GPU in ``gpus`` (a run's GPUs may be on several nodes).
    """

    id: int
    name: str
    user: str
    uid: int
    gid: int
    argv: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    gpu_count: int | None
    gpu_ids_requested: tuple[int, ...] | None
    watts_per_gpu: float | None
    energy_budget_wh: float | None
    mode: Mode
    mode_effective: Mode | None
    mode_reason: str | None
    on_exceed: OnExceed
    priority: int
    objective: str | None
    total_steps: int | None
    total_tokens: int | None
    state: JobState
    attached: bool
    host: str
    pid: int | None
    pid_create_time: float | None
    submitted_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    exit_code: int | None
    end_reason: str | None
    gpus: tuple[int, ...] = ()
    gpu_ids: tuple[int, ...] = ()
    deadline_at: datetime | None = None
    run_key: str | None = None
    world_size: int | None = None
    generation: int | None = None
    hold: Hold | None = None
    hold_step: int | None = None
    hold_reason: str | None = None
    knob: Knob | None = None
    knob_setting: int | None = None
    gpu_hosts: tuple[str, ...] = ()

    def on(self, host: str) -> JobRecord:
        """The job as one node controls it: its GPUs narrowed to those on ``host``."""
        keep = [i for i, h in enumerate(self.gpu_hosts) if h == host]
        return replace(
            self,
            gpus=tuple(self.gpus[i] for i in keep),
            gpu_ids=tuple(self.gpu_ids[i] for i in keep),
            gpu_hosts=(host,) * len(keep),
        )

    def spans_nodes(self, host: str) -> bool:
        """Whether some of the job's GPUs are on nodes other than ``host``."""
        return any(h != host for h in self.gpu_hosts)


@dataclass(frozen=True, slots=True)
class NewMember:
    """A process joining a job: a rank of a run, or the single process of a plain job.

    Attributes:
        host: Its node.
        rank / local_rank / world_size / generation: Its place in the run (0, 0, 1, 0 alone).
        pid / pid_create_time: The process and its psutil ``create_time``.
        gpus: The GPU indices on ``host`` it uses (may be empty when unknown).
    """

    host: str
    rank: int
    local_rank: int
    world_size: int
    generation: int
    pid: int
    pid_create_time: float
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """A stored member of a job (``job_members``): where it runs, what it reported, its state.

    Attributes:
        id / job_id: Store keys.
        host / rank / local_rank / world_size / generation / pid / pid_create_time / gpus: As
            in ``NewMember``.
        state: ``running`` or how it ended; ``ended_at`` / ``end_reason`` once it has.
        joined_at: When it joined.
        reported_at: Its last progress report (``None``: none yet).
        steps / samples / tokens: Its own cumulative totals.
        step_time_s: Its latest mean step time, s; ``steps_per_s``: its recent step rate.
        duty: The pacing its node asks of the run (soft mode), or ``None``.
    """

    id: int
    job_id: int
    host: str
    rank: int
    local_rank: int
    world_size: int
    generation: int
    pid: int
    pid_create_time: float
    gpus: tuple[int, ...]
    state: MemberState
    joined_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    reported_at: datetime | None
    steps: int
    samples: int
    tokens: int
    step_time_s: float | None
    steps_per_s: float | None
    duty: float | None


class RunTotals(NamedTuple):
    """A job's progress over its members: samples and tokens summed, steps the fewest any
    member has finished (the steps every rank has done)."""

    steps: int
    samples: int
    tokens: int


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One state change: at ``at`` (aware UTC) from ``from_state`` (``None``: creation)."""

    job_id: int
    at: datetime
    from_state: JobState | None
    to_state: JobState
    reason: str


@dataclass(frozen=True, slots=True)
class ProgressRecord:
    """Cumulative totals a job's client reported at ``at`` (``None``: not reported)."""

    job_id: int
    at: datetime
    steps: int | None
    samples: int | None
    tokens: int | None


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """A stored control decision (see ``scheduler.control.Decision``); ``*_after`` is ``None``
    until the change has settled."""

    id: int
    job_id: int
    at: datetime
    source: str
    what: str
    why: str
    power_before_w: float | None
    steps_per_s_before: float | None
    power_after_w: float | None
    steps_per_s_after: float | None


@dataclass(frozen=True, slots=True)
class ProbeRecord:
    """What one setting measured in an optimiser search (``energy.optimizer.Probe``'s totals).

    Attributes:
        setting: mW for a power limit, MHz for a locked clock.
        steps / time_s / energy_j: Steps measured, their wall time (s) and energy (J).
        micro_batch: The micro-batch it ran at, in a joint search (None: the job's own, in a
            search of the setting alone).
    """

    setting: int
    steps: int
    time_s: float
    energy_j: float
    micro_batch: int | None = None

    @property
    def step_time_s(self) -> float:
        return self.time_s / self.steps

    @property
    def energy_per_step_j(self) -> float:
        return self.energy_j / self.steps

    @property
    def power_w(self) -> float:
        return self.energy_j / self.time_s if self.time_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class SearchRecord:
    """A stored search of the energy optimiser for a job.

    Attributes:
        number: 1 for the job's first search, 2 after a re-tune, ...
        at: When it was last updated.
        objective: ``energy``, ``cost``, ``throughput`` or ``slowdown``.
        knob: ``power_limit`` (settings in mW) or ``sm_clocks`` (MHz).
        setting / top_setting: The choice, and the highest setting of the search (the job's
            default, or its wattage budget when that is lower).
        feasible / reason / revisions: As ``energy.optimizer.SearchResult``.
        profiling_steps / profiling_time_s / profiling_energy_j: What profiling cost the job.
        probes: What each setting measured, highest setting first; in a joint search, the
            micro-batch probes too (each names its micro-batch).
        micro_batch / default_micro_batch: A joint search's chosen micro-batch and the job's
            own (None: a search of the setting alone).
    """

    job_id: int
    number: int
    at: datetime
    objective: str
    knob: Knob
    setting: int
    top_setting: int
    feasible: bool
    reason: str
    revisions: int
    profiling_steps: int
    profiling_time_s: float
    profiling_energy_j: float
    probes: tuple[ProbeRecord, ...]
    micro_batch: int | None = None
    default_micro_batch: int | None = None

    def probe(self, setting: int) -> ProbeRecord | None:
        """What ``setting`` measured (at the chosen micro-batch), if it was probed."""
        return next((p for p in self.probes
                     if p.setting == setting and p.micro_batch == self.micro_batch), None)


class Throughput(NamedTuple):
    """Rates over a window of progress reports; ``None`` where the field was not reported."""

    steps_per_s: float | None
    samples_per_s: float | None
    tokens_per_s: float | None
