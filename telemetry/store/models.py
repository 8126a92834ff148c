"""The store's tables (SQLAlchemy 2 declarative models); migrations in ``alembic/`` create them.

Timestamps are stored as integer microseconds since the Unix epoch (UTC) in a BIGINT column, the
same on SQLite and PostgreSQL: cheap to write, exact, and range queries use plain integer indexes.
In Python they are always timezone-aware UTC ``datetime`` objects (``UtcTimestamp``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT on PostgreSQL; INTEGER on SQLite so that the key is the rowid (64-bit there anyway).
BigIntKey = BigInteger().with_variant(Integer(), "sqlite")


def to_epoch_us(value: datetime) -> int:
    """An aware datetime as integer microseconds since the Unix epoch.

    Raises:
        ValueError: ``value`` is naive (its time zone would be a guess).
    """
    if value.tzinfo is None:
        raise ValueError(f"timestamps must be timezone-aware (got naive {value.isoformat()})")
    return (value - EPOCH) // ONE_US


def from_epoch_us(value: int) -> datetime:
    """Integer microseconds since the Unix epoch as an aware UTC datetime."""
    return EPOCH + timedelta(microseconds=value)


class UtcTimestamp(TypeDecorator[datetime]):
    """An aware UTC datetime stored as BIGINT microseconds since the Unix epoch."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> int | None:
        return None if value is None else to_epoch_us(value)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        return None if value is None else from_epoch_us(int(value))


