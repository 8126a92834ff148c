"""Where a GPU's energy went: attribution to jobs over their spans, idle energy, cost, CO2, and
energy per unit of work. Pure functions, no I/O.

The input is each GPU's energy between breakpoints (``GpuSegment``): every job span's start and
end on that GPU is a breakpoint, so within a segment the set of jobs on the GPU is constant. A
segment with no job is idle; with one job it is all that job's; with several (a shared GPU) it is
split by ``weights`` where given (each process's share of utilisation), else evenly. Rate changes
(time-of-use prices, carbon series) and report periods are breakpoints too, so each share is
priced at one rate and falls in one period.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from energy.cost import Rate, per_kwh
from energy.counters import combine_methods
from energy.units import j_to_wh

ATTRIBUTION_RULE = (
    "A job owns its GPUs' energy from its start to its end. A GPU running one job gives that job "
    "all of its energy; a GPU shared by several jobs at once splits it by each job's share of "
    "utilisation where that is known, else evenly. Energy of a GPU with no job is idle."
)

Weights = Callable[[int, float, float, Sequence[int]], Mapping[int, float] | None]
"""``(gpu_id, start_s, end_s, job_ids) -> job id to weight`` for a shared segment, or ``None``
(split evenly)."""

Period = str
"""``day`` or ``hour`` (UTC)."""


@dataclass(frozen=True, slots=True)
class JobSpan:
    """A job on one GPU over ``[start_s, end_s)`` (s since the epoch)."""

    job_id: int
    gpu_id: int
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class GpuSegment:
    """One GPU's energy over ``[start_s, end_s)``.

    Attributes:
        gpu_id: The GPU.
        start_s / end_s: The segment, s since the epoch.
        energy_j: Energy, J.
        peak_w: Highest power reading in it, W (``None``: no reading).
        method: ``counter``, ``trapezoid``, ``mixed`` or ``none``.
    """

    gpu_id: int
    start_s: float
    end_s: float
    energy_j: float
    peak_w: float | None
    method: str


@dataclass(frozen=True, slots=True)
class Share:
    """A part of a segment's energy given to one job, or idle (``job_id`` ``None``).

    Attributes:
        gpu_id / start_s / end_s / peak_w / method: As in the segment.
        job_id: The job, or ``None`` for idle energy.
        energy_j: This share's energy, J.
        sharing: How many jobs shared the GPU in this segment (0 for idle).
    """

    gpu_id: int
    start_s: float
    end_s: float
    job_id: int | None
    energy_j: float
    peak_w: float | None
    method: str
    sharing: int


def breakpoints(
    start_s: float, end_s: float, spans: Iterable[JobSpan], extra: Iterable[float] = ()
) -> list[float]:
    """Sorted breakpoints of one GPU over ``[start_s, end_s]``: the range's ends, every span's
    ends and ``extra`` times (rate changes, period boundaries) that fall inside it."""
    points = {start_s, end_s}
    for span in spans:
        for t in (span.start_s, span.end_s):
            if start_s < t < end_s:
                points.add(t)
    points.update(t for t in extra if start_s < t < end_s)
    return sorted(points)


def attribute(
    segments: Iterable[GpuSegment], spans: Iterable[JobSpan], weights: Weights | None = None
) -> list[Share]:
    """Split each segment's energy among the jobs on its GPU during it (see the module doc).

    A job is on a segment when its span contains the segment's midpoint (span ends are
    breakpoints, so a span covers a segment wholly or not at all).

    Args:
        segments: Energy between breakpoints, any GPUs.
        spans: The jobs' spans on their GPUs.
        weights: Shares of a shared segment; ``None``, or returning ``None``: evenly. Weights
            are normalised; negative or non-finite ones count as 0, and all-zero means evenly.

    Returns:
        One idle share per segment with no job, one share per job otherwise.
    """
    by_gpu: dict[int, list[JobSpan]] = {}
    for span in spans:
        if span.end_s > span.start_s:
            by_gpu.setdefault(span.gpu_id, []).append(span)
    for gpu_spans in by_gpu.values():
        gpu_spans.sort(key=lambda s: s.start_s)
    segs_by_gpu: dict[int, list[GpuSegment]] = {}
    for seg in segments:
        segs_by_gpu.setdefault(seg.gpu_id, []).append(seg)
    out: list[Share] = []
    for gpu_id, segs in segs_by_gpu.items():
        segs.sort(key=lambda s: s.start_s)
        gpu_spans = by_gpu.get(gpu_id, [])
        active: list[JobSpan] = []
        k = 0
        n_spans = len(gpu_spans)
        for seg in segs:
            mid = (seg.start_s + seg.end_s) / 2
            while k < n_spans and gpu_spans[k].start_s <= mid:
                active.append(gpu_spans[k])
                k += 1
            if active:
                active = [s for s in active if s.end_s > mid]
            if len(active) <= 1:  # the common case, without the set and the sort
                job_id = active[0].job_id if active else None
                out.append(Share(seg.gpu_id, seg.start_s, seg.end_s, job_id, seg.energy_j,
                                 seg.peak_w, seg.method, len(active)))
                continue
            jobs = sorted({s.job_id for s in active})
            out.extend(_split(seg, jobs, weights))
    return out


def _split(seg: GpuSegment, jobs: Sequence[int], weights: Weights | None) -> list[Share]:
    def share(job_id: int | None, energy_j: float) -> Share:
        return Share(seg.gpu_id, seg.start_s, seg.end_s, job_id, energy_j, seg.peak_w,
                     seg.method, len(jobs))

    if not jobs:
        return [share(None, seg.energy_j)]
    if len(jobs) == 1:
        return [share(jobs[0], seg.energy_j)]
    given = weights(seg.gpu_id, seg.start_s, seg.end_s, jobs) if weights else None
    w = {j: 1.0 for j in jobs}
    if given is not None:
        cleaned = {j: float(given.get(j, 0.0)) for j in jobs}
        cleaned = {j: v if math.isfinite(v) and v > 0 else 0.0 for j, v in cleaned.items()}
        if sum(cleaned.values()) > 0:
            w = cleaned
    total = sum(w.values())
    return [share(j, seg.energy_j * w[j] / total) for j in jobs]


def period_key(t_s: float, period: Period) -> str:
    """The UTC day (``2026-01-01``) or hour (``2026-01-01T13:00Z``) containing ``t_s``."""
    t = datetime.fromtimestamp(t_s, tz=UTC)
    if period == "day":
        return t.strftime("%Y-%m-%d")
    if period == "hour":
        return t.strftime("%Y-%m-%dT%H:00Z")
    raise ValueError(f"unknown period {period!r} (day or hour)")


def period_boundaries(start_s: float, end_s: float, period: Period) -> list[float]:
    """UTC day or hour boundaries strictly inside ``(start_s, end_s)``."""
    width = {"day": 86_400.0, "hour": 3_600.0}.get(period)
    if width is None:
        raise ValueError(f"unknown period {period!r} (day or hour)")
    t = math.floor(start_s / width) * width + width
    out = []
    while t < end_s:
        out.append(t)
        t += width
    return out


@dataclass(slots=True)
class GroupEnergy:
    """The sum of a group's shares.

    Attributes:
        energy_j: Energy, J (jobs' and idle shares alike).
        idle_j: Of which idle, J.
        peak_w: Highest single-GPU power reading, W.
        cost: Energy times the price in force, per share (``None`` without a price).
        co2_g: Energy times the carbon intensity in force, g (``None`` without one).
        methods: Methods of the shares' energy.
        shared_j: Energy from segments shared with other jobs, J.
    """

    energy_j: float = 0.0
    idle_j: float = 0.0
    peak_w: float | None = None
    cost: float | None = None
    co2_g: float | None = None
    methods: set[str] = field(default_factory=set)
    shared_j: float = 0.0

    @property
    def method(self) -> str:
        """``counter``, ``trapezoid``, ``mixed`` or ``none`` over the group's shares."""
        return combine_methods(self.methods)


def group(
    shares: Iterable[Share],
    key: Callable[[Share], Hashable | None],
    *,
    price: Rate | None = None,
    co2: Rate | None = None,
) -> dict[Hashable, GroupEnergy]:
    """Add shares up by ``key`` (shares whose key is ``None`` are left out), pricing each share
    at the rates in force at its start."""
    out: dict[Hashable, GroupEnergy] = {}
    for s in shares:
        k = key(s)
        if k is None:
            continue
        g = out.get(k)
        if g is None:
            g = out[k] = GroupEnergy(cost=0.0 if price else None, co2_g=0.0 if co2 else None)
        g.energy_j += s.energy_j
        if s.job_id is None:
            g.idle_j += s.energy_j
        if s.sharing > 1:
            g.shared_j += s.energy_j
        if s.peak_w is not None and (g.peak_w is None or s.peak_w > g.peak_w):
            g.peak_w = s.peak_w
        if s.energy_j or s.method != "none":
            g.methods.add(s.method)
        if price is not None and g.cost is not None:
            g.cost += per_kwh(s.energy_j, price.at(s.start_s))
        if co2 is not None and g.co2_g is not None:
            g.co2_g += per_kwh(s.energy_j, co2.at(s.start_s))
    return out


def merge(groups: Iterable[GroupEnergy]) -> GroupEnergy | None:
    """The sum of groups (as if their shares were grouped together); ``None`` for none."""
    out: GroupEnergy | None = None
    for g in groups:
        if out is None:
            out = GroupEnergy(cost=g.cost, co2_g=g.co2_g)
            out.energy_j, out.idle_j, out.shared_j = g.energy_j, g.idle_j, g.shared_j
            out.peak_w = g.peak_w
            out.methods = set(g.methods)
            continue
        out.energy_j += g.energy_j
        out.idle_j += g.idle_j
        out.shared_j += g.shared_j
        if g.peak_w is not None and (out.peak_w is None or g.peak_w > out.peak_w):
            out.peak_w = g.peak_w
        out.methods |= g.methods
        if out.cost is not None and g.cost is not None:
            out.cost += g.cost
        if out.co2_g is not None and g.co2_g is not None:
            out.co2_g += g.co2_g
    return out


def per_unit(energy_j: float, units: float | None) -> float | None:
    """Energy per unit of work (J/token, J/sample); ``None`` without work."""
    if units is None or units <= 0:
        return None
    return energy_j / units


def units_per_wh(units: float | None, energy_j: float) -> float | None:
    """Work per watt-hour (tokens/Wh); ``None`` without work or energy."""
    if units is None or energy_j <= 0:
        return None
    return units / j_to_wh(energy_j)
