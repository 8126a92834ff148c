"""The store's tables (SQLAlchemy 2 declarative models); migrations in ``alembic/`` create them.

Timestamps are stored as integer microseconds since the Unix epoch (UTC) in a BIGINT column, the
same on SQLite and PostgreSQL: cheap to write, exact, and range queries use plain integer indexes.
In Python they are always timezone-aware UTC ``datetime`` objects (``UtcTimestamp``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
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


# The Core tables, for the repository's bulk statements.
gpus_table = cast(Table, Gpu.__table__)
samples_table = cast(Table, Sample.__table__)
gpu_processes_table = cast(Table, GpuProcessSample.__table__)
rollups_1m_table = cast(Table, Rollup1m.__table__)