class Base(DeclarativeBase):
    """Declarative base; its ``metadata`` is what the migrations are compared against."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Gpu(Base):
    """One GPU of one host, with the static facts its backend probed."""

    __tablename__ = "gpus"
    __table_args__ = (UniqueConstraint("host", "uuid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host: Mapped[str] = mapped_column(String(255))
    backend: Mapped[str] = mapped_column(String(32))
    gpu_index: Mapped[int] = mapped_column(Integer)
    uuid: Mapped[str] = mapped_column(String(96))
    name: Mapped[str] = mapped_column(String(255))
    min_limit_mw: Mapped[int | None] = mapped_column(Integer)
    max_limit_mw: Mapped[int | None] = mapped_column(Integer)
    default_limit_mw: Mapped[int | None] = mapped_column(Integer)
    min_sm_clock_mhz: Mapped[int | None] = mapped_column(Integer)
    max_sm_clock_mhz: Mapped[int | None] = mapped_column(Integer)
    memory_total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    has_energy_counter: Mapped[bool] = mapped_column(Boolean)
    first_seen_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    last_seen_at: Mapped[datetime] = mapped_column(UtcTimestamp)


class Sample(Base):
    """One reading of one GPU at one sampler tick; unsupported fields are NULL."""

    __tablename__ = "samples"
    __table_args__ = (Index(None, "gpu_id", "sampled_at"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    gpu_id: Mapped[int] = mapped_column(Integer, ForeignKey("gpus.id", ondelete="CASCADE"))
    sampled_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    power_mw: Mapped[int | None] = mapped_column(Integer)
    power_avg_mw: Mapped[int | None] = mapped_column(Integer)
    energy_mj: Mapped[int | None] = mapped_column(BigInteger)
    sm_clock_mhz: Mapped[int | None] = mapped_column(Integer)
    mem_clock_mhz: Mapped[int | None] = mapped_column(Integer)
    gpu_util_pct: Mapped[int | None] = mapped_column(Integer)
    mem_util_pct: Mapped[int | None] = mapped_column(Integer)
    temperature_c: Mapped[int | None] = mapped_column(Integer)
    memory_used_bytes: Mapped[int | None] = mapped_column(BigInteger)
    power_limit_mw: Mapped[int | None] = mapped_column(Integer)
    throttle_reasons: Mapped[int | None] = mapped_column(BigInteger)


class GpuProcessSample(Base):
    """A compute process seen on a GPU at one tick (rows exist only when processes do)."""

    __tablename__ = "gpu_processes"
    __table_args__ = (Index(None, "gpu_id", "sampled_at"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    gpu_id: Mapped[int] = mapped_column(Integer, ForeignKey("gpus.id", ondelete="CASCADE"))
    sampled_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    pid: Mapped[int] = mapped_column(Integer)
    used_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)


class Rollup1m(Base):
    """One GPU's minute: sample count, energy from counter deltas, power statistics.

    Each interval between consecutive samples belongs to the minute in which it ends, so the
    energies of consecutive minutes add up to the counter delta over their span.
    ``energy_cum_mj`` is the running total of ``energy_mj`` over the GPU's minutes up to and
    including this one, so the energy of any run of minutes is one difference of two rows.
    """

    __tablename__ = "rollups_1m"

    gpu_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("gpus.id", ondelete="CASCADE"), primary_key=True
    )
    minute_start: Mapped[datetime] = mapped_column(UtcTimestamp, primary_key=True)
    n_samples: Mapped[int] = mapped_column(Integer)
    energy_mj: Mapped[float] = mapped_column(Double)
    mean_power_mw: Mapped[float | None] = mapped_column(Double)
    min_power_mw: Mapped[int | None] = mapped_column(Integer)
    max_power_mw: Mapped[int | None] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(16))
    energy_cum_mj: Mapped[float] = mapped_column(Double)


class RollupLevel(Base):
    """One GPU's coarser bucket (10 minutes, one hour): the sum of its one-minute rollups.

    ``energy_mj`` is the exact sum of the minutes' energies (counter deltas), never an average
    of averages; a bucket is written once every minute in it is rolled up. ``level_s`` is the
    bucket width in seconds (``telemetry.store.repository.ROLLUP_LEVELS_S``).
    """

    __tablename__ = "rollups_levels"

    gpu_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("gpus.id", ondelete="CASCADE"), primary_key=True
    )
    level_s: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(UtcTimestamp, primary_key=True)
    n_samples: Mapped[int] = mapped_column(Integer)
    energy_mj: Mapped[float] = mapped_column(Double)
    mean_power_mw: Mapped[float | None] = mapped_column(Double)
    min_power_mw: Mapped[int | None] = mapped_column(Integer)
    max_power_mw: Mapped[int | None] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(16))


class EnergyMark(Base):
    """Where a job edge falls in one GPU's rollups: written by ``Store.rollup`` once the hour
    holding the edge is rolled up, so that a report reads one small row per job edge.

    ``energy_cum_mj`` is the GPU's running rolled-up energy (``rollups_1m.energy_cum_mj``) at the
    instant ``at``: the total before ``at``'s minute plus the part of that minute's energy that the
    raw samples' energy counter puts before ``at`` (in proportion to time where it cannot). The
    ``before_*`` fields summarise the minutes of ``at``'s hour before it (its own minute included
    when ``at`` is inside it), the ``after_*`` ones the minutes from ``at``'s own to the hour's end:
    highest power reading, mW (``None``: no reading) and combined method. ``prev_at`` is the
    GPU's previous mark, and ``from_prev_*`` summarise the minutes that ``[prev_at, at)`` touches
    (``None`` until linked; relinked when a late edge lands between two marks), so that a report
    segment between two neighbouring job edges reads nothing else. A mark depends on telemetry
    and on which instants are marked, never on which jobs they belong to.
    """

    __tablename__ = "energy_marks"
    # on SQLite, rows stored in key order: a report reads a range of them without lookups
    __table_args__ = ({"sqlite_with_rowid": False},)

    gpu_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("gpus.id", ondelete="CASCADE"), primary_key=True
    )
    at: Mapped[datetime] = mapped_column(UtcTimestamp, primary_key=True)
    energy_cum_mj: Mapped[float] = mapped_column(Double)
    before_max_mw: Mapped[int | None] = mapped_column(Integer)
    before_method: Mapped[str] = mapped_column(String(16))
    after_max_mw: Mapped[int | None] = mapped_column(Integer)
    after_method: Mapped[str] = mapped_column(String(16))
    prev_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    from_prev_max_mw: Mapped[int | None] = mapped_column(Integer)
    from_prev_method: Mapped[str | None] = mapped_column(String(16))


# The Core tables, for the repository's bulk statements.
gpus_table = cast(Table, Gpu.__table__)
samples_table = cast(Table, Sample.__table__)
gpu_processes_table = cast(Table, GpuProcessSample.__table__)
rollups_1m_table = cast(Table, Rollup1m.__table__)
rollups_levels_table = cast(Table, RollupLevel.__table__)
energy_marks_table = cast(Table, EnergyMark.__table__)


class Job(Base):
    """A training job submitted to (or attached on) one host, with its budgets and lifecycle.

    ``state`` holds a ``scheduler.jobs.JobState`` value; every change of it is a ``job_events``
    row. Values are validated before they reach the store (the API's models); the store keeps
    structure only.
    """

    __tablename__ = "jobs"
    __table_args__ = (Index(None, "host", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255))
    user: Mapped[str] = mapped_column(String(255))
    uid: Mapped[int] = mapped_column(Integer)
    gid: Mapped[int] = mapped_column(Integer)
    argv: Mapped[list[str]] = mapped_column(JSON)
    cwd: Mapped[str] = mapped_column(Text)
    env: Mapped[dict[str, str]] = mapped_column(JSON)
    gpu_count: Mapped[int | None] = mapped_column(Integer)
    gpu_ids_requested: Mapped[list[int] | None] = mapped_column(JSON)
    watts_per_gpu: Mapped[float | None] = mapped_column(Double)
    energy_budget_wh: Mapped[float | None] = mapped_column(Double)
    mode: Mapped[str] = mapped_column(String(16))
    mode_effective: Mapped[str | None] = mapped_column(String(16))
    mode_reason: Mapped[str | None] = mapped_column(Text)
    on_exceed: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer)
    objective: Mapped[str | None] = mapped_column(String(64))
    total_steps: Mapped[int | None] = mapped_column(BigInteger)
    total_tokens: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    attached: Mapped[bool] = mapped_column(Boolean)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    pid_create_time: Mapped[float | None] = mapped_column(Double)
    submitted_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    started_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    ended_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    end_reason: Mapped[str | None] = mapped_column(Text)
    deadline_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    # A distributed run: the launcher's identity of it (``torchrun:<run id>``, ...), its world
    # size and elastic generation (restart count); NULL for a job that is not one.
    run_key: Mapped[str | None] = mapped_column(String(255))
    world_size: Mapped[int | None] = mapped_column(Integer)
    generation: Mapped[int | None] = mapped_column(Integer)
    # A collective action every rank takes at the same step: pause, stop, cancel or checkpoint
    # (``scheduler.jobs.Hold``), the step it takes effect at, and why.
    hold: Mapped[str | None] = mapped_column(String(16))
    hold_step: Mapped[int | None] = mapped_column(BigInteger)
    hold_reason: Mapped[str | None] = mapped_column(Text)
    # The setting the owner node's energy optimiser holds the run at, which the other nodes
    # apply to their GPUs of it: ``power_limit`` (mW) or ``sm_clocks`` (MHz).
    knob: Mapped[str | None] = mapped_column(String(16))
    knob_setting: Mapped[int | None] = mapped_column(Integer)


# One live job per run: ranks that attach with the same run key join it, across daemons too.
Index("uq_jobs_live_run_key", Job.run_key, unique=True,
      sqlite_where=Job.ended_at.is_(None), postgresql_where=Job.ended_at.is_(None))


class JobMember(Base):
    """One process of a job: a rank of a distributed run, or the single process of a plain job.

    ``steps``/``samples``/``tokens`` are the member's own cumulative totals as it last reported
    them (a run's totals are their sums; its steps, the smallest); ``steps_per_s`` its recent step
    rate; ``duty`` the pacing its node's soft controller asks (a run is paced at the lowest).
    ``state`` is ``running``, ``completed`` (ended cleanly), ``failed`` or ``stopped``.
    """

    __tablename__ = "job_members"
    __table_args__ = (
        UniqueConstraint("job_id", "generation", "rank"),
        Index(None, "host", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id", ondelete="CASCADE"))
    host: Mapped[str] = mapped_column(String(255))
    rank: Mapped[int] = mapped_column(Integer)
    local_rank: Mapped[int] = mapped_column(Integer)
    world_size: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(Integer)
    pid: Mapped[int] = mapped_column(Integer)
    pid_create_time: Mapped[float] = mapped_column(Double)
    gpus: Mapped[list[int]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    joined_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    ended_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    end_reason: Mapped[str | None] = mapped_column(Text)
    reported_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    steps: Mapped[int] = mapped_column(BigInteger)
    samples: Mapped[int] = mapped_column(BigInteger)
    tokens: Mapped[int] = mapped_column(BigInteger)
    step_time_s: Mapped[float | None] = mapped_column(Double)
    steps_per_s: Mapped[float | None] = mapped_column(Double)
    duty: Mapped[float | None] = mapped_column(Double)


class NodeRow(Base):
    """A node whose daemon writes to this store: its GPUs, version and last heartbeat."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    gpu_count: Mapped[int] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(32))
    version: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    heartbeat_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    stopped_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)



class ApiTokenRow(Base):
    """A token for the daemon's TCP API: who it acts as and what it may do, kept only as its
    SHA-256 digest (``scheduler/store/tokens.py``)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(String(255))
    scope: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)


class ClusterStateRow(Base):
    """The cluster's one power cap and its leader's lease (one row, ``id`` 1)."""

    __tablename__ = "cluster_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cap_w: Mapped[float | None] = mapped_column(Double)
    set_by: Mapped[str | None] = mapped_column(String(255))
    set_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    leader: Mapped[str | None] = mapped_column(String(255))
    leader_since: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    lease_until: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    term: Mapped[int] = mapped_column(BigInteger)
    divided_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)


class ClusterShareRow(Base):
    """What the cluster cap's leader gave a node (``job_id`` 0: the node's cap) or a job."""

    __tablename__ = "cluster_shares"

    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    watts: Mapped[float] = mapped_column(Double)
    expected_w: Mapped[float] = mapped_column(Double)
    rate_rel: Mapped[float | None] = mapped_column(Double)
    term: Mapped[int] = mapped_column(BigInteger)

class JobGpu(Base):
    """A GPU assigned to a job (kept after the job ends, for energy and reports)."""

    __tablename__ = "job_gpus"

    job_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    gpu_id: Mapped[int] = mapped_column(Integer, ForeignKey("gpus.id"), primary_key=True)
    gpu_index: Mapped[int] = mapped_column(Integer)


class JobEventRow(Base):
    """One state change of a job: when, from which state (NULL for the first), to which, why."""

    __tablename__ = "job_events"
    __table_args__ = (Index(None, "job_id", "at"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UtcTimestamp)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)


class JobProgressRow(Base):
    """A job's cumulative progress as its client reported it (NULL: not reported)."""

    __tablename__ = "job_progress"
    __table_args__ = (Index(None, "job_id", "at"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UtcTimestamp)
    steps: Mapped[int | None] = mapped_column(BigInteger)
    samples: Mapped[int | None] = mapped_column(BigInteger)
    tokens: Mapped[int | None] = mapped_column(BigInteger)


jobs_table = cast(Table, Job.__table__)
job_gpus_table = cast(Table, JobGpu.__table__)
job_events_table = cast(Table, JobEventRow.__table__)
job_progress_table = cast(Table, JobProgressRow.__table__)
job_members_table = cast(Table, JobMember.__table__)
nodes_table = cast(Table, NodeRow.__table__)
api_tokens_table = cast(Table, ApiTokenRow.__table__)
cluster_state_table = cast(Table, ClusterStateRow.__table__)
cluster_shares_table = cast(Table, ClusterShareRow.__table__)


class SettingsJournalRow(Base):
    """One GPU setting powertrain changed (or, in a dry run, would have changed), and its undo.

    Written before the GPU is touched (``pending``), then ``applied`` or ``failed``; an applied
    or pending change ends ``undone`` (back to the GPU's default) or ``undo_failed``. ``value`` is
    a power limit in mW (``setting = 'power_limit'``) or the locked maximum SM clock in MHz
    (``'sm_clocks'``, with the lower bound in ``min_clock_mhz``); ``previous_value`` is what was
    in force before, in the same unit, when known.
    """

    __tablename__ = "settings_journal"
    __table_args__ = (Index(None, "host", "status"), Index(None, "job_id"))

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    host: Mapped[str] = mapped_column(String(255))
    gpu_id: Mapped[int] = mapped_column(Integer, ForeignKey("gpus.id"))
    gpu_index: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("jobs.id", ondelete="SET NULL"))
    setting: Mapped[str] = mapped_column(String(16))
    value: Mapped[int] = mapped_column(Integer)
    min_clock_mhz: Mapped[int | None] = mapped_column(Integer)
    previous_value: Mapped[int | None] = mapped_column(Integer)
    dry_run: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(16))
    requested_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    applied_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    undone_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    undo_reason: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)


