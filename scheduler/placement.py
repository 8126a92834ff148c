"""Placement on one node: which waiting jobs start now, on which GPUs, under the node power cap.

Pure functions, no I/O: the control loop passes the queue, the GPUs and the power already
committed, and launches what ``plan`` returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

_EPSILON_W = 1e-6
"""Slack on the power comparison so that budgets that add up exactly to the cap fit."""


class PlacementError(ValueError):
    """A request that could never be placed on this node (the message says what is allowed)."""


@dataclass(frozen=True, slots=True)
class GpuSlot:
    """One GPU of the node as placement sees it.

    Attributes:
        index: NVML index (as in ``CUDA_VISIBLE_DEVICES``).
        busy: Assigned to a running (or paused) job.
        idle_power_w: Power the GPU draws idle, W.
        min_limit_w / max_limit_w: Its power-limit range, W.
    """

    index: int
    busy: bool
    idle_power_w: float
    min_limit_w: float
    max_limit_w: float


@dataclass(frozen=True, slots=True)
class Waiting:
    """A queued job as placement sees it.

    Attributes:
        job_id: The job.
        priority: Higher goes first.
        submitted_at: Submission time (aware UTC); older goes first among equal priorities, and
            the time waited counts against ``starvation_s``.
        gpus: How many GPUs (an int), or exactly which indices (a tuple; a list is converted).
        watts_per_gpu: Wattage budget per GPU, W; ``None``: the budget is its GPUs' max limits.
    """

    job_id: int
    priority: int
    submitted_at: datetime
    gpus: int | tuple[int, ...]
    watts_per_gpu: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.gpus, int):
            object.__setattr__(self, "gpus", tuple(self.gpus))

    @property
    def gpu_count(self) -> int:
        """How many GPUs the job needs."""
        return self.gpus if isinstance(self.gpus, int) else len(self.gpus)

    @property
    def gpu_ids(self) -> tuple[int, ...] | None:
        """The exact indices asked for, or ``None`` for a count."""
        return None if isinstance(self.gpus, int) else self.gpus


@dataclass(frozen=True, slots=True)
class Placement:
    """Start job ``job_id`` on ``gpu_indices`` (ascending)."""

    job_id: int
    gpu_indices: tuple[int, ...]


def job_budget_w(watts_per_gpu: float | None, gpus: Iterable[GpuSlot]) -> float:
    """A job's power budget on ``gpus``, W: ``watts_per_gpu`` each, else each GPU's max limit."""
    chosen = list(gpus)
    if watts_per_gpu is None:
        return sum(g.max_limit_w for g in chosen)
    return watts_per_gpu * len(chosen)


def default_node_cap_w(gpus: Iterable[GpuSlot]) -> float:
    """The node cap when none is set: the sum of the GPUs' max limits, W."""
    return sum(g.max_limit_w for g in gpus)


