"""The API's request and response models (pydantic). Requests reject bad values with a message.

Modes and on-exceed policies are ``scheduler.jobs``'s enums; the answer to a progress report is
``scheduler.jobs.Directive`` itself (a plain dataclass the training client parses too).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from energy.optimizer import ObjectiveName
from scheduler.jobs import Mode, OnExceed

# Finite, positive, and below anything a node could draw: 100 kW per GPU is absurd on purpose.
Watts = Annotated[float, Field(gt=0, le=100_000, allow_inf_nan=False)]
WattHours = Annotated[float, Field(gt=0, le=1e9, allow_inf_nan=False)]
GpuIndex = Annotated[int, Field(ge=0, le=1023)]


def _one_line(text: str) -> str:
    # A name is shown on one line in tables, logs and reports; a control character (a newline,
    # an escape that rewrites the terminal) would break or forge that line.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("must not contain control characters (newlines, tabs, escapes)")
    return text


def _no_nul(text: str) -> str:
    # The kernel passes arguments and environment as C strings: a NUL would cut them short.
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    return text


def _env_name(text: str) -> str:
    if "=" in _no_nul(text):
        raise ValueError(f"environment variable name {text!r} must not contain '='")
    return text


JobName = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_one_line)]
NoNul = Annotated[str, AfterValidator(_no_nul)]
RunKey = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_one_line)]
Argument = Annotated[str, Field(min_length=1), AfterValidator(_no_nul)]
EnvName = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_env_name)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubmitRequest(_Request):
    """``powertrain submit``: a command to run under budgets on this node's GPUs."""

    name: JobName | None = None
    argv: Annotated[list[Argument], Field(min_length=1)]
    cwd: Annotated[str, Field(min_length=1, pattern=r"^/"), AfterValidator(_no_nul)]
    env: dict[EnvName, NoNul] = Field(default_factory=dict)
    gpus: Annotated[int, Field(ge=1, le=1024)] | None = None
    gpu_ids: Annotated[list[GpuIndex], Field(min_length=1)] | None = None
    watts: Watts | None = None
    energy_wh: WattHours | None = None
    mode: Mode = Mode.AUTO
    on_exceed: OnExceed = OnExceed.WARN
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    objective: ObjectiveName | None = None
    deadline: AwareDatetime | None = None

    @model_validator(mode="after")
    def _one_way_to_ask_for_gpus(self) -> Self:
        if self.gpus is not None and self.gpu_ids is not None:
            raise ValueError("give either gpus (a count) or gpu_ids, not both")
        if self.gpu_ids is not None and len(set(self.gpu_ids)) != len(self.gpu_ids):
            raise ValueError(f"gpu_ids repeats a GPU: {self.gpu_ids}")
        return self


class AttachRequest(_Request):
    """A process registering itself: a job started elsewhere (torchrun, Slurm, a notebook), a
    rank of a distributed run (``run_key`` and its ranks: every rank joins the run's one job),
    or a process of a submitted job joining it (``job_id``)."""

    name: JobName
    pid: Annotated[int, Field(ge=1)] | None = None
    gpu_ids: list[GpuIndex] | None = None
    total_steps: Annotated[int, Field(ge=1)] | None = None
    total_tokens: Annotated[int, Field(ge=1)] | None = None
    watts: Watts | None = None
    energy_wh: WattHours | None = None
    mode: Mode = Mode.AUTO
    on_exceed: OnExceed = OnExceed.WARN
    job_id: Annotated[int, Field(ge=1)] | None = None
    run_key: RunKey | None = None
    rank: Annotated[int, Field(ge=0)] = 0
    local_rank: Annotated[int, Field(ge=0)] = 0
    world_size: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    generation: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _rank_in_world(self) -> Self:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is not a rank of a world of {self.world_size}")
        if self.world_size > 1 and self.run_key is None and self.job_id is None:
            raise ValueError("a rank of a world of several processes needs a run_key or job_id")
        return self


class AllocationRequest(_Request):
    """A Slurm job registering its GPUs and budgets before it starts (``powertrain slurm
    prolog``; root or the admin group only): a job of ``user``, running on ``gpu_ids`` with no
    process of its own yet, whose ranks join it. The prolog of each of its nodes sends its own
    GPUs; all of them make one job."""

    slurm_job: Annotated[int, Field(ge=1)]
    name: JobName
    user: Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_one_line)]
    gpu_ids: Annotated[list[GpuIndex], Field(min_length=1)]
    cwd: Annotated[str, Field(min_length=1, pattern=r"^/"), AfterValidator(_no_nul)] | None = None
    watts: Watts | None = None
    energy_wh: WattHours | None = None
    mode: Mode = Mode.AUTO
    on_exceed: OnExceed = OnExceed.WARN

    @model_validator(mode="after")
    def _distinct_gpus(self) -> Self:
        if len(set(self.gpu_ids)) != len(self.gpu_ids):
            raise ValueError(f"gpu_ids repeats a GPU: {self.gpu_ids}")
        return self