settings_journal_table = cast(Table, SettingsJournalRow.__table__)


class ControlDecisionRow(Base):
    """One control decision for a job (a controller, the energy guard or the node-cap guard):
    what it changed and why, with the power and throughput before it and, once the change has
    settled, after it (NULL until then)."""

    __tablename__ = "control_decisions"
    __table_args__ = (Index(None, "job_id", "at"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UtcTimestamp)
    source: Mapped[str] = mapped_column(String(16))
    what: Mapped[str] = mapped_column(Text)
    why: Mapped[str] = mapped_column(Text)
    power_before_w: Mapped[float | None] = mapped_column(Double)
    steps_per_s_before: Mapped[float | None] = mapped_column(Double)
    power_after_w: Mapped[float | None] = mapped_column(Double)
    steps_per_s_after: Mapped[float | None] = mapped_column(Double)


control_decisions_table = cast(Table, ControlDecisionRow.__table__)


class OptimizerSearchRow(Base):
    """One finished search of the energy optimiser for a job (``--objective``, the ``slow``
    energy action), kept up to date while the job runs at its choice (revisions, and the
    longer measurement of the held setting)."""

    __tablename__ = "optimizer_searches"
    __table_args__ = (UniqueConstraint("job_id", "number"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UtcTimestamp)
    objective: Mapped[str] = mapped_column(String(16))
    knob: Mapped[str] = mapped_column(String(16))
    setting: Mapped[int] = mapped_column(Integer)
    top_setting: Mapped[int] = mapped_column(Integer)
    feasible: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    revisions: Mapped[int] = mapped_column(Integer)
    profiling_steps: Mapped[int] = mapped_column(BigInteger)
    profiling_time_s: Mapped[float] = mapped_column(Double)
    profiling_energy_j: Mapped[float] = mapped_column(Double)
    #: A joint search's chosen micro-batch and the job's own (NULL: the setting alone).
    micro_batch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    default_micro_batch: Mapped[int | None] = mapped_column(Integer, nullable=True)


optimizer_searches_table = cast(Table, OptimizerSearchRow.__table__)


class OptimizerProbeRow(Base):
    """What one setting measured in a search: its steps, their wall time and energy; in a joint
    search, at which micro-batch (NULL: the job's own, in a search of the setting alone)."""

    __tablename__ = "optimizer_probes"
    __table_args__ = (UniqueConstraint("search_id", "micro_batch", "setting"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    search_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("optimizer_searches.id", ondelete="CASCADE")
    )
    setting: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(BigInteger)
    time_s: Mapped[float] = mapped_column(Double)
    energy_j: Mapped[float] = mapped_column(Double)
    micro_batch: Mapped[int | None] = mapped_column(Integer, nullable=True)


optimizer_probes_table = cast(Table, OptimizerProbeRow.__table__)
