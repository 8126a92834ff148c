"""Jobs in the store: creation, state changes with their events, fields, progress, energy.

Every state change goes through ``JobStore.transition``, which checks it against
``scheduler.jobs.TRANSITIONS`` and writes the job and its event row in one transaction. Values are
validated before they reach the store (the API's pydantic models); the store enforces structure:
known columns, a legal transition, aware timestamps. A job's energy is its GPUs' energy over its
span, read from the telemetry ``Store``.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from datetime import datetime, timedelta
from enum import Enum
from itertools import pairwise
from typing import Any, TypeVar

from sqlalchemy import Connection, Row, delete, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from energy.counters import EnergyResult, combine_methods
from energy.optimizer import Knob
from scheduler.jobs import Hold, JobState, MemberState, Mode, OnExceed, can_transition
from scheduler.runs import is_allocation_key
from scheduler.store import members as m
from scheduler.store.history import ControlHistory
from scheduler.store.members import MembershipError
from scheduler.store.records import (
    JobEvent,
    JobRecord,
    MemberRecord,
    NewJob,
    NewMember,
    ProgressRecord,
    RunTotals,
    Throughput,
)
from telemetry.store.errors import StoreError, write_error
from telemetry.store.models import (
    gpus_table,
    job_events_table,
    job_gpus_table,
    job_members_table,
    job_progress_table,
    jobs_table,
    to_epoch_us,
)
from telemetry.store.sql import inserted_id, write_transaction

_T = TypeVar("_T")


class JobNotFoundError(StoreError, LookupError):
    """No job has the given id."""


class InvalidTransitionError(StoreError, ValueError):
    """A state change the job state machine does not allow (nothing was written)."""


# Columns set_fields / transition may change; id, state and submitted_at are the store's own.
_SETTABLE = frozenset(c.name for c in jobs_table.columns) - {"id", "state", "submitted_at"}


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
        elif name == "hold" and value is not None:
            Hold(value)
    return {name: _stored(value) for name, value in values.items()}


def _combine_energy(results: Sequence[EnergyResult]) -> EnergyResult:
    if not results:
        return EnergyResult(energy_mj=0.0, method="none", duration_s=0.0, n_samples=0)
    return EnergyResult(
        energy_mj=sum(r.energy_mj for r in results),
        method=combine_methods(r.method for r in results),
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


def _member_end(state: JobState) -> MemberState:
    """How a member still running ends when its job does: stopped, unless the job completed
    (a rank of a failed run is not the one that failed)."""
    return MemberState.COMPLETED if state is JobState.COMPLETED else MemberState.STOPPED


class JobStore(ControlHistory):
    """Jobs in the store: ``JobStore(store)`` works through the telemetry ``Store``'s engine.

    Also the jobs' control history (``ControlHistory``: decisions, optimiser searches).
    """

    # -- reading rows ----------------------------------------------------------------------------

    @staticmethod
    def _gpus_of(
        conn: Connection, job_ids: Iterable[int]
    ) -> dict[int, list[tuple[int, int, str]]]:
        """``(index, store id, node)`` of each job's GPUs, by node then index."""
        ids = list(job_ids)
        out: dict[int, list[tuple[int, int, str]]] = {job_id: [] for job_id in ids}
        if not ids:
            return out
        c = job_gpus_table.c
        rows = conn.execute(
            select(c.job_id, c.gpu_index, c.gpu_id, gpus_table.c.host)
            .join(gpus_table, gpus_table.c.id == c.gpu_id)
            .where(c.job_id.in_(ids))
            .order_by(c.job_id, gpus_table.c.host, c.gpu_index)
        )
        for job_id, gpu_index, gpu_id, host in rows:
            out[job_id].append((gpu_index, gpu_id, host))
        return out

    @staticmethod
    def _record(row: Row[Any], gpus: Sequence[tuple[int, int, str]]) -> JobRecord:
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
            gpus=tuple(index for index, _, _ in gpus),
            gpu_ids=tuple(gpu_id for _, gpu_id, _ in gpus),
            deadline_at=m["deadline_at"],
            run_key=m["run_key"],
            world_size=m["world_size"],
            generation=m["generation"],
            hold=None if m["hold"] is None else Hold(m["hold"]),
            hold_step=m["hold_step"],
            hold_reason=m["hold_reason"],
            knob=None if m["knob"] is None else Knob(m["knob"]),
            knob_setting=m["knob_setting"],
            gpu_hosts=tuple(host for _, _, host in gpus),
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
        try:
            with write_transaction(self._engine) as conn:
                return self._require(conn, self._insert(conn, new, at, JobState.QUEUED))
        except SQLAlchemyError as exc:
            raise write_error(f"creating job {new.name!r}", exc) from exc

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
        node: str | None = None,
    ) -> builtins.list[JobRecord]:
        """Jobs in any of ``states``, of ``user``, owned by ``host``, and owned by or with a
        running member on ``node`` (each filter if given), by id."""
        c = jobs_table.c
        query = select(jobs_table).order_by(c.id)
        if states is not None:
            query = query.where(c.state.in_([JobState(s).value for s in states]))
        if user is not None:
            query = query.where(c.user == user)
        if host is not None:
            query = query.where(c.host == host)
        if node is not None:
            mc = job_members_table.c
            here = select(mc.job_id).where(
                mc.host == node, mc.state == MemberState.RUNNING.value
            )
            query = query.where(or_(c.host == node, c.id.in_(here)))
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
            with write_transaction(self._engine) as conn:
                query = select(jobs_table.c.state, jobs_table.c.started_at).where(
                    jobs_table.c.id == job_id
                )
                if self._engine.dialect.name != "sqlite":
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
                    self._add_gpus(conn, job_id, gpus)
                if to.terminal:  # its processes are gone, or going: none is running any more
                    conn.execute(
                        update(job_members_table)
                        .where(job_members_table.c.job_id == job_id,
                               job_members_table.c.state == MemberState.RUNNING.value)
                        .values(state=_member_end(to).value, ended_at=at,
                                end_reason=f"job {to}: {reason}")
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
            raise write_error(f"moving job {job_id} to {to}", exc) from exc

    @staticmethod
    def _add_gpus(conn: Connection, job_id: int, gpus: Sequence[tuple[int, int]]) -> None:
        """Add ``(gpu_id, gpu_index)`` pairs to a job's GPUs (those it has already stay)."""
        have = {
            row[0] for row in conn.execute(
                select(job_gpus_table.c.gpu_id).where(job_gpus_table.c.job_id == job_id)
            )
        }
        new = [
            {"job_id": job_id, "gpu_id": gpu_id, "gpu_index": index}
            for gpu_id, index in dict(gpus).items() if gpu_id not in have
        ]
        if new:
            conn.execute(job_gpus_table.insert(), new)

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
            with write_transaction(self._engine) as conn:
                if values:
                    result = conn.execute(
                        update(jobs_table).where(jobs_table.c.id == job_id).values(**values)
                    )
                    if result.rowcount == 0:
                        raise JobNotFoundError(f"no job {job_id}")
                return self._require(conn, job_id)
        except SQLAlchemyError as exc:
            raise write_error(f"updating job {job_id}", exc) from exc

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

    # -- members ---------------------------------------------------------------------------------

    def join_run(
        self, new: NewJob, member: NewMember, *, gpus: Sequence[tuple[int, int]], at: datetime
    ) -> tuple[JobRecord, MemberRecord]:
        """A rank of a run joins the run's live job (``new.run_key``), which it creates if none.

        The job is created ``running`` (as an attached job). Daemons on several nodes may race
        to create it: one live job per run key is the store's rule, and the loser joins the
        winner's job. Rank 0's node owns the job (``host``).

        Args:
            new: The job to create when the run has none (``run_key`` set).
            member: The joining process.
            gpus: ``(gpu_id, gpu_index)`` of the member's GPUs, added to the job's.
            at: When (aware UTC).

        Raises:
            MembershipError: The member does not fit the run (see ``members.add_member``).
            StoreWriteError: Nothing was written.
        """
        return self._in_live_run(
            new, at, "joining", lambda conn, job_id: self._join(conn, job_id, member, gpus, at)
        )

    def open_run(
        self, new: NewJob, *, gpus: Sequence[tuple[int, int]], at: datetime
    ) -> JobRecord:
        """The live job of ``new.run_key`` with ``gpus`` added, created ``running`` if none: a
        job that has its GPUs before any process joins it (a Slurm job's allocation, registered
        by the prolog of each of its nodes). Daemons racing to create it end with one job.

        Raises:
            MembershipError: The run's live job belongs to another user.
            StoreWriteError: Nothing was written.
        """
        def add_gpus(conn: Connection, job_id: int) -> JobRecord:
            self._add_gpus(conn, job_id, gpus)
            return self._require(conn, job_id)

        return self._in_live_run(new, at, "opening", add_gpus)

    def _in_live_run(
        self, new: NewJob, at: datetime, doing: str, then: Callable[[Connection, int], _T]
    ) -> _T:
        """``then(conn, job_id)`` on the live job of ``new.run_key``, created ``running`` in the
        same transaction if there is none. When another daemon created it first (the unique
        live run key), the second try finds its job."""
        if new.run_key is None:
            raise ValueError(f"{doing} a run needs a run key")
        to_epoch_us(at)
        for attempt in range(2):
            try:
                with write_transaction(self._engine) as conn:
                    job_id = self._live_run(conn, new.run_key, new.uid)
                    if job_id is None:
                        job_id = self._insert(conn, new, at, JobState.RUNNING)
                    return then(conn, job_id)
            except IntegrityError as exc:
                if attempt:
                    raise write_error(f"{doing} run {new.run_key!r}", exc) from exc
            except SQLAlchemyError as exc:
                raise write_error(f"{doing} run {new.run_key!r}", exc) from exc
        raise AssertionError("unreachable")

    def latest_run(self, run_key: str) -> JobRecord | None:
        """The job of ``run_key``: the live one, else the one that ended last (``None``: none)."""
        c = jobs_table.c
        query = (select(jobs_table).where(c.run_key == run_key)
                 .order_by(c.ended_at.is_not(None), c.id.desc()).limit(1))
        with self._engine.connect() as conn:
            row = conn.execute(query).first()
            return None if row is None else self._record(row, self._gpus_of(conn, [row.id])[row.id])

    def join(
        self, job_id: int, member: NewMember, *, gpus: Sequence[tuple[int, int]], at: datetime
    ) -> tuple[JobRecord, MemberRecord]:
        """A process joins an existing active job (a rank of a submitted job's command).

        Raises:
            JobNotFoundError: No such job.
            MembershipError: The job is not active, or the member does not fit its run.
            StoreWriteError: Nothing was written.
        """
        to_epoch_us(at)
        try:
            with write_transaction(self._engine) as conn:
                return self._join(conn, job_id, member, gpus, at)
        except SQLAlchemyError as exc:
            raise write_error(f"joining job {job_id}", exc) from exc

    def _live_run(self, conn: Connection, run_key: str, uid: int) -> int | None:
        c = jobs_table.c
        query = select(c.id, c.uid, c.user).where(c.run_key == run_key, c.ended_at.is_(None))
        if self._engine.dialect.name != "sqlite":
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            return None
        if row.uid != uid:
            raise MembershipError(f"run {run_key!r} is job {row.id} of {row.user}, not yours")
        return int(row.id)

    def _insert(self, conn: Connection, new: NewJob, at: datetime, state: JobState) -> int:
        """Insert a job and its creation event; an attached one goes on to ``state``."""
        values = {f.name: _stored(getattr(new, f.name)) for f in fields(NewJob)}
        values.update(state=JobState.QUEUED.value, submitted_at=at)
        job_id = inserted_id(conn.execute(jobs_table.insert().values(**values)))
        events: list[tuple[JobState | None, JobState, str]] = [
            (None, JobState.QUEUED, "attached" if new.attached else "submitted")
        ]
        if state is not JobState.QUEUED:
            events.append((JobState.QUEUED, state, "attached: already running"))
            conn.execute(update(jobs_table).where(jobs_table.c.id == job_id)
                         .values(state=state.value, started_at=at))
        for from_state, to_state, reason in events:
            conn.execute(job_events_table.insert().values(
                job_id=job_id, at=at, from_state=None if from_state is None else from_state.value,
                to_state=to_state.value, reason=reason,
            ))
        return job_id

    def _join(
        self, conn: Connection, job_id: int, member: NewMember,
        gpus: Sequence[tuple[int, int]], at: datetime,
    ) -> tuple[JobRecord, MemberRecord]:
        query = select(jobs_table).where(jobs_table.c.id == job_id)
        if self._engine.dialect.name != "sqlite":
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise JobNotFoundError(f"no job {job_id}")
        state = JobState(row.state)
        if state not in (JobState.RUNNING, JobState.PAUSED):
            raise MembershipError(f"job {job_id} is {state}: only a running job takes members")
        record = m.add_member(conn, job_id, row.generation, row.world_size, member, at=at,
                              steps=is_allocation_key(row.run_key))
        self._add_gpus(conn, job_id, gpus)
        if member.rank == 0 and row.host != member.host and row.attached:  # rank 0 owns a run
            conn.execute(update(jobs_table).where(jobs_table.c.id == job_id)
                         .values(host=member.host))
        return self._require(conn, job_id), record

    def members(self, job_ids: Iterable[int]) -> dict[int, builtins.list[MemberRecord]]:
        """The members of each job (all generations), by rank."""
        with self._engine.connect() as conn:
            return m.members_of(conn, job_ids)

    def member(self, member_id: int) -> MemberRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(job_members_table).where(job_members_table.c.id == member_id)
            ).first()
        return None if row is None else m.member_record(row)

    def run_totals(self, job_id: int) -> RunTotals:
        """The job's progress over its members (``RunTotals``)."""
        with self._engine.connect() as conn:
            return m.run_totals(conn, job_id)

    def report(
        self,
        member: MemberRecord,
        *,
        at: datetime,
        steps: int,
        samples: int,
        tokens: int,
        step_time_s: float | None = None,
        steps_per_s: float | None = None,
        log_progress: bool = True,
    ) -> RunTotals:
        """Store a member's cumulative totals; return the run's, which ``log_progress`` adds to
        the job's progress series (``job_progress``) in the same transaction.

        Raises:
            ValueError: ``at`` is naive.
            StoreWriteError: Nothing was written.
        """
        to_epoch_us(at)
        try:
            with write_transaction(self._engine) as conn:
                m.record_report(conn, member.id, at=at, steps=steps, samples=samples,
                                tokens=tokens, step_time_s=step_time_s, steps_per_s=steps_per_s)
                totals = m.run_totals(conn, member.job_id)
                if log_progress:
                    conn.execute(job_progress_table.insert().values(
                        job_id=member.job_id, at=at, steps=totals.steps, samples=totals.samples,
                        tokens=totals.tokens,
                    ))
                return totals
        except SQLAlchemyError as exc:
            raise write_error(f"recording progress of job {member.job_id}", exc) from exc

    def end_member(
        self, member_id: int, state: MemberState, reason: str, *, at: datetime
    ) -> bool:
        """End a running member (``False``: it had already ended).

        Raises:
            StoreWriteError: Nothing was written.
        """
        to_epoch_us(at)
        try:
            with write_transaction(self._engine) as conn:
                return m.end_member(conn, member_id, state, reason, at=at)
        except SQLAlchemyError as exc:
            raise write_error(f"ending member {member_id}", exc) from exc

    def set_duty(self, job_id: int, host: str, duty: float | None) -> None:
        """The pacing ``host`` asks of the job (soft mode), on its running members there."""
        try:
            with write_transaction(self._engine) as conn:
                m.set_duty(conn, job_id, host, duty)
        except SQLAlchemyError as exc:
            raise write_error(f"setting the pacing of job {job_id}", exc) from exc

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
            raise write_error(f"adding progress of job {job_id}", exc) from exc

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
        return _combine_energy(
            [self._store.span_energy(g, job.started_at, end) for g in job.gpu_ids]
        )