class AllocationEndRequest(_Request):
    """A Slurm job has ended (``powertrain slurm epilog``; root or the admin group only): its
    job ends in ``state`` and every GPU setting made for it on this node is undone."""

    slurm_job: Annotated[int, Field(ge=1)]
    state: Literal["completed", "failed", "cancelled"]
    reason: Annotated[str, Field(min_length=1, max_length=500), AfterValidator(_one_line)]


class ProgressReport(_Request):
    """Cumulative totals since the job began, sent by the client about once a second."""

    steps: Annotated[int, Field(ge=0)]
    samples: Annotated[int, Field(ge=0)] = 0
    tokens: Annotated[int, Field(ge=0)] = 0
    step_time_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    total_steps: Annotated[int, Field(ge=1)] | None = None
    total_tokens: Annotated[int, Field(ge=1)] | None = None
    final: bool = False
    member: Annotated[int, Field(ge=1)] | None = None
    outcome: Literal["ok", "error", "stopped"] | None = None
    #: The micro-batches the loop allows now (an out-of-memory withdraws the larger ones) and
    #: its own one: the micro-batch lever (``scheduler.client.track(micro_batches=...)``).
    micro_batches: Annotated[
        list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=64)
    ] | None = None
    micro_batch_default: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _own_micro_batch_allowed(self) -> Self:
        if self.micro_batch_default is not None and self.micro_batches is None:
            raise ValueError("micro_batch_default comes with micro_batches")
        return self


class UpdateRequest(_Request):
    """Change a job's budgets or priority (``powertrain budget``)."""

    watts: Watts | None = None
    energy_wh: WattHours | None = None
    priority: Annotated[int, Field(ge=-1000, le=1000)] | None = None


class MemberView(BaseModel):
    """One process of a job (a rank): where it runs, what it reported itself, its state."""

    id: int
    node: str
    rank: int
    local_rank: int
    world_size: int
    generation: int
    pid: int
    gpus: list[int]
    state: str
    joined_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    steps: int
    samples: int
    tokens: int
    steps_per_s: float | None
    step_time_s: float | None


class JobView(BaseModel):
    """A job as the API and ``powertrain jobs --json`` show it.

    ``gpus`` are GPU indices, each on the node at the same place in ``gpu_nodes`` (a run's GPUs
    may be on several nodes); ``node`` is the node that owns the job (a run's rank 0). ``members``
    are its processes (one for a plain job): ``steps`` are the steps every member has finished,
    ``samples`` and ``tokens`` their sums. ``hold`` is a collective action (pause, stop, cancel,
    checkpoint) every rank takes at ``hold_step``.

    ``power_w`` is the 1 s average power of the job's GPUs together, W (in every output
    ``power_w`` is an average; an instant reading is ``power_instant_w``).
    """

    id: int
    name: str
    user: str
    state: str
    attached: bool
    argv: list[str]
    cwd: str | None
    gpus: list[int]
    gpu_count: int | None
    watts: float | None
    energy_wh: float | None
    mode: str
    mode_effective: str | None
    on_exceed: str
    priority: int
    pid: int | None
    submitted_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    exit_code: int | None
    end_reason: str | None
    deadline: datetime | None
    steps: int
    samples: int
    tokens: int
    power_w: float | None
    energy_j: float | None
    tokens_per_s: float | None
    samples_per_s: float | None
    j_per_token: float | None
    node: str
    gpu_nodes: list[str] = Field(default_factory=list)
    run_key: str | None = None
    world_size: int | None = None
    hold: str | None = None
    hold_step: int | None = None
    members: list[MemberView] = Field(default_factory=list)
    member_id: int | None = None


class SettingView(BaseModel):
    """A GPU setting powertrain may have in force for a job on this node (an outstanding entry
    of the settings journal): ``what`` in words (``power limit 300 W``), ``status`` ``pending``,
    ``applied`` or ``undo_failed``; ``dry_run``: nothing was really set."""

    gpu: int
    setting: str
    what: str
    status: str
    dry_run: bool
    applied_at: datetime | None


class JobEnergy(BaseModel):
    """A job's GPU energy as ``powertrain report --job`` counts it: its GPUs' energy over its
    span, J. ``complete``: the job has ended and every one of its GPUs has a stored
    sample at or after its end, so the figure is final; ``method`` as in reports (``counter``,
    ``trapezoid``, ``mixed``, ``none``)."""

    job: int
    energy_j: float
    method: str
    complete: bool
    gpus: int
    started_at: datetime | None
    ended_at: datetime | None


class LogChunk(BaseModel):
    """A piece of a job's log file, from ``offset``; ``next_offset`` continues it."""

    job_id: int
    stream: Literal["stdout", "stderr"]
    offset: int
    next_offset: int
    data: str
    ended: bool


class NodeUpdate(_Request):
    """Node settings (root or the admin group only)."""

    node_cap_w: Watts
