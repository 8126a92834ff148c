"""Read-only queries on the job tables for reports: jobs and their GPUs, progress, members,
searches.

The schema is telemetry's (``telemetry.store.models``); the rows are the scheduler's, and reports
read them here as plain data (states as strings) without importing the scheduler. Nothing here
writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from energy.optimizer import Knob
from telemetry.store import Store
from telemetry.store.models import (
    job_gpus_table,
    job_members_table,
    job_progress_table,
    jobs_table,
    optimizer_probes_table,
    optimizer_searches_table,
    to_epoch_us,
)
from telemetry.store.sql import VALUES_CHUNK, values_sql


@dataclass(frozen=True, slots=True)
class JobRow:
    """A job as reports show it.

    Attributes:
        id / name / user / argv: The job and its command.
        state: Its state's name (``running``, ``completed``, ...).
        gpus / gpu_ids: Its GPUs' indices, ascending, and their store ids in the same order.
        watts_per_gpu / energy_budget_wh: Its budgets (W per GPU, Wh), or ``None``.
        started_at / ended_at: Aware UTC; ``None``: not started, or still running.
    """

    id: int
    name: str
    user: str
    argv: tuple[str, ...]
    state: str
    gpus: tuple[int, ...]
    gpu_ids: tuple[int, ...]
    watts_per_gpu: float | None
    energy_budget_wh: float | None
    started_at: datetime | None
    ended_at: datetime | None


@dataclass(frozen=True, slots=True)
class ProgressRow:
    """Cumulative totals a job's client reported at ``at`` (``None``: not reported)."""

    at: datetime
    steps: int | None
    samples: int | None
    tokens: int | None


@dataclass(frozen=True, slots=True)
class ProgressAt:
    """A job's cumulative progress at a time: its latest report at or before it (``None``s:
    no report yet)."""

    steps: int | None
    samples: int | None
    tokens: int | None


@dataclass(frozen=True, slots=True)
class MemberRow:
    """A process of a job (a rank of a distributed run) as reports show it.

    Attributes:
        job_id / host: The job, and the member's node.
        rank / local_rank / world_size / generation: Its place in the run.
        gpus: The GPU indices on ``host`` it used.
        state: ``running``, ``completed``, ``failed`` or ``stopped``.
        steps / samples / tokens: Its own cumulative totals.
        step_time_s / steps_per_s: Its recent step time and rate while it ran (for an ended
            member, the last known); ``None``: not reported.
        joined_at / ended_at: Aware UTC; ``ended_at`` ``None``: still running.
    """

    job_id: int
    host: str
    rank: int
    local_rank: int
    world_size: int
    generation: int
    gpus: tuple[int, ...]
    state: str
    steps: int
    samples: int
    tokens: int
    step_time_s: float | None
    steps_per_s: float | None
    joined_at: datetime
    ended_at: datetime | None