def _runs(indices: Sequence[int]) -> list[list[int]]:
    """Maximal runs of consecutive integers in ascending ``indices``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def choose_gpus(job: Waiting, free: Iterable[int]) -> tuple[int, ...] | None:
    """The GPUs ``job`` would get from the ``free`` indices, or ``None`` if they do not suffice.

    Explicit ids must all be free. For a count, the smallest run of consecutive free indices
    that holds the job (the lowest such run on ties), taken from its start so that what stays
    free stays contiguous; without such a run, the lowest free indices.
    """
    free_sorted = sorted(set(free))
    if job.gpu_ids is not None:
        wanted = set(job.gpu_ids)
        return tuple(sorted(wanted)) if wanted <= set(free_sorted) else None
    n = job.gpu_count
    if n < 1 or n > len(free_sorted):
        return None
    fitting = [run for run in _runs(free_sorted) if len(run) >= n]
    if fitting:
        best = min(fitting, key=lambda run: (len(run), run[0]))
        return tuple(best[:n])
    return tuple(free_sorted[:n])


def _fits(
    job: Waiting,
    chosen: Sequence[int],
    by_index: dict[int, GpuSlot],
    free: set[int],
    committed_w: float,
    node_cap_w: float,
) -> bool:
    budget = job_budget_w(job.watts_per_gpu, (by_index[i] for i in chosen))
    idle_w = sum(by_index[i].idle_power_w for i in free - set(chosen))
    return committed_w + budget + idle_w <= node_cap_w + _EPSILON_W


def plan(
    waiting: Sequence[Waiting],
    gpus: Sequence[GpuSlot],
    *,
    node_cap_w: float,
    running_budget_w: float,
    now: datetime,
    starvation_s: float = 600.0,
) -> list[Placement]:
    """The waiting jobs to start now, and their GPUs.

    Order: priority descending, then ``submitted_at`` (then job id). Each job in turn fits when
    enough of the GPUs still free suit it (``choose_gpus``) AND::

        running_budget_w + budgets of jobs placed earlier in this plan + this job's budget
            + idle power of every GPU that stays free  <=  node_cap_w

    A job's budget is ``watts_per_gpu`` × its GPUs, or without a budget its GPUs' max limits.

    Backfill and starvation rule: a job that does not fit is passed over and later (lower
    priority or younger) jobs that fit may start in its place — unless it has waited longer than
    ``starvation_s``: such a starving job ends the pass, so nothing after it in the order starts
    until it has started. In particular, once the highest-priority waiting job has waited longer
    than ``starvation_s``, nothing starts ahead of it; running jobs drain until its GPUs and
    budget fit. (Higher-priority jobs still go first, as the order says.) A job that could not
    fit even on an empty node (more GPUs than exist, unknown ids, a budget over the cap) never
    blocks others; ``check_request`` refuses such jobs at submission.

    Args:
        waiting: The queued jobs.
        gpus: Every GPU of the node, busy or free.
        node_cap_w: The node's power cap, W (``default_node_cap_w`` when none is set).
        running_budget_w: The budgets of running (and paused) jobs together, W.
        now: Current time (aware UTC).
        starvation_s: How long a job may be passed over by backfill, s.

    Returns:
        The placements, in the order they were decided (start them in this order).
    """
    by_index = {g.index: g for g in gpus}
    free = {g.index for g in gpus if not g.busy}
    committed_w = running_budget_w
    everything = set(by_index)
    placements: list[Placement] = []
    for job in sorted(waiting, key=lambda j: (-j.priority, j.submitted_at, j.job_id)):
        chosen = choose_gpus(job, free)
        if chosen is not None and _fits(job, chosen, by_index, free, committed_w, node_cap_w):
            placements.append(Placement(job.job_id, chosen))
            free -= set(chosen)
            committed_w += job_budget_w(job.watts_per_gpu, (by_index[i] for i in chosen))
            continue
        waited_s = (now - job.submitted_at).total_seconds()
        if waited_s > starvation_s and _could_ever_fit(job, by_index, everything, node_cap_w):
            break
    return placements


def _could_ever_fit(
    job: Waiting, by_index: dict[int, GpuSlot], everything: set[int], node_cap_w: float
) -> bool:
    """Whether ``job`` fits on the node with every GPU free and nothing running."""
    chosen = choose_gpus(job, everything)
    return chosen is not None and _fits(job, chosen, by_index, everything, 0.0, node_cap_w)


def _fmt_w(value: float) -> str:
    return f"{value:g} W"


def check_request(
    request: int | Sequence[int],
    watts_per_gpu: float | None,
    gpus: Sequence[GpuSlot],
    *,
    node_cap_w: float | None = None,
) -> None:
    """Refuse a request that could never be placed on this node.

    Args:
        request: A GPU count, or explicit GPU indices.
        watts_per_gpu: The wattage budget per GPU, W, or ``None``.
        gpus: Every GPU of the node.
        node_cap_w: If given, also refuse a job whose budget plus the other GPUs' idle power
            exceeds the cap even on an empty node.

    Raises:
        PlacementError: The count is not in ``1..len(gpus)``, an index is unknown or repeated,
            ``watts_per_gpu`` is outside ``[max of the candidate GPUs' min limits, min of their
            max limits]`` (all GPUs for a count, the named ones for ids), or the job cannot fit
            under ``node_cap_w``. The message names the allowed range.
    """
    known = sorted(g.index for g in gpus)
    if isinstance(request, int):
        if not 1 <= request <= len(known):
            raise PlacementError(
                f"asked for {request} GPUs; this node has {len(known)} (allowed: 1 to {len(known)})"
            )
        candidates = list(gpus)
        job = Waiting(0, 0, datetime.min, request, watts_per_gpu)
    else:
        ids = list(request)
        if not ids:
            raise PlacementError(f"asked for no GPUs (allowed indices: {_list(known)})")
        if len(set(ids)) != len(ids):
            raise PlacementError(f"GPU ids repeat: {_list(ids)}")
        unknown = sorted(set(ids) - set(known))
        if unknown:
            raise PlacementError(f"unknown GPU ids {_list(unknown)} (allowed: {_list(known)})")
        candidates = [g for g in gpus if g.index in set(ids)]
        job = Waiting(0, 0, datetime.min, tuple(ids), watts_per_gpu)
    if watts_per_gpu is not None:
        low = max(g.min_limit_w for g in candidates)
        high = min(g.max_limit_w for g in candidates)
        if not low <= watts_per_gpu <= high:
            raise PlacementError(
                f"{_fmt_w(watts_per_gpu)} per GPU is outside the allowed range "
                f"{_fmt_w(low)} to {_fmt_w(high)} of GPUs {_list(g.index for g in candidates)}"
            )
    if node_cap_w is not None:
        by_index = {g.index: g for g in gpus}
        if not _could_ever_fit(job, by_index, set(by_index), node_cap_w):
            chosen = choose_gpus(job, set(by_index)) or ()
            budget = job_budget_w(watts_per_gpu, (by_index[i] for i in chosen))
            idle = sum(g.idle_power_w for g in gpus if g.index not in chosen)
            raise PlacementError(
                f"the job's budget {_fmt_w(budget)} plus {_fmt_w(idle)} idle power of the other "
                f"GPUs exceeds the node cap {_fmt_w(node_cap_w)} (allowed: at most "
                f"{_fmt_w(max(0.0, node_cap_w - idle))} for the job)"
            )


def _list(values: Iterable[int]) -> str:
    return ", ".join(str(v) for v in values) or "none"
