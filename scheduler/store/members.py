"""A job's members in the store: the processes (ranks) of a run, what each reported, how each ended.

Functions on an open ``Connection``, called by ``JobStore`` inside its transactions. A run's
totals are computed from its members' own totals: samples and tokens summed, steps the fewest.
Members of older elastic generations do not count once a newer one has joined.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, func, select, update

from scheduler.jobs import MemberState
from scheduler.store.records import MemberRecord, NewMember, RunTotals
from telemetry.store.errors import StoreError
from telemetry.store.models import job_members_table, jobs_table

_m = job_members_table.c


class MembershipError(StoreError, ValueError):
    """A join or report that would corrupt a run (duplicate rank, world size changed, a job that
    has ended); nothing was written."""


def member_record(row: Row[Any]) -> MemberRecord:
    m = row._mapping
    return MemberRecord(
        id=m["id"], job_id=m["job_id"], host=m["host"], rank=m["rank"],
        local_rank=m["local_rank"], world_size=m["world_size"], generation=m["generation"],
        pid=m["pid"], pid_create_time=float(m["pid_create_time"]),
        gpus=tuple(int(i) for i in (m["gpus"] or ())), state=MemberState(m["state"]),
        joined_at=m["joined_at"], ended_at=m["ended_at"], end_reason=m["end_reason"],
        reported_at=m["reported_at"], steps=m["steps"], samples=m["samples"], tokens=m["tokens"],
        step_time_s=m["step_time_s"], steps_per_s=m["steps_per_s"], duty=m["duty"],
    )


def members_of(conn: Connection, job_ids: Iterable[int]) -> dict[int, list[MemberRecord]]:
    """Members of each job, by rank (then generation)."""
    ids = list(job_ids)
    out: dict[int, list[MemberRecord]] = {job_id: [] for job_id in ids}
    if ids:
        query = (
            select(job_members_table)
            .where(_m.job_id.in_(ids))
            .order_by(_m.job_id, _m.generation, _m.rank)
        )
        for row in conn.execute(query):
            out[row.job_id].append(member_record(row))
    return out


def add_member(
    conn: Connection, job_id: int, job_generation: int | None, job_world: int | None,
    new: NewMember, *, at: datetime, steps: bool = False,
) -> MemberRecord:
    """Insert a member after checking it fits the run (the caller holds the job's row); the
    same process joining again gets its member back.

    With ``steps`` (a Slurm allocation, whose generations are its steps) generations live side
    by side: a newer one replaces no member, an older one may still join, and a world size is
    checked against the members of its own generation.

    Raises:
        MembershipError: Its rank is already a live member of this generation, its world size
            differs from the run's without an elastic restart, or its generation is older than
            the run's.
    """
    generation = job_generation or 0
    if steps:
        peer = conn.execute(
            select(_m.world_size).where(_m.job_id == job_id, _m.generation == new.generation)
            .limit(1)
        ).first()
        job_world, generation = (None if peer is None else peer[0]), new.generation
    if new.generation < generation:
        raise MembershipError(
            f"rank {new.rank} is from elastic generation {new.generation}, but job {job_id} is at "
            f"generation {generation}"
        )
    if new.generation == generation and job_world is not None and new.world_size != job_world:
        raise MembershipError(
            f"rank {new.rank} says the world has {new.world_size} processes, but job {job_id} "
            f"has {job_world}; a world size changes only with an elastic restart "
            "(TORCHELASTIC_RESTART_COUNT)"
        )
    if not 0 <= new.rank < new.world_size:
        raise MembershipError(f"rank {new.rank} is not a rank of a world of {new.world_size}")
    same = conn.execute(
        select(job_members_table).where(
            _m.job_id == job_id, _m.generation == new.generation, _m.rank == new.rank
        )
    ).first()
    if same is not None:
        held = member_record(same)
        if (held.state is MemberState.RUNNING and (held.host, held.pid) == (new.host, new.pid)
                and abs(held.pid_create_time - new.pid_create_time) < 1.0):
            return held  # the same process again (its first answer was lost): already in
        raise MembershipError(
            f"rank {new.rank} of job {job_id} is already taken by pid {held.pid} on "
            f"{held.host} ({held.state})"
        )
    if new.generation > generation:
        conn.execute(
            update(job_members_table)
            .where(_m.job_id == job_id, _m.state == MemberState.RUNNING.value,
                   _m.generation < new.generation)
            .values(state=MemberState.STOPPED.value, ended_at=at,
                    end_reason=f"replaced by elastic generation {new.generation}")
        )
    if not steps or new.generation >= (job_generation or 0):
        conn.execute(
            update(jobs_table).where(jobs_table.c.id == job_id)
            .values(generation=new.generation, world_size=new.world_size)
        )
    result = conn.execute(job_members_table.insert().values(
        job_id=job_id, host=new.host, rank=new.rank, local_rank=new.local_rank,
        world_size=new.world_size, generation=new.generation, pid=new.pid,
        pid_create_time=new.pid_create_time, gpus=list(new.gpus),
        state=MemberState.RUNNING.value, joined_at=at, steps=0, samples=0, tokens=0,
    ))
    key = result.inserted_primary_key
    assert key is not None
    row = conn.execute(select(job_members_table).where(_m.id == key[0])).one()
    return member_record(row)


def run_totals(conn: Connection, job_id: int) -> RunTotals:
    """The job's totals over the members of its latest generation."""
    latest = select(func.max(_m.generation)).where(_m.job_id == job_id).scalar_subquery()
    row = conn.execute(
        select(func.min(_m.steps), func.sum(_m.samples), func.sum(_m.tokens))
        .where(_m.job_id == job_id, _m.generation == latest)
    ).one()
    return RunTotals(int(row[0] or 0), int(row[1] or 0), int(row[2] or 0))


def record_report(
    conn: Connection, member_id: int, *, at: datetime, steps: int, samples: int, tokens: int,
    step_time_s: float | None, steps_per_s: float | None,
) -> None:
    values: dict[str, Any] = {
        "reported_at": at, "steps": steps, "samples": samples, "tokens": tokens,
        "steps_per_s": steps_per_s,
    }
    if step_time_s is not None:
        values["step_time_s"] = step_time_s
    conn.execute(update(job_members_table).where(_m.id == member_id).values(**values))


def end_member(
    conn: Connection, member_id: int, state: MemberState, reason: str, *, at: datetime
) -> bool:
    """End a running member; ``False`` when it had already ended (nothing changes)."""
    if state is MemberState.RUNNING:
        raise ValueError("a member ends completed, failed or stopped")
    result = conn.execute(
        update(job_members_table)
        .where(_m.id == member_id, _m.state == MemberState.RUNNING.value)
        .values(state=state.value, ended_at=at, end_reason=reason)
    )
    return bool(result.rowcount)


def set_duty(conn: Connection, job_id: int, host: str, duty: float | None) -> None:
    conn.execute(
        update(job_members_table)
        .where(_m.job_id == job_id, _m.host == host, _m.state == MemberState.RUNNING.value)
        .values(duty=duty)
    )


def jobs_with_members_on(conn: Connection, host: str) -> Sequence[int]:
    """Jobs that have a running member on ``host``."""
    query = (
        select(_m.job_id).distinct()
        .where(_m.host == host, _m.state == MemberState.RUNNING.value)
    )
    return [row[0] for row in conn.execute(query)]
