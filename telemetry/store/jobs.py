"""The job repository: jobs, their GPUs, state changes and progress, as frozen dataclasses.

Every state change goes through ``JobStore.transition``, which checks it against
``scheduler.jobs.TRANSITIONS`` and writes the job and its event row in one transaction. Values are
validated before they reach the store (the API's pydantic models); the store enforces structure:
known columns, a legal transition, aware timestamps.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from enum import Enum
from itertools import pairwise
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, Row, delete, select, update
from sqlalchemy.exc import SQLAlchemyError

from energy.counters import EnergyMethod, EnergyResult
from scheduler.jobs import JobState, Mode, OnExceed, can_transition
from telemetry.store.errors import StoreError
from telemetry.store.models import (
    control_decisions_table,
    job_events_table,
    job_gpus_table,
    job_progress_table,
    jobs_table,
    optimizer_probes_table,
    optimizer_searches_table,
    to_epoch_us,
)

GpuEnergy = Callable[[int, datetime, datetime | None], EnergyResult]
"""``(gpu_id, since, until) -> EnergyResult``: ``Store.span_energy``."""


class JobNotFoundError(StoreError, LookupError):
    """No job has the given id."""


class InvalidTransitionError(StoreError, ValueError):
    """A state change the job state machine does not allow (nothing was written)."""


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
    """

    setting: int
    steps: int
    time_s: float
    energy_j: float

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
        knob: ``power_limit`` (settings in mW) or ``sm_clock`` (MHz).
        setting / top_setting: The choice, and the highest setting of the search (the job's
            default, or its wattage budget when that is lower).
        feasible / reason / revisions: As ``energy.optimizer.SearchResult``.
        profiling_steps / profiling_time_s / profiling_energy_j: What profiling cost the job.
        probes: What each setting measured, highest setting first.
    """

    job_id: int
    number: int
    at: datetime
    objective: str
    knob: str
    setting: int
    top_setting: int
    feasible: bool
    reason: str
    revisions: int
    profiling_steps: int
    profiling_time_s: float
    profiling_energy_j: float
    probes: tuple[ProbeRecord, ...]

    def probe(self, setting: int) -> ProbeRecord | None:
        """What ``setting`` measured, if it was probed."""
        return next((p for p in self.probes if p.setting == setting), None)


class Throughput(NamedTuple):
    """Rates over a window of progress reports; ``None`` where the field was not reported."""

    steps_per_s: float | None
    samples_per_s: float | None
    tokens_per_s: float | None


# Columns set_fields / transition may change; id, state and submitted_at are the store's own.
_SETTABLE = frozenset(c.name for c in jobs_table.columns) - {"id", "state", "submitted_at"}
_JOB_COLUMNS = tuple(c.name for c in jobs_table.columns)


def _stored(value: Any) -> Any:
    """A Python value in its stored form (enums as their values, tuples as JSON lists)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _check_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(values) - _SETTABLE
    if unknown:
        raise TypeError(
            f"not settable job fields: {sorted(unknown)} (state changes go through transition)"
        )
    for name, value in values.items():
        if isinstance(value, datetime):
            to_epoch_us(value)  # ValueError for a naive time, before anything is written
        elif name in ("mode", "mode_effective") and value is not None:
            Mode(value)
        elif name == "on_exceed":
            OnExceed(value)
    return {name: _stored(value) for name, value in values.items()}


def _combine_energy(results: Sequence[EnergyResult]) -> EnergyResult:
    if not results:
        return EnergyResult(energy_mj=0.0, method="none", duration_s=0.0, n_samples=0)
    methods = {r.method for r in results} - {"none"}
    method: EnergyMethod
    if not methods:
        method = "none"
    elif len(methods) == 1:
        method = next(iter(methods))
    else:
        method = "mixed"
    return EnergyResult(
        energy_mj=sum(r.energy_mj for r in results),
        method=method,
        duration_s=max(r.duration_s for r in results),
        n_samples=sum(r.n_samples for r in results),
        counter_resets=sum(r.counter_resets for r in results),
        gaps=sum(r.gaps for r in results),
        unknown_s=sum(r.unknown_s for r in results),
    )