@dataclass(frozen=True, slots=True)
class ProbeRow:
    """What one setting measured in an optimiser search.

    Attributes:
        setting: mW for a power limit, MHz for a locked clock.
        steps / time_s / energy_j: Steps measured, their wall time (s) and energy (J).
        micro_batch: The micro-batch it ran at, in a joint search (None: the job's own).
    """

    setting: int
    steps: int
    time_s: float
    energy_j: float
    micro_batch: int | None = None

    @property
    def energy_per_step_j(self) -> float:
        return self.energy_j / self.steps

    @property
    def power_w(self) -> float:
        return self.energy_j / self.time_s if self.time_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class SearchRow:
    """A stored search of the energy optimiser for a job.

    Attributes:
        job_id / number: The job, and which of its searches (1 first, 2 after a re-tune, ...).
        at: When it was last updated.
        objective: ``energy``, ``cost``, ``throughput`` or ``slowdown``.
        knob: ``power_limit`` (settings in mW) or ``sm_clocks`` (MHz); searches stored as
            ``sm_clock`` read as ``sm_clocks``.
        setting / top_setting: The choice, and the highest setting of the search.
        feasible / reason / revisions: Whether a setting met the constraints, why it chose,
            how often it revised the choice.
        profiling_steps / profiling_time_s / profiling_energy_j: What profiling cost the job.
        probes: What each setting measured, highest setting first (in a joint search, each
            at its micro-batch).
        micro_batch / default_micro_batch: A joint search's chosen micro-batch and the job's
            own; None for a search of the setting alone.
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
    probes: tuple[ProbeRow, ...]
    micro_batch: int | None = None
    default_micro_batch: int | None = None

    def probe(self, setting: int, micro_batch: int | None = None) -> ProbeRow | None:
        """What ``setting`` measured at ``micro_batch`` (None: the job's own in a search of the
        setting alone), if it was probed."""
        return next((p for p in self.probes
                     if p.setting == setting and p.micro_batch == micro_batch), None)


def _job_rows(conn: Connection, rows: Sequence[Any]) -> list[JobRow]:
    ids = [row.id for row in rows]
    gpus: dict[int, list[tuple[int, int]]] = {job_id: [] for job_id in ids}
    if ids:
        c = job_gpus_table.c
        for job_id, gpu_index, gpu_id in conn.execute(
            select(c.job_id, c.gpu_index, c.gpu_id)
            .where(c.job_id.in_(ids))
            .order_by(c.job_id, c.gpu_index)
        ):
            gpus[job_id].append((gpu_index, gpu_id))
    return [
        JobRow(
            id=row.id,
            name=row.name,
            user=row.user,
            argv=tuple(row.argv or ()),
            state=row.state,
            gpus=tuple(index for index, _ in gpus[row.id]),
            gpu_ids=tuple(gpu_id for _, gpu_id in gpus[row.id]),
            watts_per_gpu=None if row.watts_per_gpu is None else float(row.watts_per_gpu),
            energy_budget_wh=(
                None if row.energy_budget_wh is None else float(row.energy_budget_wh)
            ),
            started_at=row.started_at,
            ended_at=row.ended_at,
        )
        for row in rows
    ]


_JOB_COLUMNS = tuple(
    jobs_table.c[name]
    for name in ("id", "name", "user", "argv", "state", "watts_per_gpu", "energy_budget_wh",
                 "started_at", "ended_at")
)


def jobs(store: Store, *, started: bool = False) -> list[JobRow]:
    """Every job in the store (only those that started, with ``started``), by id."""
    query = select(*_JOB_COLUMNS).order_by(jobs_table.c.id)
    if started:
        query = query.where(jobs_table.c.started_at.is_not(None))
    with store.engine.connect() as conn:
        return _job_rows(conn, conn.execute(query).all())


def job(store: Store, job_id: int) -> JobRow | None:
    """The job with id ``job_id``, or ``None``."""
    query = select(*_JOB_COLUMNS).where(jobs_table.c.id == job_id)
    with store.engine.connect() as conn:
        found = _job_rows(conn, conn.execute(query).all())
    return found[0] if found else None


def progress(store: Store, job_id: int) -> list[ProgressRow]:
    """A job's progress reports, oldest first."""
    c = job_progress_table.c
    query = (
        select(c.at, c.steps, c.samples, c.tokens)
        .where(c.job_id == job_id)
        .order_by(c.at, c.id)
    )
    with store.engine.connect() as conn:
        return [ProgressRow(*row) for row in conn.execute(query)]


def progress_at(store: Store, queries: Sequence[tuple[int, datetime]]) -> list[ProgressAt]:
    """Cumulative progress of jobs at given times, in a few queries.

    Args:
        store: The store.
        queries: ``(job_id, at)`` pairs (aware UTC).

    Returns:
        For each pair, the job's latest report with ``at <= t`` (``None`` fields: none yet).
    """
    return progress_at_us(store, [(job_id, to_epoch_us(t)) for job_id, t in queries])


