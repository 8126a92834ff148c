"""Dividing a cluster power cap among jobs, by the throughput each measurably gains per watt.

Each job is known by the points it was measured at: under a per-GPU limit, the power its GPUs
drew and the throughput it made. From them ``divide`` estimates, per job, the throughput and the
draw at every limit of a grid, and spends the cap where a watt buys the most *relative*
throughput (throughput over the job's own estimated best), the quantity a cluster of many jobs
wants high on average. It walks each job's upper concave hull, so a job whose curve is S-shaped
(flat at the bottom, a steep knee, flat at the top) is given the watts to reach its knee or
none beyond its floor, rather than a share that buys nothing.

Estimates outside the measured limits are optimistic, so that an unexplored limit is tried
once and then known: above them a power-bound job's throughput and draw grow in proportion to
the limit; below them its draw falls with the limit and its throughput holds. A job that draws
well under its limit is not power-bound there, and more watts are not expected to help it. A job
not measured yet is never paused (it would never be measured). ``even`` is the reference: every
GPU the same limit (what DCGM does with a group budget).

Pure: no I/O; the leader in ``scheduler/cluster/cap.py`` and ``bench/cluster_cap.py`` call it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["JobDemand", "Point", "Share", "divide", "even"]

# A job drawing under this share of its limit is not held by the limit: it is bound elsewhere.
POWER_BOUND_SHARE = 0.9
# A job not yet measured is expected to draw this much over its limit: measured traces draw up
# to 20 % over the lowest limits, where a new job starts.
UNKNOWN_DRAW = 1.2


@dataclass(frozen=True, slots=True)
class Point:
    """A job measured under one per-GPU limit.

    Attributes:
        limit_w: The per-GPU limit (budget) it ran under, W.
        power_w: Its mean draw per GPU there, W.
        rate: Its throughput there (tokens/s, samples/s: any unit, the same for every point).
    """

    limit_w: float
    power_w: float
    rate: float


@dataclass(frozen=True, slots=True)
class JobDemand:
    """One running job as the divider sees it.

    Attributes:
        job_id: The job.
        gpus: How many GPUs it runs on.
        min_w / max_w: The lowest and highest per-GPU limit it may be given, W (its cards'
            range; ``max_w`` at most its own budget).
        points: Where it was measured; none for a job that has just started.
        idle_w: What each of its GPUs draws while the job is paused, W; ``None``: it may not
            be paused, its floor is ``min_w``.
    """

    job_id: int
    gpus: int
    min_w: float
    max_w: float
    points: tuple[Point, ...] = ()
    idle_w: float | None = None


@dataclass(frozen=True, slots=True)
class Share:
    """What a job is given.

    Attributes:
        limit_w: Its per-GPU limit, W (0 when it is to pause).
        power_w: The draw per GPU expected there, W.
        rate_rel: The relative throughput expected there (1 = its estimated best).
    """

    limit_w: float
    power_w: float
    rate_rel: float

    @property
    def paused(self) -> bool:
        return self.limit_w == 0


class _Curve:
    """A job's estimated draw and throughput against its per-GPU limit."""

    def __init__(self, job: JobDemand) -> None:
        merged: dict[float, list[Point]] = {}
        for p in job.points:
            if p.rate >= 0 and p.power_w > 0 and math.isfinite(p.rate):
                merged.setdefault(p.limit_w, []).append(p)
        self._pts = [
            (limit, sum(p.power_w for p in ps) / len(ps), sum(p.rate for p in ps) / len(ps))
            for limit, ps in sorted(merged.items())
        ]

    @property
    def best_rate(self) -> float | None:
        """The highest throughput measured, or ``None`` without a point."""
        return max((rate for _, _, rate in self._pts), default=None) or None

    def at(self, limit_w: float) -> tuple[float, float]:
        """(draw per GPU, throughput) expected under ``limit_w``; with no point yet, the
        draw is ``UNKNOWN_DRAW`` times the limit (cards draw over a low limit) and the
        throughput the limit (a unit that cancels out)."""
        pts = self._pts
        if not pts:
            return UNKNOWN_DRAW * limit_w, limit_w
        lo_l, lo_p, lo_r = pts[0]
        hi_l, hi_p, hi_r = pts[-1]
        if limit_w >= hi_l:
            if hi_p < POWER_BOUND_SHARE * hi_l:  # not held by its limit: more buys nothing
                return hi_p, hi_r
            return hi_p * limit_w / hi_l, hi_r * limit_w / hi_l
        if limit_w <= lo_l:
            if lo_p < POWER_BOUND_SHARE * lo_l:  # not held by its limit until it meets its draw
                return min(lo_p, limit_w), lo_r * min(1.0, limit_w / lo_p)
            return lo_p * limit_w / lo_l, lo_r  # optimistic: the draw falls, the rate holds
        for (l0, p0, r0), (l1, p1, r1) in itertools.pairwise(pts):
            if l0 <= limit_w <= l1:
                w = (limit_w - l0) / (l1 - l0)
                return p0 + w * (p1 - p0), r0 + w * (r1 - r0)
        raise AssertionError("unreachable: the limit lies between two points")