def _rate(pairs: Sequence[tuple[datetime, int | None]]) -> float | None:
    """Per-second rate of a cumulative counter: the sum of its non-negative deltas over the span.

    A total that goes backwards (the client restarted from a checkpoint) starts a new segment
    rather than counting as negative progress.
    """
    points = [(at, v) for at, v in pairs if v is not None]
    if len(points) < 2:
        return None
    span_s = (points[-1][0] - points[0][0]).total_seconds()
    if span_s <= 0:
        return None
    gained = sum(max(0, b[1] - a[1]) for a, b in pairwise(points))
    return gained / span_s


class JobStore:
    """Jobs in the SQL store. Obtain it as ``Store.jobs``; it shares the store's engine."""

    def __init__(self, engine: Engine, *, gpu_energy: GpuEnergy | None = None) -> None:
        """Wrap an engine whose database is at the latest schema.

        Args:
            engine: The store's engine.
            gpu_energy: ``Store.span_energy`` of the same store, for ``energy``; if omitted, a
                ``Store`` over ``engine`` is made when first needed.
        """
        self._engine = engine
        self._gpu_energy = gpu_energy
        self._is_sqlite = engine.dialect.name == "sqlite"

    def _write(self) -> Any:
        """A write transaction (on SQLite, one that takes the write lock at ``BEGIN``)."""
        if self._is_sqlite:
            return self._engine.execution_options(sqlite_immediate=True).begin()
        return self._engine.begin()

    @staticmethod
    def _wrap(what: str, exc: SQLAlchemyError) -> StoreError:
        from telemetry.store.repository import _write_error

        return _write_error(what, exc)

    # -- reading rows ----------------------------------------------------------------------------

    @staticmethod
    def _gpus_of(conn: Connection, job_ids: Iterable[int]) -> dict[int, list[tuple[int, int]]]:
        ids = list(job_ids)
        out: dict[int, list[tuple[int, int]]] = {job_id: [] for job_id in ids}
        if not ids:
            return out
        c = job_gpus_table.c
        rows = conn.execute(
            select(c.job_id, c.gpu_index, c.gpu_id)
            .where(c.job_id.in_(ids))
            .order_by(c.job_id, c.gpu_index)
        )
        for job_id, gpu_index, gpu_id in rows:
            out[job_id].append((gpu_index, gpu_id))
        return out

    @staticmethod
    def _record(row: Row[Any], gpus: Sequence[tuple[int, int]]) -> JobRecord:
        m = row._mapping
        requested = m["gpu_ids_requested"]
        return JobRecord(
            id=m["id"],
            name=m["name"],
            user=m["user"],
            uid=m["uid"],
            gid=m["gid"],
            argv=tuple(m["argv"] or ()),
            cwd=m["cwd"],
            env=dict(m["env"] or {}),
            gpu_count=m["gpu_count"],
            gpu_ids_requested=None if requested is None else tuple(int(i) for i in requested),
            watts_per_gpu=None if m["watts_per_gpu"] is None else float(m["watts_per_gpu"]),
            energy_budget_wh=(
                None if m["energy_budget_wh"] is None else float(m["energy_budget_wh"])
            ),
            mode=Mode(m["mode"]),
            mode_effective=None if m["mode_effective"] is None else Mode(m["mode_effective"]),
            mode_reason=m["mode_reason"],
            on_exceed=OnExceed(m["on_exceed"]),
            priority=m["priority"],
            objective=m["objective"],
            total_steps=m["total_steps"],
            total_tokens=m["total_tokens"],
            state=JobState(m["state"]),
            attached=bool(m["attached"]),
            host=m["host"],
            pid=m["pid"],
            pid_create_time=(None if m["pid_create_time"] is None else float(m["pid_create_time"])),
            submitted_at=m["submitted_at"],
            started_at=m["started_at"],
            ended_at=m["ended_at"],
            exit_code=m["exit_code"],
            end_reason=m["end_reason"],
            gpus=tuple(index for index, _ in gpus),
            gpu_ids=tuple(gpu_id for _, gpu_id in gpus),
            deadline_at=m["deadline_at"],
        )

    def _get(self, conn: Connection, job_id: int) -> JobRecord | None:
        row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
        if row is None:
            return None
        return self._record(row, self._gpus_of(conn, [job_id])[job_id])

    def _require(self, conn: Connection, job_id: int) -> JobRecord:
        job = self._get(conn, job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id}")
        return job

    # -- jobs ------------------------------------------------------------------------------------

    def create(self, new: NewJob, *, at: datetime) -> JobRecord:
        """Store a new job in state ``queued``, with its first event.

        The event's reason is ``submitted``, or ``attached`` for an attached job.

        Args:
            new: The job.
            at: Submission time (aware UTC).

        Returns:
            The stored job.

        Raises:
            ValueError: ``at`` is naive, or both ``gpu_count`` and ``gpu_ids_requested`` are set.
            StoreWriteError: Nothing was written.
        """
        to_epoch_us(at)
        if new.gpu_count is not None and new.gpu_ids_requested is not None:
            raise ValueError("a job asks for a GPU count or for GPU ids, not both")
        values = {f.name: _stored(getattr(new, f.name)) for f in fields(NewJob)}
        values.update(state=JobState.QUEUED.value, submitted_at=at)
        reason = "attached" if new.attached else "submitted"
        try:
            with self._write() as conn:
                result = conn.execute(jobs_table.insert().values(**values))
                job_id = int(result.inserted_primary_key[0])
                conn.execute(
                    job_events_table.insert().values(
                        job_id=job_id,
                        at=at,
                        from_state=None,
                        to_state=JobState.QUEUED.value,
                        reason=reason,
                    )
                )
                return self._require(conn, job_id)
        except SQLAlchemyError as exc:
            raise self._wrap(f"creating job {new.name!r}", exc) from exc

    def get(self, job_id: int) -> JobRecord | None:
        """The job with id ``job_id``, or ``None``."""
        with self._engine.connect() as conn:
            return self._get(conn, job_id)

    def list(
        self,
        *,
        states: Iterable[JobState | str] | None = None,
        user: str | None = None,
        host: str | None = None,
    ) -> builtins.list[JobRecord]:
        """Jobs in any of ``states``, of ``user``, on ``host`` (each filter if given), by id."""
        c = jobs_table.c
        query = select(jobs_table).order_by(c.id)
        if states is not None:
            query = query.where(c.state.in_([JobState(s).value for s in states]))
        if user is not None:
            query = query.where(c.user == user)
        if host is not None:
            query = query.where(c.host == host)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
            gpus = self._gpus_of(conn, (row.id for row in rows))
        return [self._record(row, gpus[row.id]) for row in rows]

    def transition(
        self,
        job_id: int,
        to: JobState,
        reason: str,
        *,
        at: datetime,
        gpus: Sequence[tuple[int, int]] | None = None,
        **fields: Any,
    ) -> JobRecord:
        """Move a job to state ``to`` and record the event, in one transaction.

        Entering ``running`` for the first time sets ``started_at``; entering a terminal state
        sets ``ended_at`` and, unless given, ``end_reason`` = ``reason``. Explicit ``fields``
        win over both.

        Args:
            job_id: The job.
            to: The new state.
            reason: Why (stored with the event), e.g. ``placed``, ``exited 0``, ``cancelled by
                alice``.
            at: When (aware UTC).
            gpus: ``(gpu_id, gpu_index)`` pairs that replace the job's assigned GPUs.
            **fields: Other columns to set at the same time (``pid``, ``exit_code``, ...).

        Returns:
            The job after the change.

        Raises:
            JobNotFoundError: No such job.
            InvalidTransitionError: The state machine does not allow the change.
            TypeError: A field is not a settable column.
            ValueError: ``at`` or a time field is naive, or an enum field has an unknown value.
            StoreWriteError: Nothing was written.
        """
        to = JobState(to)
        to_epoch_us(at)
        values = _check_fields(fields)
        try:
            with self._write() as conn:
                query = select(jobs_table.c.state, jobs_table.c.started_at).where(
                    jobs_table.c.id == job_id
                )
                if not self._is_sqlite:
                    query = query.with_for_update()
                row = conn.execute(query).first()
                if row is None:
                    raise JobNotFoundError(f"no job {job_id}")
                current = JobState(row.state)
                if not can_transition(current, to):
                    raise InvalidTransitionError(
                        f"job {job_id} cannot go from {current} to {to} ({reason})"
                    )
                auto: dict[str, Any] = {"state": to.value}
                if to is JobState.RUNNING and row.started_at is None:
                    auto["started_at"] = at
                if to.terminal:
                    auto["ended_at"] = at
                    auto["end_reason"] = reason
                auto.update(values)
                conn.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(**auto))
                if gpus is not None:
                    conn.execute(delete(job_gpus_table).where(job_gpus_table.c.job_id == job_id))
                    if gpus:
                        conn.execute(
                            job_gpus_table.insert(),
                            [
                                {"job_id": job_id, "gpu_id": gpu_id, "gpu_index": index}
                                for gpu_id, index in gpus
                            ],
                        )
                conn.execute(
                    job_events_table.insert().values(
                        job_id=job_id,
                        at=at,
                        from_state=current.value,
                        to_state=to.value,
                        reason=reason,
                    )
                )
                return self._require(conn, job_id)
        except SQLAlchemyError as exc:
            raise self._wrap(f"moving job {job_id} to {to}", exc) from exc

    def set_fields(self, job_id: int, **fields: Any) -> JobRecord:
        """Change columns of a job other than its state (budgets, ``mode_effective``, pid, ...).

        Raises:
            JobNotFoundError: No such job.
            TypeError: A field is not a settable column (``state`` needs ``transition``).
            ValueError: A time field is naive, or an enum field has an unknown value.
            StoreWriteError: Nothing was written.
        """
        values = _check_fields(fields)
        try:
            with self._write() as conn:
                if values:
                    result = conn.execute(
                        update(jobs_table).where(jobs_table.c.id == job_id).values(**values)
                    )
                    if result.rowcount == 0:
                        raise JobNotFoundError(f"no job {job_id}")
                return self._require(conn, job_id)
        except SQLAlchemyError as exc:
            raise self._wrap(f"updating job {job_id}", exc) from exc

    def events(self, job_id: int) -> builtins.list[JobEvent]:
        """A job's state changes, oldest first (the first is its creation)."""
        c = job_events_table.c
        query = (
            select(c.job_id, c.at, c.from_state, c.to_state, c.reason)
            .where(c.job_id == job_id)
            .order_by(c.at, c.id)
        )
        with self._engine.connect() as conn:
            return [
                JobEvent(
                    job_id=r.job_id,
                    at=r.at,
                    from_state=None if r.from_state is None else JobState(r.from_state),
                    to_state=JobState(r.to_state),
                    reason=r.reason,
                )
                for r in conn.execute(query)
            ]

    # -- progress --------------------------------------------------------------------------------

    def add_progress(
        self,
        job_id: int,
        *,
        at: datetime,
        steps: int | None,
        samples: int | None,
        tokens: int | None,
    ) -> None:
        """Store one progress report: cumulative totals since the job began (``None``: unknown).

        Raises:
            ValueError: ``at`` is naive.
            StoreWriteError: Nothing was written (also when the job does not exist).
        """
        to_epoch_us(at)
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    job_progress_table.insert().values(
                        job_id=job_id, at=at, steps=steps, samples=samples, tokens=tokens
                    )
                )
        except SQLAlchemyError as exc:
            raise self._wrap(f"adding progress of job {job_id}", exc) from exc

    def progress(self, job_id: int, since: datetime | None = None) -> builtins.list[ProgressRecord]:
        """A job's progress reports with ``at >= since``, oldest first."""
        c = job_progress_table.c
        query = select(c.job_id, c.at, c.steps, c.samples, c.tokens).where(c.job_id == job_id)
        if since is not None:
            query = query.where(c.at >= since)
        with self._engine.connect() as conn:
            return [ProgressRecord(*row) for row in conn.execute(query.order_by(c.at, c.id))]

    def latest_progress(self, job_id: int) -> ProgressRecord | None:
        """A job's latest progress report, or ``None``."""
        c = job_progress_table.c
        query = (
            select(c.job_id, c.at, c.steps, c.samples, c.tokens)
            .where(c.job_id == job_id)
            .order_by(c.at.desc(), c.id.desc())
            .limit(1)
        )
        with self._engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else ProgressRecord(*row)

    def throughput(
        self, job_id: int, window_s: float = 30.0, *, now: datetime | None = None
    ) -> Throughput | None:
        """Rates over the last ``window_s`` seconds of progress reports.

        The window ends at ``now`` if given (a stalled job then has no rate), else at the latest
        report. A cumulative total that goes backwards (restart from a checkpoint) starts a new
        segment; only forward progress counts.

        Args:
            job_id: The job.
            window_s: Window length, s.
            now: End of the window (aware UTC); the latest report if omitted.

        Returns:
            Steps, samples and tokens per second, or ``None`` with fewer than two reports in the
            window.
        """
        if now is None:
            latest = self.latest_progress(job_id)
            if latest is None:
                return None
            end = latest.at
        else:
            end = now
        start = end - timedelta(seconds=window_s)
        rows = [r for r in self.progress(job_id, since=start) if r.at <= end]
        if len(rows) < 2:
            return None
        return Throughput(
            steps_per_s=_rate([(r.at, r.steps) for r in rows]),
            samples_per_s=_rate([(r.at, r.samples) for r in rows]),
            tokens_per_s=_rate([(r.at, r.tokens) for r in rows]),
        )

    # -- energy ----------------------------------------------------------------------------------

    def energy(self, job_id: int, *, until: datetime | None = None) -> EnergyResult:
        """Energy of the job's GPUs from ``started_at`` to ``ended_at`` (or ``until``, if earlier).

        The sum over the job's GPUs of ``Store.span_energy`` over ``[started_at, end)``: counter
        deltas where the counter is continuous, from raw samples while they are kept and the job
        spans at most six hours, else from the rollups (so a job's energy outlives its raw
        samples' retention). A job still running with no ``until`` counts up to its GPUs' latest
        samples. The whole GPU's energy counts (a GPU runs one job at a time). ``duration_s`` is
        the longest GPU's span.

        Raises:
            JobNotFoundError: No such job.
        """
        job = self.get(job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id}")
        if job.started_at is None:
            return _combine_energy([])
        end = job.ended_at
        if until is not None and (end is None or until < end):
            end = until
        gpu_energy = self._gpu_energy
        if gpu_energy is None:
            from telemetry.store.repository import Store

            gpu_energy = self._gpu_energy = Store(self._engine).span_energy
        return _combine_energy([gpu_energy(g, job.started_at, end) for g in job.gpu_ids])

    # -- control decisions -----------------------------------------------------------------------

    def add_decision(
        self,
        job_id: int,
        *,
        at: datetime,
        source: str,
        what: str,
        why: str,
        power_before_w: float | None,
        steps_per_s_before: float | None,
    ) -> int:
        """Store a control decision; returns its id (for ``complete_decision``).

        Raises:
            StoreWriteError: Nothing was written.
        """
        try:
            with self._engine.begin() as conn:
                result = conn.execute(
                    control_decisions_table.insert().values(
                        job_id=job_id, at=at, source=source, what=what, why=why,
                        power_before_w=power_before_w, steps_per_s_before=steps_per_s_before,
                    )
                )
                key = result.inserted_primary_key
        except SQLAlchemyError as exc:
            raise self._wrap(f"storing a decision for job {job_id}", exc) from exc
        assert key is not None
        return int(key[0])

    def complete_decision(
        self, decision_id: int, *, power_after_w: float | None, steps_per_s_after: float | None
    ) -> None:
        """Record the power and throughput once a decision's change has settled."""
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    update(control_decisions_table)
                    .where(control_decisions_table.c.id == decision_id)
                    .values(power_after_w=power_after_w, steps_per_s_after=steps_per_s_after)
                )
        except SQLAlchemyError as exc:
            raise self._wrap(f"completing decision {decision_id}", exc) from exc

    def save_search(self, search: SearchRecord) -> None:
        """Store an optimiser search, replacing what was stored for the same job and number.

        Raises:
            StoreWriteError: Nothing was written (the previous version stays).
        """
        s = optimizer_searches_table.c
        values = {
            "at": search.at, "objective": search.objective, "knob": search.knob,
            "setting": search.setting, "top_setting": search.top_setting,
            "feasible": search.feasible, "reason": search.reason, "revisions": search.revisions,
            "profiling_steps": search.profiling_steps,
            "profiling_time_s": search.profiling_time_s,
            "profiling_energy_j": search.profiling_energy_j,
        }
        try:
            with self._engine.begin() as conn:
                search_id = conn.execute(
                    select(s.id).where(s.job_id == search.job_id, s.number == search.number)
                ).scalar()
                if search_id is None:
                    result = conn.execute(optimizer_searches_table.insert().values(
                        job_id=search.job_id, number=search.number, **values))
                    key = result.inserted_primary_key
                    assert key is not None
                    search_id = int(key[0])
                else:
                    conn.execute(update(optimizer_searches_table)
                                 .where(s.id == search_id).values(**values))
                    conn.execute(delete(optimizer_probes_table)
                                 .where(optimizer_probes_table.c.search_id == search_id))
                if search.probes:
                    conn.execute(optimizer_probes_table.insert(), [
                        {"search_id": search_id, "setting": p.setting, "steps": p.steps,
                         "time_s": p.time_s, "energy_j": p.energy_j}
                        for p in search.probes
                    ])
        except SQLAlchemyError as exc:
            raise self._wrap(f"storing optimiser search {search.number} of job "
                             f"{search.job_id}", exc) from exc

    def searches(self, job_ids: Iterable[int]) -> dict[int, builtins.list[SearchRecord]]:
        """The optimiser searches of these jobs, by job id, oldest first."""
        ids = sorted(set(job_ids))
        if not ids:
            return {}
        s, p = optimizer_searches_table.c, optimizer_probes_table.c
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(optimizer_searches_table).where(s.job_id.in_(ids))
                .order_by(s.job_id, s.number)
            ).mappings().all()
            probes: dict[int, builtins.list[ProbeRecord]] = {}
            if rows:
                for r in conn.execute(
                    select(p.search_id, p.setting, p.steps, p.time_s, p.energy_j)
                    .where(p.search_id.in_([row["id"] for row in rows]))
                    .order_by(p.search_id, p.setting.desc())
                ):
                    probes.setdefault(r.search_id, []).append(
                        ProbeRecord(r.setting, r.steps, r.time_s, r.energy_j))
        out: dict[int, builtins.list[SearchRecord]] = {}
        for row in rows:
            out.setdefault(row["job_id"], []).append(SearchRecord(
                job_id=row["job_id"], number=row["number"], at=row["at"],
                objective=row["objective"], knob=row["knob"], setting=row["setting"],
                top_setting=row["top_setting"], feasible=row["feasible"], reason=row["reason"],
                revisions=row["revisions"], profiling_steps=row["profiling_steps"],
                profiling_time_s=row["profiling_time_s"],
                profiling_energy_j=row["profiling_energy_j"],
                probes=tuple(probes.get(row["id"], ())),
            ))
        return out

    def decisions(self, job_id: int) -> builtins.list[DecisionRecord]:
        """A job's control decisions, oldest first."""
        c = control_decisions_table.c
        query = select(control_decisions_table).where(c.job_id == job_id).order_by(c.at, c.id)
        with self._engine.connect() as conn:
            return [DecisionRecord(*row) for row in conn.execute(query)]