def progress_at_us(store: Store, queries: Sequence[tuple[int, int]]) -> list[ProgressAt]:
    """``progress_at`` with times as epoch microseconds."""
    out: list[ProgressAt] = [ProgressAt(None, None, None)] * len(queries)
    rows = [(i, job_id, t_us) for i, (job_id, t_us) in enumerate(queries)]
    with store.engine.connect() as conn:
        for chunk_start in range(0, len(rows), VALUES_CHUNK):
            chunk = rows[chunk_start : chunk_start + VALUES_CHUNK]
            # the pairs inlined as one VALUES list, each answered by one probe of the
            # (job_id, at) index
            sql = (
                f"WITH q(id, job_id, t) AS (VALUES {values_sql(chunk)}) "
                "SELECT q.id, pr.steps, pr.samples, pr.tokens FROM q "
                "JOIN job_progress pr ON pr.id = ("
                "SELECT x.id FROM job_progress x WHERE x.job_id = q.job_id AND x.at <= q.t "
                "ORDER BY x.at DESC, x.id DESC LIMIT 1)"
            )
            for i, steps, samples, tokens in conn.exec_driver_sql(sql).all():
                out[int(i)] = ProgressAt(steps, samples, tokens)
    return out


def members(store: Store, job_ids: Iterable[int]) -> dict[int, list[MemberRow]]:
    """The members of these jobs (all generations), by job id, in generation then rank order
    (jobs without members are left out)."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    c = job_members_table.c
    query = (
        select(c.job_id, c.host, c.rank, c.local_rank, c.world_size, c.generation, c.gpus,
               c.state, c.steps, c.samples, c.tokens, c.step_time_s, c.steps_per_s,
               c.joined_at, c.ended_at)
        .where(c.job_id.in_(ids))
        .order_by(c.job_id, c.generation, c.rank)
    )
    out: dict[int, list[MemberRow]] = {}
    with store.engine.connect() as conn:
        for r in conn.execute(query):
            out.setdefault(r.job_id, []).append(MemberRow(
                job_id=r.job_id, host=r.host, rank=r.rank, local_rank=r.local_rank,
                world_size=r.world_size, generation=r.generation, gpus=tuple(r.gpus or ()),
                state=r.state, steps=r.steps, samples=r.samples, tokens=r.tokens,
                step_time_s=r.step_time_s, steps_per_s=r.steps_per_s, joined_at=r.joined_at,
                ended_at=r.ended_at,
            ))
    return out


def searches(store: Store, job_ids: Iterable[int]) -> dict[int, list[SearchRow]]:
    """The optimiser searches of these jobs, by job id, oldest first."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    s, p = optimizer_searches_table.c, optimizer_probes_table.c
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(optimizer_searches_table).where(s.job_id.in_(ids)).order_by(s.job_id, s.number)
        ).mappings().all()
        probes: dict[int, list[ProbeRow]] = {}
        if rows:
            for r in conn.execute(
                select(p.search_id, p.setting, p.steps, p.time_s, p.energy_j, p.micro_batch)
                .where(p.search_id.in_([row["id"] for row in rows]))
                .order_by(p.search_id, p.setting.desc(), p.micro_batch.desc())
            ):
                probes.setdefault(r.search_id, []).append(
                    ProbeRow(r.setting, r.steps, r.time_s, r.energy_j, r.micro_batch))
    out: dict[int, list[SearchRow]] = {}
    for row in rows:
        out.setdefault(row["job_id"], []).append(SearchRow(
            job_id=row["job_id"], number=row["number"], at=row["at"],
            objective=row["objective"], knob=Knob(row["knob"]), setting=row["setting"],
            top_setting=row["top_setting"], feasible=row["feasible"], reason=row["reason"],
            revisions=row["revisions"], profiling_steps=row["profiling_steps"],
            profiling_time_s=row["profiling_time_s"],
            profiling_energy_j=row["profiling_energy_j"],
            probes=tuple(probes.get(row["id"], ())),
            micro_batch=row["micro_batch"], default_micro_batch=row["default_micro_batch"],
        ))
    return out
