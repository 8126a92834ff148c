"""Report data: energy per job, GPU, user or period from the store, with cost, CO2 and work.

``build_report`` reads each GPU's energy between breakpoints (job starts and ends, rate changes,
period boundaries) with ``Store.segment_energy_us`` (raw samples for short ranges; for long ones,
rollups: one energy mark per job edge, so the cost grows with the jobs reported, not with the
samples stored), hands it to ``energy.accounting`` for attribution, and adds the jobs' progress
and, for distributed runs, their ranks (``reports.ranks``). ``timeline`` and ``job_life`` read the
series behind the charts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from energy.accounting import (
    ATTRIBUTION_RULE,
    GpuSegment,
    GroupEnergy,
    JobSpan,
    Share,
    attribute,
    breakpoints,
    group,
    merge,
    per_unit,
    period_boundaries,
    period_key,
    units_per_wh,
)
from energy.cost import Rate
from energy.units import j_to_kwh, mj_to_j, mw_to_w, s_to_us, us_to_s
from reports import jobrows
from reports.jobrows import JobRow, MemberRow, ProgressAt
from reports.optimizer import OptimizerSummary, summarise_search
from reports.ranks import RunRanks, run_ranks
from telemetry.store import RAW_MAX_SPAN_S, GpuRecord, Store
from telemetry.store.models import from_epoch_us, to_epoch_us

By = Literal["job", "gpu", "user", "day", "hour"]
BY_CHOICES: tuple[By, ...] = ("job", "gpu", "user", "day", "hour")
IDLE_KEY = "idle"

SOURCE_RULE = (
    f"Ranges up to {RAW_MAX_SPAN_S / 3600:g} h read raw samples (energy counter deltas; "
    "trapezoid of power across counter resets and on GPUs without a counter; a sample interval "
    "that straddles a job's start or end is split in proportion to time). Longer ranges read "
    "rollups, which are sums of counter deltas kept as a running total per GPU: a segment's "
    "energy is the difference of the totals at its ends, and the minute in which a job starts "
    "or ends is split where the raw samples' energy counter puts the boundary (worked out once "
    "per job edge when its hour is rolled up), or in proportion to time once retention has "
    "deleted them. Peak power comes from the 1-minute rollups at the edges and the hourly ones "
    "inside."
)


class ReportInputError(ValueError):
    """The request cannot be answered as asked (bad range, unknown GPU)."""


class UnknownJobError(LookupError):
    """No job has the requested id."""


@dataclass(frozen=True, slots=True)
class ReportRequest:
    """What to report.

    Attributes:
        since / until: The range (aware UTC); defaults: the job's span with ``job_id``, else
            from the first GPU's registration until ``now``.
        by: Grouping: ``job``, ``gpu``, ``user``, ``day`` or ``hour`` (UTC periods).
        job_id / user / gpu_index: Filters (one job; one user's jobs; GPUs with this index).
        node: Only the GPUs of this node (``gpus.host``); the defaults of ``since`` and
            ``until`` then come from its GPUs. A run with GPUs on several nodes is reported
            with its energy on this node's GPUs, and its samples and tokens in the share its
            members on this node reported (of the run's GPUs, without member totals); its
            steps are the run's, which every rank takes.
        price: Electricity price per kWh (flat or time of use); ``None``: no cost column.
        co2: Carbon intensity in gCO2/kWh (constant or series); ``None``: no CO2 column.
        now: The current time (aware UTC); the wall clock if ``None``.
        source: ``auto`` (see ``Store.segment_energy``), or force ``samples`` or ``rollups``.
    """

    since: datetime | None = None
    until: datetime | None = None
    by: By = "job"
    job_id: int | None = None
    user: str | None = None
    gpu_index: int | None = None
    node: str | None = None
    price: Rate | None = None
    co2: Rate | None = None
    now: datetime | None = None
    source: Literal["auto", "samples", "rollups"] = "auto"


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One group of the report (a job, GPU, user, period, or the idle line).

    Attributes:
        key: The group: job id, GPU (``index``, or ``host:index`` across hosts), user name,
            period (``2026-01-01``, ``2026-01-01T13:00Z``) or ``idle``.
        label: A display name (the job's name, the GPU's model, ...).
        energy_j: Energy, J. ``idle_j``: of which no job ran, J.
        mean_power_w: ``energy_j`` over the group's time (a job's span, else the period or the
            range), W.
        peak_power_w: Highest single-GPU power reading, W.
        tokens / samples / steps: Work done in the group's time (from progress reports).
        j_per_token / j_per_sample / tokens_per_wh: Energy per unit of work and its inverse.
        cost: In the price's currency; ``co2_g``: grams of CO2.
        method: How the energy was found: ``counter``, ``trapezoid``, ``mixed``, ``none``.
        start / end: The group's time (aware UTC).
        extra: Per-kind fields (job: name, user, gpus, state, budgets, the optimiser's searches,
            ``ranks`` of a distributed run; gpu: host, index, name).
    """

    key: str
    label: str
    energy_j: float
    idle_j: float
    mean_power_w: float | None
    peak_power_w: float | None
    tokens: int | None
    samples: int | None
    steps: int | None
    j_per_token: float | None
    j_per_sample: float | None
    tokens_per_wh: float | None
    cost: float | None
    co2_g: float | None
    method: str
    start: datetime
    end: datetime
    shared_j: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict (times as ISO 8601)."""
        out: dict[str, Any] = {
            "key": self.key,
            "label": self.label,
            "energy_j": self.energy_j,
            "energy_kwh": j_to_kwh(self.energy_j),
            "idle_j": self.idle_j,
            "shared_j": self.shared_j,
            "mean_power_w": self.mean_power_w,
            "peak_power_w": self.peak_power_w,
            "tokens": self.tokens,
            "samples": self.samples,
            "steps": self.steps,
            "j_per_token": self.j_per_token,
            "j_per_sample": self.j_per_sample,
            "tokens_per_wh": self.tokens_per_wh,
            "cost": self.cost,
            "co2_g": self.co2_g,
            "method": self.method,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
        }
        out.update(self.extra)
        return out


@dataclass(frozen=True, slots=True)
class Summary:
    """The report's headline figures and the rules behind them.

    Attributes:
        since / until: The range (aware UTC).
        energy_j / job_energy_j / idle_energy_j: Total, given to jobs, idle, J (within the
            filters: with a job or user filter there is no idle energy).
        idle_share: ``idle_energy_j / energy_j`` (``None`` without energy).
        cost / co2_g: Totals (``None`` without a price / carbon intensity).
        tokens: Tokens of the reported jobs; ``j_per_token``: their energy per token.
        methods: Methods the energy came from; ``source``: ``samples``, ``rollups`` or both.
        counter_resets / gaps: Seen in raw samples (rollups do not keep them).
        attribution_rule / source_rule / price / co2: One line each, for the report.
        n_jobs / n_gpus: Jobs and GPUs in the report.
    """

    since: datetime
    until: datetime
    energy_j: float
    job_energy_j: float
    idle_energy_j: float
    idle_share: float | None
    cost: float | None
    co2_g: float | None
    tokens: int | None
    j_per_token: float | None
    method: str
    source: str
    counter_resets: int
    gaps: int
    attribution_rule: str
    source_rule: str
    price: str | None
    co2: str | None
    n_jobs: int
    n_gpus: int


@dataclass(frozen=True, slots=True)
class Report:
    """A computed report: the request, summary, rows, what the charts need, the energy
    optimiser's searches of the reported jobs and the ranks of their distributed runs (by job
    id), and each job's share of its run's samples and tokens in the report (below 1 only for a
    run reported on one of its nodes: see ``ReportRequest.node``)."""

    request: ReportRequest
    summary: Summary
    rows: list[ReportRow]
    jobs: dict[int, JobRow]
    gpus: dict[int, GpuRecord]
    spans: list[JobSpan]
    optimizer: dict[int, list[OptimizerSummary]] = field(default_factory=dict)
    ranks: dict[int, RunRanks] = field(default_factory=dict)
    work_share: dict[int, float] = field(default_factory=dict)


def _gpu_key(gpu: GpuRecord, multi_host: bool) -> str:
    return f"{gpu.host}:{gpu.index}" if multi_host else str(gpu.index)


def _us_points(times_s: Sequence[float]) -> list[int]:
    return sorted({round(s_to_us(t)) for t in times_s})


def _tokens_delta(a: Any, b: Any) -> tuple[int | None, int | None, int | None]:
    """Progress between two ``jobrows.ProgressAt`` (a missing start counts as 0)."""

    def d(x: int | None, y: int | None) -> int | None:
        if y is None:
            return None
        return max(0, y - (x or 0))

    return d(a.steps, b.steps), d(a.samples, b.samples), d(a.tokens, b.tokens)


def _add(x: int | None, y: int | None) -> int | None:
    if y is None:
        return x
    return y if x is None else x + y


def build_report(store: Store, request: ReportRequest) -> Report:
    """Compute a report (see the module doc).

    Raises:
        UnknownJobError: ``job_id`` names no job.
        ReportInputError: ``since`` is not before ``until``, no GPU has ``gpu_index``, or the
            store has no GPU of ``node``.
    """
    now = request.now or datetime.now(UTC)
    store_gpus = {g.id: g for g in store.gpus()}
    gpus = store_gpus if request.node is None else _node_gpus(store_gpus, request.node)
    multi_host = len({g.host for g in gpus.values()}) > 1
    all_jobs = {j.id: j for j in jobrows.jobs(store, started=True)}
    job: JobRow | None = None
    if request.job_id is not None:
        job = jobrows.job(store, request.job_id)
        if job is None:
            raise UnknownJobError(f"no job {request.job_id}")
    latest = max((g.last_seen_at for g in gpus.values()), default=now)
    # by default the report ends at the latest data (or now, if that is earlier)
    until = request.until or (job.ended_at if job and job.ended_at else None) or min(now, latest)
    since = request.since or (job.started_at if job and job.started_at else None)
    if since is None:
        first = min((g.first_seen_at for g in gpus.values()), default=until - timedelta(days=1))
        since = min(first, until)
    if since >= until:
        raise ReportInputError(
            f"--since ({since.isoformat()}) must be before --until ({until.isoformat()})"
        )
    since_s, until_s = us_to_s(to_epoch_us(since)), us_to_s(to_epoch_us(until))

    selected = dict(gpus)
    if request.gpu_index is not None:
        selected = {i: g for i, g in gpus.items() if g.index == request.gpu_index}
        if not selected:
            where = "in the store" if request.node is None else f"on node {request.node}"
            raise ReportInputError(f"no GPU with index {request.gpu_index} {where}")
    if job is not None:
        selected = {i: g for i, g in selected.items() if i in job.gpu_ids}

    def job_end(j: JobRow) -> datetime:
        return j.ended_at or max(now, j.started_at or now)

    spans: list[JobSpan] = []
    for j in all_jobs.values():
        assert j.started_at is not None
        if j.started_at >= until or (j.ended_at is not None and j.ended_at <= since):
            continue  # outside the range (the common case over a short range)
        start_s = max(us_to_s(to_epoch_us(j.started_at)), since_s)
        end_s = min(us_to_s(to_epoch_us(job_end(j))), until_s)
        if end_s <= start_s:
            continue
        spans.extend(JobSpan(j.id, g, start_s, end_s) for g in j.gpu_ids if g in selected)

    def wanted(job_id: int) -> bool:
        if job is not None and job_id != job.id:
            return False
        return request.user is None or all_jobs[job_id].user == request.user

    if request.user is not None or job is not None:
        used = {s.gpu_id for s in spans if wanted(s.job_id)}
        selected = {i: g for i, g in selected.items() if i in used}
        spans = [s for s in spans if s.gpu_id in selected]

    extra: list[float] = []
    for rate in (request.price, request.co2):
        if rate is not None:
            extra.extend(rate.changes(since_s, until_s))
    if request.by in ("day", "hour"):
        extra.extend(period_boundaries(since_s, until_s, request.by))
    spans_by_gpu: dict[int, list[JobSpan]] = {}
    for s in spans:
        spans_by_gpu.setdefault(s.gpu_id, []).append(s)
    points = {
        gpu_id: _us_points(breakpoints(since_s, until_s, spans_by_gpu.get(gpu_id, ()), extra))
        for gpu_id in selected
    }
    energies = store.segment_energy_us(points, source=request.source)
    segments: list[GpuSegment] = []
    sources: set[str] = set()
    resets = gaps = 0
    for gpu_id, segs in energies.items():
        for seg in segs:
            sources.add(seg.source)
            resets += seg.counter_resets
            gaps += seg.gaps
            segments.append(
                GpuSegment(
                    gpu_id,
                    us_to_s(seg.start_us),
                    us_to_s(seg.end_us),
                    mj_to_j(seg.energy_mj),
                    None if seg.max_power_mw is None else mw_to_w(seg.max_power_mw),
                    seg.method,
                )
            )
    shares = attribute(segments, spans)
    if request.user is not None or job is not None:
        shares = [s for s in shares if s.job_id is not None and wanted(s.job_id)]

    reported_jobs = sorted({s.job_id for s in shares if s.job_id is not None})
    job_span: dict[int, tuple[float, float]] = {}
    for s in spans:
        lo, hi = job_span.get(s.job_id, (s.start_s, s.end_s))
        job_span[s.job_id] = (min(lo, s.start_s), max(hi, s.end_s))

    # progress at each reported job's clipped span ends (and period boundaries inside it)
    times: dict[int, list[float]] = {}
    for job_id in reported_jobs:
        lo, hi = job_span[job_id]
        ts = [lo, hi]
        if request.by in ("day", "hour"):
            ts.extend(period_boundaries(lo, hi, request.by))
        times[job_id] = sorted(set(ts))
    queries = [(job_id, round(s_to_us(t))) for job_id in reported_jobs for t in times[job_id]]
    answers = iter(jobrows.progress_at_us(store, queries))
    progress = {job_id: [next(answers) for _ in times[job_id]] for job_id in reported_jobs}
    members = jobrows.members(store, reported_jobs)
    work_share: dict[int, float] = {}
    if request.node is not None:
        for job_id in reported_jobs:
            share = _node_share(all_jobs[job_id], members.get(job_id, []), store_gpus,
                                request.node)
            if share < 1.0:
                work_share[job_id] = share
    # the work the report counts: a run's samples and tokens in this node's share
    work = {job_id: [_scaled(p, work_share[job_id]) for p in ps] if job_id in work_share else ps
            for job_id, ps in progress.items()}

    rows, groups = _rows(request, shares, all_jobs, selected, multi_host, job_span, times,
                         work, since_s, until_s)

    totals = merge(groups.values())
    energy_j = totals.energy_j if totals else 0.0
    idle_j = totals.idle_j if totals else 0.0
    tokens: int | None = None
    for job_id in reported_jobs:
        tokens = _add(tokens, _tokens_delta(work[job_id][0], work[job_id][-1])[2])
    summary = Summary(
        since=since,
        until=until,
        energy_j=energy_j,
        job_energy_j=energy_j - idle_j,
        idle_energy_j=idle_j,
        idle_share=idle_j / energy_j if energy_j > 0 else None,
        cost=totals.cost if totals else None,
        co2_g=totals.co2_g if totals else None,
        tokens=tokens,
        j_per_token=per_unit(energy_j - idle_j, tokens),
        method=totals.method if totals else "none",
        source=" and ".join(sorted(sources)) or "none",
        counter_resets=resets,
        gaps=gaps,
        attribution_rule=ATTRIBUTION_RULE
        + " The store keeps no per-process utilisation, so shared GPUs are split evenly.",
        source_rule=SOURCE_RULE,
        price=request.price.describe() if request.price else None,
        co2=request.co2.describe() if request.co2 else None,
        n_jobs=len(reported_jobs),
        n_gpus=len(selected),
    )
    optimizer = _optimizer_summaries(store, progress)
    ranks = {job_id: view for job_id, ms in members.items()
             if (view := run_ranks(ms)) is not None}
    if request.by == "job":
        rows = [replace(row, extra={
            **row.extra,
            "optimizer": [o.to_json() for o in optimizer.get(int(row.key), [])],
            "ranks": ranks[int(row.key)].to_json() if int(row.key) in ranks else None,
        }) if row.key != IDLE_KEY else row for row in rows]
    return Report(request, summary, rows, {i: all_jobs[i] for i in reported_jobs}, selected,
                  spans, optimizer, ranks, work_share)


def _node_gpus(gpus: dict[int, GpuRecord], node: str) -> dict[int, GpuRecord]:
    """The GPUs of ``node``.

    Raises:
        ReportInputError: None of the store's GPUs is on ``node`` (the message names those
            that are).
    """
    mine = {i: g for i, g in gpus.items() if g.host == node}
    if not mine:
        known = sorted({g.host for g in gpus.values()})
        have = f"the nodes with GPUs are {', '.join(known)}" if known else "it has no GPU yet"
        raise ReportInputError(f"no GPU of node {node!r} in the store: {have}")
    return mine


def _node_share(
    job: JobRow, members: Sequence[MemberRow], gpus: dict[int, GpuRecord], node: str
) -> float:
    """The share of a job's samples and tokens done on ``node``: its members' there over all
    its members' (tokens, else samples), else its GPUs' there over all its GPUs."""
    for totals in ([(m.host, m.tokens) for m in members], [(m.host, m.samples) for m in members]):
        total = sum(t for _, t in totals)
        if total > 0:
            return sum(t for host, t in totals if host == node) / total
    if not job.gpu_ids:
        return 1.0
    return sum(1 for g in job.gpu_ids if g in gpus and gpus[g].host == node) / len(job.gpu_ids)


def _scaled(p: ProgressAt, share: float) -> ProgressAt:
    """Progress with samples and tokens in ``share`` (steps are every rank's)."""

    def part(v: int | None) -> int | None:
        return None if v is None else round(v * share)

    return ProgressAt(p.steps, part(p.samples), part(p.tokens))


def _optimizer_summaries(
    store: Store, progress: dict[int, list[Any]]
) -> dict[int, list[OptimizerSummary]]:
    """The energy optimiser's searches of the reported jobs, with tokens per step from their
    progress over the range."""
    out: dict[int, list[OptimizerSummary]] = {}
    for job_id, searches in jobrows.searches(store, progress).items():
        steps, _, tokens = _tokens_delta(progress[job_id][0], progress[job_id][-1])
        per_step = tokens / steps if steps and tokens else None
        out[job_id] = [summarise_search(s, per_step) for s in searches]
    return out


def _rows(
    request: ReportRequest,
    shares: list[Share],
    jobs: dict[int, JobRow],
    gpus: dict[int, GpuRecord],
    multi_host: bool,
    job_span: dict[int, tuple[float, float]],
    times: dict[int, list[float]],
    progress: dict[int, list[Any]],
    since_s: float,
    until_s: float,
) -> tuple[list[ReportRow], dict[Hashable, GroupEnergy]]:
    """The report's rows, and the groups of shares behind them."""
    by = request.by
    work: dict[Hashable, list[int | None]] = {}  # key -> [steps, samples, tokens]

    def add_work(key: Hashable, delta: tuple[int | None, ...], fraction: float = 1.0) -> None:
        acc = work.setdefault(key, [None, None, None])
        for i, v in enumerate(delta):
            if v is not None:
                acc[i] = _add(acc[i], round(v * fraction))

    for job_id, ps in progress.items():
        whole = _tokens_delta(ps[0], ps[-1])
        if by == "job":
            add_work(str(job_id), whole)
        elif by == "user":
            add_work(jobs[job_id].user, whole)
        elif by == "gpu":
            mine = [gpu_id for gpu_id in jobs[job_id].gpu_ids if gpu_id in gpus]
            for gpu_id in mine:
                add_work(_gpu_key(gpus[gpu_id], multi_host), whole, 1.0 / len(mine))
        else:
            ts = times[job_id]
            for k in range(len(ts) - 1):
                add_work(period_key(ts[k], by), _tokens_delta(ps[k], ps[k + 1]))

    key_of: Callable[[Share], Hashable]
    if by == "job":
        key_of = lambda s: IDLE_KEY if s.job_id is None else str(s.job_id)  # noqa: E731
    elif by == "user":
        key_of = lambda s: IDLE_KEY if s.job_id is None else jobs[s.job_id].user  # noqa: E731
    elif by == "gpu":
        gpu_keys = {gpu_id: _gpu_key(gpu, multi_host) for gpu_id, gpu in gpus.items()}
        key_of = lambda s: gpu_keys[s.gpu_id]  # noqa: E731
    else:
        key_of = lambda s: period_key(s.start_s, by)  # noqa: E731

    groups = group(shares, key_of, price=request.price, co2=request.co2)
    span_of: dict[Hashable, tuple[float, float]] = {}
    if by in ("day", "hour"):  # only periods take their span from their shares
        for s in shares:
            sk = key_of(s)
            lo, hi = span_of.get(sk, (s.start_s, s.end_s))
            span_of[sk] = (min(lo, s.start_s), max(hi, s.end_s))

    rows: list[ReportRow] = []
    for gk, g in groups.items():
        key = str(gk)
        extra: dict[str, Any] = {}
        label = key
        if by == "job" and key != IDLE_KEY:
            j = jobs[int(key)]
            start_s, end_s = job_span[j.id]
            label = j.name
            extra = {
                "job_id": j.id,
                "name": j.name,
                "user": j.user,
                "state": j.state,
                "gpus": list(j.gpus),
                "watts_per_gpu": j.watts_per_gpu,
                "energy_budget_wh": j.energy_budget_wh,
                "argv": list(j.argv),
            }
        elif by in ("day", "hour"):
            start_s, end_s = span_of[gk]
        else:
            start_s, end_s = since_s, until_s
            if by == "gpu":
                gpu = next(x for x in gpus.values() if _gpu_key(x, multi_host) == key)
                label = gpu.name
                extra = {"host": gpu.host, "index": gpu.index, "gpu_name": gpu.name}
        if by in ("day", "hour"):
            # a period row spans its period, clipped to the range
            p_start = _period_start(start_s, by)
            width = 86_400.0 if by == "day" else 3_600.0
            start_s, end_s = max(p_start, since_s), min(p_start + width, until_s)
        steps, samples, tokens = work.get(gk, [None, None, None])
        duration = end_s - start_s
        job_energy = g.energy_j - g.idle_j
        rows.append(
            ReportRow(
                key=key,
                label=label,
                energy_j=g.energy_j,
                idle_j=g.idle_j,
                mean_power_w=g.energy_j / duration if duration > 0 else None,
                peak_power_w=g.peak_w,
                tokens=tokens,
                samples=samples,
                steps=steps,
                j_per_token=per_unit(job_energy, tokens),
                j_per_sample=per_unit(job_energy, samples),
                tokens_per_wh=units_per_wh(tokens, job_energy),
                cost=g.cost,
                co2_g=g.co2_g,
                method=g.method,
                start=from_epoch_us(round(s_to_us(start_s))),
                end=from_epoch_us(round(s_to_us(end_s))),
                shared_j=g.shared_j,
                extra=extra,
            )
        )

    def order(row: ReportRow) -> tuple[Any, ...]:
        if row.key == IDLE_KEY:
            return (1, 0, "")
        if by == "job":
            return (0, int(row.key), "")
        if by == "user":
            return (0, -row.energy_j, row.key)
        if by == "gpu":
            return (0, row.extra.get("host", ""), row.extra.get("index", 0))
        return (0, 0, row.key)

    rows.sort(key=order)
    return rows, groups


def _period_start(t_s: float, by: str) -> float:
    width = 86_400.0 if by == "day" else 3_600.0
    return math.floor(t_s / width) * width


# -- chart series ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GpuTimeline:
    """One GPU's power over the report's range, and the jobs on it.

    Attributes:
        gpu_key / gpu_name: As in the report.
        times_s: Bucket starts, s since the epoch; ``mean_w``: mean power per bucket, W.
        jobs: ``(job_id, name, start_s, end_s, watts_per_gpu)`` for each job on the GPU.
    """

    gpu_key: str
    gpu_name: str
    times_s: list[float]
    mean_w: list[float]
    jobs: list[tuple[int, str, float, float, float | None]]


def timeline(store: Store, report: Report, *, max_points: int = 600) -> list[GpuTimeline]:
    """Power over time of every GPU in the report, with its jobs' spans and budgets."""
    multi_host = len({g.host for g in report.gpus.values()}) > 1
    out = []
    for gpu in sorted(report.gpus.values(), key=lambda g: (g.host, g.index)):
        series = store.power_series(
            gpu.id, report.summary.since, report.summary.until, max_points=max_points
        )
        jobs = [
            (
                s.job_id,
                report.jobs[s.job_id].name if s.job_id in report.jobs else str(s.job_id),
                s.start_s,
                s.end_s,
                report.jobs[s.job_id].watts_per_gpu if s.job_id in report.jobs else None,
            )
            for s in report.spans
            if s.gpu_id == gpu.id and s.job_id in report.jobs
        ]
        out.append(
            GpuTimeline(
                _gpu_key(gpu, multi_host),
                gpu.name,
                [us_to_s(to_epoch_us(p.start)) for p in series],
                [mw_to_w(p.mean_power_mw) for p in series],
                jobs,
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class JobLife:
    """A job's energy and work between its progress reports (the points its controllers visited).

    Attributes:
        job_id / name: The job.
        times_s: Window ends, s since the epoch.
        power_w: Mean power of the job's GPUs together over each window, W.
        tokens_per_s: Throughput over each window.
        j_per_token: Energy per token over each window; ``cum_j_per_token``: since the start.
    """

    job_id: int
    name: str
    times_s: list[float]
    power_w: list[float]
    tokens_per_s: list[float]
    j_per_token: list[float | None]
    cum_j_per_token: list[float | None]


def job_life(
    store: Store, report: Report, *, max_jobs: int = 6, max_points: int = 60
) -> list[JobLife]:
    """Per-window power, throughput and J/token of the report's biggest jobs.

    Windows run between progress reports (thinned to at most ``max_points``) within the job's
    span in the report; the energy is that of the job's GPUs over each window (all of it: on a
    GPU shared with another job the window's power includes the other job's).
    """
    energy_by_job: dict[int, float] = {}
    for row in report.rows:
        if "job_id" in row.extra:
            energy_by_job[int(row.extra["job_id"])] = row.energy_j
    top = sorted(energy_by_job, key=lambda j: -energy_by_job[j])[:max_jobs]
    out = []
    for job_id in sorted(top):
        job = report.jobs[job_id]
        spans = [s for s in report.spans if s.job_id == job_id]
        if not spans:
            continue
        lo = min(s.start_s for s in spans)
        hi = max(s.end_s for s in spans)
        reports = [
            p for p in jobrows.progress(store, job_id)
            if lo <= us_to_s(to_epoch_us(p.at)) <= hi and p.tokens is not None
        ]
        latest_at = {p.at: p for p in reports}  # one report per instant: the last one
        reports = list(latest_at.values())
        if len(reports) < 2:
            continue
        share = report.work_share.get(job_id, 1.0)  # a run's tokens on the report's node
        step = max(1, math.ceil(len(reports) / max_points))
        kept = reports[::step]
        if kept[-1] is not reports[-1]:
            kept.append(reports[-1])
        ts = [us_to_s(to_epoch_us(p.at)) for p in kept]
        bps = [from_epoch_us(round(s_to_us(t))) for t in ts]
        energies = store.segment_energy({g: bps for g in job.gpu_ids if g in report.gpus})
        n = len(kept) - 1
        window_j = [mj_to_j(sum(segs[k].energy_mj for segs in energies.values())) for k in range(n)]
        life = JobLife(job_id, job.name, [], [], [], [], [])
        cum_j = 0.0
        cum_tokens = 0
        for k in range(n):
            dt = ts[k + 1] - ts[k]
            d_tokens = round(((kept[k + 1].tokens or 0) - (kept[k].tokens or 0)) * share)
            if dt <= 0 or d_tokens < 0:
                continue
            cum_j += window_j[k]
            cum_tokens += d_tokens
            life.times_s.append(ts[k + 1])
            life.power_w.append(window_j[k] / dt)
            life.tokens_per_s.append(d_tokens / dt)
            life.j_per_token.append(per_unit(window_j[k], d_tokens))
            life.cum_j_per_token.append(per_unit(cum_j, cum_tokens))
        out.append(life)
    return out