def _grid(job: JobDemand, step_w: float) -> list[float]:
    n = max(0, math.floor((job.max_w - job.min_w) / step_w + 1e-9))
    limits = [job.min_w + i * step_w for i in range(n + 1)]
    if limits[-1] < job.max_w - 1e-9:
        limits.append(job.max_w)
    return limits


@dataclass(frozen=True, slots=True)
class _Row:
    limit_w: float
    power_w: float  # per GPU
    value: float  # relative throughput
    cost_w: float  # all its GPUs

    def share(self) -> Share:
        return Share(self.limit_w, self.power_w, self.value)


def _hull(rows: list[_Row]) -> list[_Row]:
    """The upper concave hull of a job's (cost, value) rows, from the cheapest row up: the
    rows worth stopping at."""
    hull: list[_Row] = []
    for row in sorted(rows, key=lambda r: (r.cost_w, -r.value)):
        if hull and row.value <= hull[-1].value:
            continue  # costs more, gains nothing
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b goes when it lies on or under the line from a to row
            if (b.value - a.value) * (row.cost_w - a.cost_w) <= (
                (row.value - a.value) * (b.cost_w - a.cost_w)
            ):
                hull.pop()
            else:
                break
        hull.append(row)
    return hull


def _rows(job: JobDemand, step_w: float) -> list[_Row]:
    curve = _Curve(job)
    at = [(limit, *curve.at(limit)) for limit in _grid(job, step_w)]
    # relative to the best it was measured at: what it is known to lose when cut or paused;
    # an unmeasured limit above may promise more than 1, and is tried for that
    best = curve.best_rate or max(rate for _, _, rate in at) or 1.0
    rows = [_Row(limit, power, rate / best, job.gpus * power) for limit, power, rate in at]
    if job.idle_w is not None and job.points:  # a job is measured before it may be paused
        rows.append(_Row(0.0, job.idle_w, 0.0, job.gpus * job.idle_w))
    return rows


def divide(cap_w: float, jobs: Sequence[JobDemand], *, step_w: float = 5.0) -> dict[int, Share]:
    """Divide ``cap_w`` (expected draw of all the jobs' GPUs together) among ``jobs``.

    Every job gets at least its floor (paused, for a job with an ``idle_w``; else its cheapest
    limit); above it, watts go where they buy the most relative throughput per watt of expected
    draw, until the cap is spent or every job is at its ``max_w``. When even the floors exceed
    the cap, every job is at its floor: the cap cannot be held then, and the caller must say
    so.

    Args:
        cap_w: Watts to divide, W (the caller keeps its margin out of it).
        jobs: The running jobs.
        step_w: The grid of limits, W.

    Returns:
        Each job's share, by job id.
    """
    if not step_w > 0:
        raise ValueError(f"the step must be positive, got {step_w} W")
    rows = {job.job_id: _rows(job, step_w) for job in jobs}
    held: dict[int, _Row] = {}
    segments: list[tuple[float, int, _Row, _Row]] = []
    for job_id, table in rows.items():
        hull = _hull(table)
        held[job_id] = hull[0]
        for a, b in itertools.pairwise(hull):
            segments.append(((b.value - a.value) / (b.cost_w - a.cost_w), job_id, a, b))
    spent = sum(row.cost_w for row in held.values())
    # best gain per watt first; a concave hull's segments come in its own order
    for _, job_id, a, b in sorted(segments, key=lambda s: (-s[0], s[1])):
        if held[job_id] is not a:
            continue  # an earlier segment of this job was only partly bought
        if spent - a.cost_w + b.cost_w <= cap_w:
            spent += b.cost_w - a.cost_w
            held[job_id] = b
            continue
        # part of the segment: the grid row between a and b that fits and is worth most
        fits = [r for r in rows[job_id] if a.cost_w < r.cost_w <= cap_w - spent + a.cost_w
                and r.value > a.value]
        if fits:
            best = max(fits, key=lambda r: (r.value, -r.cost_w))
            spent += best.cost_w - a.cost_w
            held[job_id] = best
    return {job_id: row.share() for job_id, row in held.items()}


def even(cap_w: float, jobs: Sequence[JobDemand]) -> dict[int, float]:
    """Every GPU the same per-GPU limit, ``cap_w`` over the GPUs, within each job's range
    (an equal split of the cap, as DCGM splits a group's budget)."""
    gpus = sum(j.gpus for j in jobs)
    if gpus == 0:
        return {}
    each = cap_w / gpus
    return {j.job_id: min(j.max_w, max(j.min_w, each)) for j in jobs}
