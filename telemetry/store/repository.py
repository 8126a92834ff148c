"""The repository: every read and write of GPU telemetry, returning plain frozen dataclasses."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    bindparam,
    func,
    select,
    type_coerce,
    update,
)
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from energy.counters import (
    DEFAULT_MAX_GAP_S,
    EnergyMethod,
    EnergyResult,
    EnergySample,
    IntervalMethod,
    combine_methods,
    integrate,
    interval_energy,
)
from telemetry.backends.base import GpuInfo, GpuReading
from telemetry.store.errors import StoreWriteError
from telemetry.store.models import (
    energy_marks_table,
    from_epoch_us,
    gpu_processes_table,
    gpus_table,
    job_gpus_table,
    jobs_table,
    rollups_1m_table,
    rollups_levels_table,
    samples_table,
    to_epoch_us,
)

if TYPE_CHECKING:
    from telemetry.store.jobs import JobStore
    from telemetry.store.journal import JournalStore

MINUTE_US = 60_000_000
HOUR_US = 3_600_000_000
_HOUR_S = 3600
ROLLUP_SETTLE_S = 10.0
"""A minute is rolled up this many seconds after it ends (the sampler flushes every second)."""
ROLLUP_WINDOW_US = 60 * MINUTE_US
"""Rollups of a long backlog are written an hour at a time, each hour in its own transaction."""
ROLLUP_LEVELS_S = (600, 3600)
"""Widths, in seconds, of the coarser buckets summed from the minutes (``rollups_levels``)."""
RAW_MAX_SPAN_S = 6 * 3600.0
"""Energy over at most this many seconds is read from raw samples (where they are still kept);
longer ranges read rollups."""
_VALUES_CHUNK = 2000

_READING_FIELDS = (
    "power_mw",
    "power_avg_mw",
    "energy_mj",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "gpu_util_pct",
    "mem_util_pct",
    "temperature_c",
    "memory_used_bytes",
    "power_limit_mw",
    "throttle_reasons",
)

# PostgreSQL SQLSTATEs worth retrying: serialisation failure, deadlock, lock not available,
# shutdown/crash/cannot connect now, too many connections (class 08 = connection exceptions).
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"}
_TRANSIENT_SQLITE = {"SQLITE_BUSY", "SQLITE_LOCKED"}


@dataclass(frozen=True, slots=True)
class GpuRecord:
    """A registered GPU: the backend's ``GpuInfo`` plus where and when it was seen.

    Attributes:
        id: Store key (``samples.gpu_id``).
        host / backend: The node and the backend that read it (``nvml``, ``simulated``, ...).
        index / uuid / name: As in ``GpuInfo``.
        min_limit_mw / max_limit_mw / default_limit_mw: Power limit range and default, mW.
        min_sm_clock_mhz / max_sm_clock_mhz: SM clock range, MHz.
        memory_total_bytes: Framebuffer size, bytes.
        has_energy_counter: Whether the GPU has a total energy counter.
        first_seen_at / last_seen_at: First registration; latest registration or stored sample
            (aware UTC).
    """

    id: int
    host: str
    backend: str
    index: int
    uuid: str
    name: str
    min_limit_mw: int | None
    max_limit_mw: int | None
    default_limit_mw: int | None
    min_sm_clock_mhz: int | None
    max_sm_clock_mhz: int | None
    memory_total_bytes: int | None
    has_energy_counter: bool
    first_seen_at: datetime
    last_seen_at: datetime


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """One stored reading of one GPU; ``None`` where the GPU did not report the field.

    Units as in ``GpuReading``: mW, mJ (counter since driver load), MHz, percent, °C, bytes.
    """

    gpu_id: int
    sampled_at: datetime
    power_mw: int | None
    power_avg_mw: int | None
    energy_mj: int | None
    sm_clock_mhz: int | None
    mem_clock_mhz: int | None
    gpu_util_pct: int | None
    mem_util_pct: int | None
    temperature_c: int | None
    memory_used_bytes: int | None
    power_limit_mw: int | None
    throttle_reasons: int | None


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """A compute process seen on a GPU at ``sampled_at`` (aware UTC); memory in bytes."""

    gpu_id: int
    sampled_at: datetime
    pid: int
    used_memory_bytes: int | None


@dataclass(frozen=True, slots=True)
class RollupRecord:
    """One GPU's minute.

    Attributes:
        gpu_id: The GPU.
        minute_start: Start of the minute (aware UTC).
        n_samples: Samples taken in the minute.
        energy_mj: Energy of the intervals that end in the minute, mJ (counter deltas where
            possible, so consecutive minutes add up to the counter delta over their span).
        mean_power_mw / min_power_mw / max_power_mw: Over the minute's samples (instant power,
            else the 1 s average), mW; ``None`` when no sample had power.
        method: ``counter``, ``trapezoid``, ``mixed`` or ``none`` (see ``energy.counters``).
        energy_cum_mj: The GPU's running total of ``energy_mj`` up to and including this
            minute, mJ.
    """

    gpu_id: int
    minute_start: datetime
    n_samples: int
    energy_mj: float
    mean_power_mw: float | None
    min_power_mw: int | None
    max_power_mw: int | None
    method: str
    energy_cum_mj: float


@dataclass(frozen=True, slots=True)
class BucketRecord:
    """One GPU's coarser rollup bucket: the exact sum of its minutes.

    Attributes:
        gpu_id: The GPU.
        level_s: Bucket width, s (one of ``ROLLUP_LEVELS_S``).
        start: Start of the bucket (aware UTC).
        n_samples: Samples taken in the bucket.
        energy_mj: Sum of the bucket's minute energies, mJ.
        mean_power_mw: Mean of the minutes' mean power weighted by their sample counts, mW.
        min_power_mw / max_power_mw: Lowest and highest reading in the bucket, mW.
        method: ``counter``, ``trapezoid``, ``mixed`` or ``none``.
    """

    gpu_id: int
    level_s: int
    start: datetime
    n_samples: int
    energy_mj: float
    mean_power_mw: float | None
    min_power_mw: int | None
    max_power_mw: int | None
    method: str


EnergySource = Literal["samples", "rollups"]


@dataclass(frozen=True, slots=True)
class SegmentEnergy:
    """One GPU's energy between two consecutive breakpoints (see ``Store.segment_energy``).

    Attributes:
        start / end: The segment, ``[start, end)`` (aware UTC).
        energy_mj: Energy, mJ.
        max_power_mw: Highest power reading, mW (from rollups: the highest of the minutes and
            buckets read, which may reach up to a minute beyond the segment); ``None``: none.
        method: How the energy was found: ``counter``, ``trapezoid``, ``mixed`` or ``none``.
        source: ``samples`` (raw) or ``rollups`` (minute edges, coarser buckets inside).
        counter_resets / gaps: Counter restarts and trapezoid gaps in the segment (raw samples
            only; rollups do not keep them).
    """

    start: datetime
    end: datetime
    energy_mj: float
    max_power_mw: int | None
    method: EnergyMethod
    source: EnergySource
    counter_resets: int = 0
    gaps: int = 0


@dataclass(frozen=True, slots=True)
class SegmentEnergyUs:
    """``SegmentEnergy`` with its ends as integer microseconds since the Unix epoch (what
    ``Store.segment_energy_us`` returns, for callers that do their own time arithmetic)."""

    start_us: int
    end_us: int
    energy_mj: float
    max_power_mw: int | None
    method: EnergyMethod
    source: EnergySource
    counter_resets: int = 0
    gaps: int = 0


@dataclass(frozen=True, slots=True)
class PowerPoint:
    """Power of one GPU over a bucket of a chart's time axis.

    Attributes:
        start / end: The bucket (aware UTC).
        mean_power_mw: Mean power, mW (from rollups: the bucket's energy over its width).
        max_power_mw: Highest reading, mW, or ``None``.
    """

    start: datetime
    end: datetime
    mean_power_mw: float
    max_power_mw: int | None


@dataclass(frozen=True, slots=True)
class ProgressAt:
    """A job's cumulative progress at a time: its latest report at or before it (``None``s:
    no report yet)."""

    steps: int | None
    samples: int | None
    tokens: int | None


class _SegmentAcc:
    __slots__ = ("energy_mj", "gaps", "max_mw", "methods", "resets")

    def __init__(self) -> None:
        self.energy_mj = 0.0
        self.max_mw: int | None = None
        self.methods: set[str] = set()
        self.resets = 0
        self.gaps = 0

    def peak(self, mw: int | None) -> None:
        if mw is not None and (self.max_mw is None or mw > self.max_mw):
            self.max_mw = mw

    def method(self) -> EnergyMethod:
        seen = self.methods - {"none"}
        if not seen:
            return "none"
        if len(seen) > 1 or "mixed" in seen:
            return "mixed"
        return "counter" if "counter" in seen else "trapezoid"


@dataclass(frozen=True, slots=True)
class _Mark:
    """A GPU's rollups at one instant (see ``EnergyMark`` in ``telemetry.store.models``)."""

    energy_mj: float
    before_max_mw: int | None
    before_method: str
    after_max_mw: int | None
    after_method: str
    prev_at_us: int | None = None
    from_prev_max_mw: int | None = None
    from_prev_method: str | None = None


_MARK_COLUMNS = (
    "m.gpu_id, m.at, m.energy_cum_mj, m.before_max_mw, m.before_method, m.after_max_mw, "
    "m.after_method, m.prev_at, m.from_prev_max_mw, m.from_prev_method"
)


def _mark_of(fields: Sequence[Any]) -> _Mark:
    """A ``_Mark`` from the ``_MARK_COLUMNS`` after ``gpu_id`` and ``at`` (the drivers return
    these columns as float, int and str already)."""
    return _Mark(*fields)


def _combine_method_strings(methods: Sequence[str | None]) -> str:
    seen = {m for m in methods if m is not None and m != "none"}
    if not seen:
        return "none"
    if len(seen) > 1 or "mixed" in seen:
        return "mixed"
    return next(iter(seen))


def _values_sql(rows: Sequence[tuple[int | float, ...]]) -> str:
    """Numeric tuples as a SQL ``VALUES`` list (numbers only, formatted here: nothing to inject)."""
    return ", ".join([
        "(" + ", ".join([repr(float(v)) if isinstance(v, float) else str(int(v)) for v in row])
        + ")"
        for row in rows
    ])


def _floor(t_us: int, width_us: int) -> int:
    return t_us - t_us % width_us


def _ceil(t_us: int, width_us: int) -> int:
    return -((-t_us) // width_us) * width_us


def _is_transient(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    sqlite_name = getattr(orig, "sqlite_errorname", None)
    if sqlite_name is not None:
        return sqlite_name in _TRANSIENT_SQLITE
    if hasattr(orig, "sqlstate"):  # psycopg
        sqlstate = getattr(orig, "sqlstate", None)
        if sqlstate is None:
            # no server answer at all: the connection failed
            return isinstance(exc, OperationalError)
        return str(sqlstate).startswith("08") or sqlstate in _TRANSIENT_SQLSTATES
    message = str(orig).lower()
    return "locked" in message or "busy" in message


def _write_error(what: str, exc: SQLAlchemyError) -> StoreWriteError:
    transient = isinstance(exc, DBAPIError) and _is_transient(exc)
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    kind = "transient" if transient else "permanent"
    return StoreWriteError(f"{what} failed ({kind}): {cause}", transient=transient)


def _floor_minute_us(t_us: int) -> int:
    return t_us - t_us % MINUTE_US


def _us(column: Any) -> ColumnElement[int]:
    """A timestamp column read as raw integer microseconds (skips datetime conversion)."""
    return type_coerce(column, BigInteger)


class _MinuteAccumulator:
    __slots__ = ("energy_mj", "max_mw", "methods", "min_mw", "n", "n_power", "sum_mw")

    def __init__(self) -> None:
        self.n = 0
        self.n_power = 0
        self.sum_mw = 0
        self.min_mw: int | None = None
        self.max_mw: int | None = None
        self.energy_mj = 0.0
        self.methods: set[IntervalMethod] = set()


class _DriverStatement:
    """A Core statement compiled once for one dialect and run with plain DB-API parameters.

    The hot write path skips SQLAlchemy's per-row parameter processing: callers pass values
    already in their stored form (timestamps as epoch microseconds), as tuples in ``keys`` order.
    """

    def __init__(self, statement: Any, dialect: Any, keys: Sequence[str]) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        self.sql = str(compiled)
        self.keys = tuple(keys)
        self._positional = bool(compiled.positional)
        order = tuple(compiled.positiontup or ()) if self._positional else self.keys
        missing = set(order) - set(self.keys)
        if missing:
            raise RuntimeError(f"statement needs parameters {sorted(missing)} not in {self.keys}")
        # where the compiled order is ours (inserts), tuples pass straight through
        self._same_order = order == self.keys
        self._index = tuple(self.keys.index(name) for name in order)

    def executemany(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        if self._positional:
            if not self._same_order:
                rows = [tuple(row[i] for i in self._index) for row in rows]
            conn.exec_driver_sql(self.sql, rows)
        else:
            conn.exec_driver_sql(self.sql, [dict(zip(self.keys, row, strict=True)) for row in rows])

    def executemany_dicts(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        self.executemany(conn, [tuple(row[k] for k in self.keys) for row in rows])


class Store:
    """GPU telemetry in a SQL database: GPUs, samples, processes, one-minute rollups.

    Build one with ``telemetry.store.open_store(url)``, which checks the schema first.
    Thread-safe as far as the engine's pool is (each call uses its own connection).
    """

    def __init__(self, engine: Engine, *, max_gap_s: float = DEFAULT_MAX_GAP_S) -> None:
        """Wrap an engine whose database is at the latest schema.

        Args:
            engine: From ``telemetry.store.make_engine``; ``close`` disposes of it.
            max_gap_s: Trapezoid intervals longer than this many seconds count as gaps.
        """
        self._engine = engine
        self._max_gap_s = max_gap_s
        self._jobs: JobStore | None = None
        self._journal: JournalStore | None = None
        self._is_sqlite = engine.dialect.name == "sqlite"
        dialect = engine.dialect
        self._insert_samples = _DriverStatement(
            samples_table.insert().inline(), dialect, ("gpu_id", "sampled_at", *_READING_FIELDS)
        )
        self._insert_processes = _DriverStatement(
            gpu_processes_table.insert().inline(),
            dialect,
            ("gpu_id", "sampled_at", "pid", "used_memory_bytes"),
        )
        us = BigInteger()
        self._touch_gpus = _DriverStatement(
            update(gpus_table)
            .where(gpus_table.c.id == bindparam("b_gpu_id"))
            .where(_us(gpus_table.c.last_seen_at) < bindparam("b_seen_at", type_=us))
            .values(last_seen_at=type_coerce(bindparam("b_seen_at", type_=us), BigInteger)),
            dialect,
            ("b_gpu_id", "b_seen_at"),
        )

    @property
    def engine(self) -> Engine:
        """The engine the store writes through."""
        return self._engine

    @property
    def jobs(self) -> JobStore:
        """The jobs in this store (a ``JobStore`` on the same engine, made on first use)."""
        if self._jobs is None:
            from telemetry.store.jobs import JobStore  # jobs.py uses this module's helpers

            self._jobs = JobStore(self._engine, gpu_energy=self.span_energy)
        return self._jobs

    @property
    def journal(self) -> JournalStore:
        """The settings journal in this store (a ``JournalStore`` on the same engine)."""
        if self._journal is None:
            from telemetry.store.journal import JournalStore  # imports this module

            self._journal = JournalStore(self._engine)
        return self._journal

    def _write(self) -> Any:
        """A write transaction (on SQLite, one that takes the write lock at ``BEGIN``)."""
        if self._is_sqlite:
            return self._engine.execution_options(sqlite_immediate=True).begin()
        return self._engine.begin()

    # -- GPUs --------------------------------------------------------------------------------

    def register_gpus(
        self,
        infos: Sequence[GpuInfo],
        *,
        host: str,
        backend: str,
        seen_at: datetime | None = None,
    ) -> dict[int, int]:
        """Insert or update the GPUs of one host (matched by ``(host, uuid)``).

        Args:
            infos: The backend's GPUs.
            host: The node's name.
            backend: The backend's name (``nvml``, ``simulated``, ``replay``).
            seen_at: When they were seen (aware UTC); now if omitted.

        Returns:
            GPU index to store ``gpu_id``.

        Raises:
            StoreWriteError: Nothing was written.
        """
        seen = seen_at or datetime.now(UTC)
        ids: dict[int, int] = {}
        try:
            with self._write() as conn:
                existing = {
                    row.uuid: row.id
                    for row in conn.execute(
                        select(gpus_table.c.id, gpus_table.c.uuid).where(
                            gpus_table.c.host == host,
                            gpus_table.c.uuid.in_([i.uuid for i in infos]),
                        )
                    )
                }
                for info in infos:
                    values = {
                        "backend": backend,
                        "gpu_index": info.index,
                        "name": info.name,
                        "min_limit_mw": info.min_limit_mw,
                        "max_limit_mw": info.max_limit_mw,
                        "default_limit_mw": info.default_limit_mw,
                        "min_sm_clock_mhz": info.min_sm_clock_mhz,
                        "max_sm_clock_mhz": info.max_sm_clock_mhz,
                        "memory_total_bytes": info.memory_total_bytes,
                        "has_energy_counter": info.has_energy_counter,
                        "last_seen_at": seen,
                    }
                    gpu_id = existing.get(info.uuid)
                    if gpu_id is None:
                        result = conn.execute(
                            gpus_table.insert().values(
                                host=host, uuid=info.uuid, first_seen_at=seen, **values
                            )
                        )
                        gpu_id = int(result.inserted_primary_key[0])
                    else:
                        conn.execute(
                            update(gpus_table).where(gpus_table.c.id == gpu_id).values(**values)
                        )
                    ids[info.index] = gpu_id
        except SQLAlchemyError as exc:
            raise _write_error("registering GPUs", exc) from exc
        return ids

    def gpus(self, *, host: str | None = None) -> list[GpuRecord]:
        """Registered GPUs (of one host, if given), by host then index."""
        query = select(gpus_table).order_by(gpus_table.c.host, gpus_table.c.gpu_index)
        if host is not None:
            query = query.where(gpus_table.c.host == host)
        with self._engine.connect() as conn:
            return [
                GpuRecord(
                    id=r.id,
                    host=r.host,
                    backend=r.backend,
                    index=r.gpu_index,
                    uuid=r.uuid,
                    name=r.name,
                    min_limit_mw=r.min_limit_mw,
                    max_limit_mw=r.max_limit_mw,
                    default_limit_mw=r.default_limit_mw,
                    min_sm_clock_mhz=r.min_sm_clock_mhz,
                    max_sm_clock_mhz=r.max_sm_clock_mhz,
                    memory_total_bytes=r.memory_total_bytes,
                    has_energy_counter=bool(r.has_energy_counter),
                    first_seen_at=r.first_seen_at,
                    last_seen_at=r.last_seen_at,
                )
                for r in conn.execute(query)
            ]

    # -- samples -----------------------------------------------------------------------------

    def insert_samples(self, rows: Sequence[tuple[int, GpuReading]]) -> int:
        """Write a batch of readings (and their processes) in one transaction.

        Args:
            rows: ``(gpu_id, reading)`` pairs; ``reading.sampled_at`` must be aware.

        Returns:
            How many samples were written (all of them).

        Raises:
            StoreWriteError: Nothing was written; ``transient`` says whether a retry may help.
            ValueError: A reading's ``sampled_at`` is naive (nothing was written).
        """
        if not rows:
            return 0
        sample_rows: list[tuple[Any, ...]] = []
        process_rows: list[tuple[Any, ...]] = []
        latest: dict[int, int] = {}
        for gpu_id, r in rows:
            at_us = to_epoch_us(r.sampled_at)  # ValueError if naive, before anything is written
            sample_rows.append(
                (
                    gpu_id,
                    at_us,
                    r.power_mw,
                    r.power_avg_mw,
                    r.energy_mj,
                    r.sm_clock_mhz,
                    r.mem_clock_mhz,
                    r.gpu_util_pct,
                    r.mem_util_pct,
                    r.temperature_c,
                    r.memory_used_bytes,
                    r.power_limit_mw,
                    r.throttle_reasons,
                )
            )
            for p in r.processes:
                process_rows.append((gpu_id, at_us, p.pid, p.used_memory_bytes))
            if at_us > latest.get(gpu_id, -1):
                latest[gpu_id] = at_us
        touch = [{"b_gpu_id": g, "b_seen_at": at_us} for g, at_us in latest.items()]
        try:
            with self._engine.begin() as conn:
                self._insert_samples.executemany(conn, sample_rows)
                if process_rows:
                    self._insert_processes.executemany(conn, process_rows)
                self._touch_gpus.executemany_dicts(conn, touch)
        except SQLAlchemyError as exc:
            raise _write_error(f"inserting {len(rows)} samples", exc) from exc
        return len(sample_rows)

    @staticmethod
    def _range(column: Any, since: datetime | None, until: datetime | None) -> list[Any]:
        where = []
        if since is not None:
            where.append(column >= since)
        if until is not None:
            where.append(column < until)
        return where

    def samples(
        self, gpu_id: int, since: datetime | None = None, until: datetime | None = None
    ) -> list[SampleRecord]:
        """One GPU's samples with ``since <= sampled_at < until``, oldest first."""
        c = samples_table.c
        query = (
            select(c.gpu_id, c.sampled_at, *(c[name] for name in _READING_FIELDS))
            .where(c.gpu_id == gpu_id, *self._range(c.sampled_at, since, until))
            .order_by(c.sampled_at, c.id)
        )
        with self._engine.connect() as conn:
            return [SampleRecord(*row) for row in conn.execute(query)]

    def sample_count(
        self,
        gpu_id: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> int:
        """How many samples (of one GPU, or all) have ``since <= sampled_at < until``."""
        c = samples_table.c
        query = select(func.count()).select_from(samples_table)
        query = query.where(*self._range(c.sampled_at, since, until))
        if gpu_id is not None:
            query = query.where(c.gpu_id == gpu_id)
        with self._engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def processes(
        self, gpu_id: int, since: datetime | None = None, until: datetime | None = None
    ) -> list[ProcessRecord]:
        """Processes seen on one GPU with ``since <= sampled_at < until``, oldest first."""
        c = gpu_processes_table.c
        query = (
            select(c.gpu_id, c.sampled_at, c.pid, c.used_memory_bytes)
            .where(c.gpu_id == gpu_id, *self._range(c.sampled_at, since, until))
            .order_by(c.sampled_at, c.id)
        )
        with self._engine.connect() as conn:
            return [ProcessRecord(*row) for row in conn.execute(query)]

    def _energy_rows(
        self, conn: Connection, gpu_id: int, since_us: int | None, until_us: int | None
    ) -> Iterator[EnergySample]:
        c = samples_table.c
        t_us = _us(c.sampled_at)
        query = select(t_us, c.energy_mj, c.power_mw, c.power_avg_mw).where(c.gpu_id == gpu_id)
        if since_us is not None:
            query = query.where(t_us >= since_us)
        if until_us is not None:
            query = query.where(t_us < until_us)
        query = query.order_by(t_us, c.id)
        for t, energy_mj, power_mw, power_avg_mw in conn.execute(query):
            yield EnergySample(
                t / 1e6, energy_mj, power_mw if power_mw is not None else power_avg_mw
            )

    def gpu_energy(
        self, gpu_id: int, since: datetime | None = None, until: datetime | None = None
    ) -> EnergyResult:
        """Energy of one GPU between its samples with ``since <= sampled_at < until``.

        Counter deltas where the counter is continuous; trapezoid of power (instant, else the
        1 s average) across resets and where there is no counter. See ``energy.counters``.
        """
        since_us = None if since is None else to_epoch_us(since)
        until_us = None if until is None else to_epoch_us(until)
        with self._engine.connect() as conn:
            series = list(self._energy_rows(conn, gpu_id, since_us, until_us))
        return integrate(series, max_gap_s=self._max_gap_s)

    def span_energy(
        self, gpu_id: int, since: datetime, until: datetime | None = None
    ) -> EnergyResult:
        """Energy of one GPU over ``[since, until)`` (``until`` None: up to its latest sample),
        wherever the data still is: ``gpu_energy`` over raw samples while they reach back to
        ``since`` and the span is at most ``RAW_MAX_SPAN_S``; else the rollups' running energy
        (``segment_energy``), so that a job's energy stays the same after retention deletes its
        raw samples, and a long job is not read sample by sample. From rollups, ``n_samples`` is
        0 and counter resets and gaps are not counted (rollups do not keep them).
        """
        start_us = to_epoch_us(since)
        with self._engine.connect() as conn:
            if until is None:
                last = conn.execute(
                    select(func.max(_us(samples_table.c.sampled_at)))
                    .where(samples_table.c.gpu_id == gpu_id)
                ).scalar_one()
                end_us = start_us if last is None else max(start_us, int(last) + 1)
            else:
                end_us = max(start_us, to_epoch_us(until))
            raw = (end_us - start_us <= RAW_MAX_SPAN_S * 1e6
                   and self._raw_covers(conn, gpu_id, start_us))
        if raw:
            return self.gpu_energy(gpu_id, since, until)
        seg = self.segment_energy_us({gpu_id: [start_us, end_us]}, source="rollups")[gpu_id]
        if not seg:
            return EnergyResult(energy_mj=0.0, method="none", duration_s=0.0, n_samples=0)
        return EnergyResult(
            energy_mj=seg[0].energy_mj, method=seg[0].method,
            duration_s=(end_us - start_us) / 1e6, n_samples=0,
            counter_resets=seg[0].counter_resets, gaps=seg[0].gaps,
        )

    # -- rollups and retention -----------------------------------------------------------------

    def rollup(self, now: datetime, *, settle_s: float = ROLLUP_SETTLE_S) -> int:
        """Write one-minute rollups for every complete minute not yet rolled up.

        Idempotent: a minute is rolled up once, when complete, after the latest rolled-up minute
        of its GPU. Each interval between consecutive samples counts in the minute in which it
        ends. A minute counts as complete ``settle_s`` after it ends, so that rows still in the
        sampler's buffer land first; rows arriving for a minute after it was rolled up are not
        counted in it. Then the 10-minute and hourly buckets of complete minutes are summed, and
        every job edge (start or end) on the GPU whose hour is rolled up gets its energy mark
        (``energy_marks``), once.

        Args:
            now: Current time (aware UTC).
            settle_s: Seconds after a minute's end before it is rolled up (>= 0).

        Returns:
            How many rollup rows were written.

        Raises:
            ValueError: ``settle_s`` is negative or not finite.
            StoreWriteError: The current hour of one GPU was not written (earlier ones were).
        """
        if not (math.isfinite(settle_s) and settle_s >= 0):
            raise ValueError(f"settle_s must be a finite number >= 0 (got {settle_s})")
        end_us = _floor_minute_us(to_epoch_us(now - timedelta(seconds=settle_s)))
        written = 0
        with self._engine.connect() as conn:
            gpu_ids = list(
                conn.execute(select(gpus_table.c.id).order_by(gpus_table.c.id)).scalars()
            )
        for gpu_id in gpu_ids:
            try:
                written += self._rollup_gpu(gpu_id, end_us)
                for level_s in ROLLUP_LEVELS_S:
                    self._rollup_level(gpu_id, level_s, end_us)
                self._mark_job_edges(gpu_id)
            except SQLAlchemyError as exc:
                raise _write_error(f"rolling up GPU {gpu_id}", exc) from exc
        return written

    def _rollup_level(self, gpu_id: int, level_s: int, end_us: int) -> int:
        """Sum the minutes of every complete ``level_s`` bucket not yet written (ending by
        ``end_us``, the minute rollups' frontier)."""
        width_us = level_s * 1_000_000
        m, b = rollups_1m_table.c, rollups_levels_table.c
        m_us = _us(m.minute_start)
        stop_us = _floor(end_us, width_us)
        with self._write() as conn:
            last = conn.execute(
                select(func.max(_us(b.bucket_start))).where(
                    b.gpu_id == gpu_id, b.level_s == level_s
                )
            ).scalar_one()
            query = select(
                m_us, m.n_samples, m.energy_mj, m.mean_power_mw, m.min_power_mw,
                m.max_power_mw, m.method,
            ).where(m.gpu_id == gpu_id, m_us < stop_us)
            if last is not None:
                query = query.where(m_us >= int(last) + width_us)
            buckets: dict[int, list[Any]] = {}
            for t, n, e, mean, lo, hi, method in conn.execute(query.order_by(m_us)):
                key = _floor(int(t), width_us)
                acc = buckets.get(key)
                if acc is None:
                    acc = buckets[key] = [0, 0.0, 0.0, 0, None, None, []]
                acc[0] += n
                acc[1] += e
                if mean is not None:
                    acc[2] += mean * n
                    acc[3] += n
                if lo is not None:
                    acc[4] = lo if acc[4] is None else min(acc[4], lo)
                if hi is not None:
                    acc[5] = hi if acc[5] is None else max(acc[5], hi)
                acc[6].append(method)
            rows = [
                {
                    "gpu_id": gpu_id,
                    "level_s": level_s,
                    "bucket_start": from_epoch_us(key),
                    "n_samples": acc[0],
                    "energy_mj": acc[1],
                    "mean_power_mw": acc[2] / acc[3] if acc[3] else None,
                    "min_power_mw": acc[4],
                    "max_power_mw": acc[5],
                    "method": _combine_method_strings(acc[6]),
                }
                for key, acc in buckets.items()
            ]
            if rows:
                conn.execute(rollups_levels_table.insert(), rows)
        return len(rows)

    def _rollup_gpu(self, gpu_id: int, end_us: int) -> int:
        s, r = samples_table.c, rollups_1m_table.c
        t_us = _us(s.sampled_at)
        written = 0
        while True:
            with self._write() as conn:
                last_row = conn.execute(
                    select(_us(r.minute_start), r.energy_cum_mj)
                    .where(r.gpu_id == gpu_id)
                    .order_by(r.minute_start.desc())
                    .limit(1)
                ).first()
                last = None if last_row is None else int(last_row[0])
                cum_mj = 0.0 if last_row is None else float(last_row[1])
                first_query = select(func.min(t_us)).where(s.gpu_id == gpu_id, t_us < end_us)
                if last is not None:
                    first_query = first_query.where(t_us >= last + MINUTE_US)
                first = conn.execute(first_query).scalar_one()
                if first is None:
                    return written
                start_us = _floor_minute_us(int(first))
                stop_us = min(start_us + ROLLUP_WINDOW_US, end_us)
                prev_row = conn.execute(
                    select(t_us, s.energy_mj, s.power_mw, s.power_avg_mw)
                    .where(s.gpu_id == gpu_id, t_us < start_us)
                    .order_by(t_us.desc(), s.id.desc())
                    .limit(1)
                ).first()
                rows = self._minute_rows(
                    gpu_id,
                    cum_mj,
                    prev_row,
                    conn.execute(
                        select(t_us, s.energy_mj, s.power_mw, s.power_avg_mw)
                        .where(s.gpu_id == gpu_id, t_us >= start_us, t_us < stop_us)
                        .order_by(t_us, s.id)
                    ),
                )
                conn.execute(rollups_1m_table.insert(), rows)
                written += len(rows)

    def _minute_rows(
        self, gpu_id: int, cum_mj: float, prev_row: Any, rows: Any
    ) -> list[dict[str, Any]]:
        """Minute rollup rows from raw ``rows`` (time order) after ``prev_row`` (the sample
        before them, or ``None``); ``cum_mj``: the GPU's running energy before them."""
        minutes: dict[int, _MinuteAccumulator] = {}
        prev: EnergySample | None = None
        if prev_row is not None:
            t, e, p, pa = prev_row
            prev = EnergySample(t / 1e6, e, p if p is not None else pa)
        for t, e, p, pa in rows:
            power = p if p is not None else pa
            cur = EnergySample(t / 1e6, e, power)
            minute = _floor_minute_us(int(t))
            acc = minutes.get(minute)
            if acc is None:
                acc = minutes[minute] = _MinuteAccumulator()
            acc.n += 1
            if power is not None:
                acc.n_power += 1
                acc.sum_mw += power
                acc.min_mw = power if acc.min_mw is None else min(acc.min_mw, power)
                acc.max_mw = power if acc.max_mw is None else max(acc.max_mw, power)
            if prev is not None:
                part = interval_energy(prev, cur, max_gap_s=self._max_gap_s)
                if part.energy_mj is not None and part.method is not None:
                    acc.energy_mj += part.energy_mj
                    acc.methods.add(part.method)
            prev = cur
        out = []
        for minute, acc in minutes.items():  # in time order: rows come in time order
            cum_mj += acc.energy_mj
            out.append(
                {
                    "gpu_id": gpu_id,
                    "minute_start": from_epoch_us(minute),
                    "n_samples": acc.n,
                    "energy_mj": acc.energy_mj,
                    "mean_power_mw": acc.sum_mw / acc.n_power if acc.n_power else None,
                    "min_power_mw": acc.min_mw,
                    "max_power_mw": acc.max_mw,
                    "method": combine_methods(acc.methods),
                    "energy_cum_mj": cum_mj,
                }
            )
        return out

    def rollups(
        self, gpu_id: int, since: datetime | None = None, until: datetime | None = None
    ) -> list[RollupRecord]:
        """One GPU's rollups with ``since <= minute_start < until``, oldest first."""
        c = rollups_1m_table.c
        query = (
            select(rollups_1m_table)
            .where(c.gpu_id == gpu_id, *self._range(c.minute_start, since, until))
            .order_by(c.minute_start)
        )
        with self._engine.connect() as conn:
            return [
                RollupRecord(
                    gpu_id=row.gpu_id,
                    minute_start=row.minute_start,
                    n_samples=row.n_samples,
                    energy_mj=float(row.energy_mj),
                    mean_power_mw=None if row.mean_power_mw is None else float(row.mean_power_mw),
                    min_power_mw=row.min_power_mw,
                    max_power_mw=row.max_power_mw,
                    method=row.method,
                    energy_cum_mj=float(row.energy_cum_mj),
                )
                for row in conn.execute(query)
            ]

    def apply_retention(
        self, now: datetime, days: float, *, settle_s: float = ROLLUP_SETTLE_S
    ) -> int:
        """Delete raw samples and processes older than ``days`` before ``now``; rollups stay.

        Rolls up first, and never deletes a sample that is not yet rolled up, nor the last
        rolled-up sample of a GPU (the start of the next minute's first interval).

        Args:
            now: Current time (aware UTC).
            days: Retention in days (> 0).
            settle_s: Passed to ``rollup``.

        Returns:
            How many sample rows were deleted.

        Raises:
            ValueError: ``days`` is not a positive finite number.
            StoreWriteError: That GPU's deletions were not made (earlier GPUs' were).
        """
        if not (math.isfinite(days) and days > 0):
            raise ValueError(f"retention must be a positive number of days (got {days})")
        self.rollup(now, settle_s=settle_s)
        cutoff_us = to_epoch_us(now - timedelta(days=days))
        s, p, r = samples_table.c, gpu_processes_table.c, rollups_1m_table.c
        t_us, pt_us = _us(s.sampled_at), _us(p.sampled_at)
        deleted = 0
        with self._engine.connect() as conn:
            gpu_ids = list(
                conn.execute(select(gpus_table.c.id).order_by(gpus_table.c.id)).scalars()
            )
        for gpu_id in gpu_ids:
            try:
                with self._write() as conn:
                    last = conn.execute(
                        select(func.max(_us(r.minute_start))).where(r.gpu_id == gpu_id)
                    ).scalar_one()
                    if last is None:
                        continue
                    rolled_until_us = int(last) + MINUTE_US
                    keep_us = conn.execute(
                        select(func.max(t_us)).where(s.gpu_id == gpu_id, t_us < rolled_until_us)
                    ).scalar_one()
                    bound_us = min(cutoff_us, int(keep_us) if keep_us is not None else cutoff_us)
                    result = conn.execute(
                        samples_table.delete().where(s.gpu_id == gpu_id, t_us < bound_us)
                    )
                    deleted += result.rowcount
                    conn.execute(
                        gpu_processes_table.delete().where(p.gpu_id == gpu_id, pt_us < bound_us)
                    )
            except SQLAlchemyError as exc:
                raise _write_error(f"retention for GPU {gpu_id}", exc) from exc
        return deleted

    def level_rollups(
        self,
        gpu_id: int,
        level_s: int,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[BucketRecord]:
        """One GPU's ``level_s`` buckets with ``since <= start < until``, oldest first."""
        c = rollups_levels_table.c
        query = (
            select(rollups_levels_table)
            .where(
                c.gpu_id == gpu_id,
                c.level_s == level_s,
                *self._range(c.bucket_start, since, until),
            )
            .order_by(c.bucket_start)
        )
        with self._engine.connect() as conn:
            return [
                BucketRecord(
                    gpu_id=row.gpu_id,
                    level_s=row.level_s,
                    start=row.bucket_start,
                    n_samples=row.n_samples,
                    energy_mj=float(row.energy_mj),
                    mean_power_mw=None if row.mean_power_mw is None else float(row.mean_power_mw),
                    min_power_mw=row.min_power_mw,
                    max_power_mw=row.max_power_mw,
                    method=row.method,
                )
                for row in conn.execute(query)
            ]

    # -- energy between breakpoints (reports) ------------------------------------------------

    def _frontiers(self, conn: Connection, gpu_id: int) -> dict[int, int]:
        """Where each rollup level of one GPU ends: level width (60 for minutes) to the end of
        its latest row, epoch µs; levels without rows are absent."""
        m, b = rollups_1m_table.c, rollups_levels_table.c
        out: dict[int, int] = {}
        last = conn.execute(
            select(func.max(_us(m.minute_start))).where(m.gpu_id == gpu_id)
        ).scalar_one()
        if last is not None:
            out[60] = int(last) + MINUTE_US
        for level_s in ROLLUP_LEVELS_S:
            last = conn.execute(
                select(func.max(_us(b.bucket_start))).where(
                    b.gpu_id == gpu_id, b.level_s == level_s
                )
            ).scalar_one()
            if last is not None:
                out[level_s] = int(last) + level_s * 1_000_000
        return out

    def _raw_covers(self, conn: Connection, gpu_id: int, start_us: int) -> bool:
        """Whether raw samples reach back to ``start_us``: the GPU's first kept sample is no
        later, or no rollup is older than it (retention deletes samples, never rollups, so
        rollups from before the first sample mean older samples were deleted)."""
        s, m = samples_table.c, rollups_1m_table.c
        first_sample = conn.execute(
            select(func.min(_us(s.sampled_at))).where(s.gpu_id == gpu_id)
        ).scalar_one()
        if first_sample is None:
            return False
        if int(first_sample) <= start_us:
            return True
        first_minute = conn.execute(
            select(func.min(_us(m.minute_start))).where(m.gpu_id == gpu_id)
        ).scalar_one()
        return first_minute is None or int(first_minute) >= _floor(int(first_sample), MINUTE_US)

    def segment_energy(
        self,
        points: Mapping[int, Sequence[datetime]],
        *,
        source: EnergySource | Literal["auto"] = "auto",
    ) -> dict[int, list[SegmentEnergy]]:
        """Energy of each GPU between consecutive breakpoints, for many GPUs in a few queries.

        Which data is read (``source="auto"``): a GPU whose breakpoints span at most
        ``RAW_MAX_SPAN_S`` and whose raw samples still reach back that far is read from raw
        samples; an interval between two samples that straddles a breakpoint is split in
        proportion to time. Otherwise rollups are read: a segment's energy is the difference of
        the GPU's running rolled-up energy at its two ends (``rollups_1m.energy_cum_mj``, sums of
        counter deltas); a breakpoint inside a minute takes the part of that minute's energy
        that the raw samples' energy counter puts before it (in proportion to time where the
        samples are gone or have no counter). Job edges read all of that from their energy
        mark (``energy_marks``, written by ``rollup``); other breakpoints compute it here. The
        highest power and the methods come from the minutes at a segment's ends and the hourly
        (else 10-minute) buckets between. Time after a GPU's latest minute rollup (the minute in
        progress) comes from raw samples.

        Args:
            points: GPU id to its breakpoints (aware UTC; sorted and deduplicated here; fewer
                than two give no segment).
            source: ``auto``, or force ``samples`` or ``rollups`` (tests, benchmarks).

        Returns:
            GPU id to one ``SegmentEnergy`` per pair of consecutive breakpoints.
        """
        return {
            gpu_id: [
                SegmentEnergy(
                    start=from_epoch_us(seg.start_us),
                    end=from_epoch_us(seg.end_us),
                    energy_mj=seg.energy_mj,
                    max_power_mw=seg.max_power_mw,
                    method=seg.method,
                    source=seg.source,
                    counter_resets=seg.counter_resets,
                    gaps=seg.gaps,
                )
                for seg in segs
            ]
            for gpu_id, segs in self.segment_energy_us(
                {g: [to_epoch_us(p) for p in ps] for g, ps in points.items()}, source=source
            ).items()
        }

    def segment_energy_us(
        self,
        points_us: Mapping[int, Sequence[int]],
        *,
        source: EnergySource | Literal["auto"] = "auto",
    ) -> dict[int, list[SegmentEnergyUs]]:
        """``segment_energy`` with breakpoints and segment ends as epoch microseconds."""
        out: dict[int, list[SegmentEnergyUs]] = {}
        accs: dict[int, list[_SegmentAcc]] = {}
        bps_us: dict[int, list[int]] = {}
        sources: dict[int, EnergySource] = {}
        rolled: list[tuple[int, list[int], int]] = []  # gpu, breakpoints, minute frontier
        with self._engine.connect() as conn:
            all_bps = {g: sorted(set(ps)) for g, ps in points_us.items()}
            long_gpus = {
                g for g, bps in all_bps.items()
                if len(bps) >= 2 and source != "samples" and (
                    source == "rollups" or (bps[-1] - bps[0]) > RAW_MAX_SPAN_S * 1e6
                )
            }
            frontiers = self._frontiers_many(conn, sorted(long_gpus))
            for gpu_id, bps in all_bps.items():
                bps_us[gpu_id] = bps
                if len(bps) < 2:
                    out[gpu_id] = []
                    continue
                seg_accs = [_SegmentAcc() for _ in range(len(bps) - 1)]
                accs[gpu_id] = seg_accs
                use_raw = source == "samples" or (
                    source == "auto"
                    and gpu_id not in long_gpus
                    and self._raw_covers(conn, gpu_id, bps[0])
                )
                if use_raw:
                    sources[gpu_id] = "samples"
                    self._raw_segments(conn, gpu_id, bps, seg_accs, leading=False)
                    continue
                sources[gpu_id] = "rollups"
                gpu_frontiers = frontiers.get(gpu_id)
                if gpu_frontiers is None:
                    gpu_frontiers = self._frontiers(conn, gpu_id)
                    frontiers[gpu_id] = gpu_frontiers
                minute_end = gpu_frontiers.get(60, bps[0])
                rolled.append((gpu_id, bps, minute_end))
                if bps[-1] > minute_end:
                    tail = [max(minute_end, bps[0])] + [p for p in bps if p > minute_end]
                    tail_accs = [_SegmentAcc() for _ in range(len(tail) - 1)]
                    self._raw_segments(conn, gpu_id, tail, tail_accs, leading=True)
                    for j, acc in enumerate(tail_accs):
                        # the tail segment [tail[j], ...) lies in the segment containing tail[j]
                        i = bisect_right(bps, tail[j]) - 1
                        target = seg_accs[i]
                        target.energy_mj += acc.energy_mj
                        target.peak(acc.max_mw)
                        target.methods |= acc.methods
                        target.resets += acc.resets
                        target.gaps += acc.gaps
            if rolled:
                self._rollup_segments(conn, rolled, frontiers, accs)
        for gpu_id, seg_accs in accs.items():
            bps = bps_us[gpu_id]
            src = sources[gpu_id]
            out[gpu_id] = [
                SegmentEnergyUs(
                    bps[i], bps[i + 1], acc.energy_mj, acc.max_mw, acc.method(), src,
                    acc.resets, acc.gaps,
                )
                for i, acc in enumerate(seg_accs)
            ]
        return out

    def _rollup_segments(
        self,
        conn: Connection,
        rolled: Sequence[tuple[int, list[int], int]],
        frontiers: Mapping[int, dict[int, int]],
        accs: dict[int, list[_SegmentAcc]],
    ) -> None:
        """Add the rolled-up part of each segment (before its GPU's minute frontier) into
        ``accs``: energy from the marks at its ends; peak and methods from the later mark when
        it is linked to the earlier one, else from the marks' hours and the buckets between
        (see ``segment_energy``)."""
        cuts: list[tuple[int, int, int, int]] = []  # gpu, segment index, a, b (epoch µs)
        wanted: set[tuple[int, int]] = set()
        for gpu_id, bps, minute_end in rolled:
            for i in range(len(bps) - 1):
                a, b = bps[i], min(bps[i + 1], minute_end)
                if a < b:
                    cuts.append((gpu_id, i, a, b))
                    wanted.add((gpu_id, a))
                    wanted.add((gpu_id, b))
        marks = self._stored_marks(conn, wanted)
        marks.update(self._compute_marks(conn, wanted - marks.keys()))
        unlinked: list[tuple[_SegmentAcc, int, int, int]] = []
        for gpu_id, i, a, b in cuts:
            acc = accs[gpu_id][i]
            ma, mb = marks[(gpu_id, a)], marks[(gpu_id, b)]
            energy = mb.energy_mj - ma.energy_mj
            if a - a % MINUTE_US == b - b % MINUTE_US and energy < 0.0:
                energy = 0.0  # within one minute: as a share of it, never below nothing
            acc.energy_mj += energy
            if mb.prev_at_us == a and mb.from_prev_method is not None:
                acc.peak(mb.from_prev_max_mw)
                acc.methods.add(mb.from_prev_method)
            else:
                unlinked.append((acc, gpu_id, a, b))
        self._add_range_stats(conn, unlinked, marks, frontiers)

    def _add_range_stats(
        self,
        conn: Connection,
        items: Sequence[tuple[_SegmentAcc, int, int, int]],
        marks: Mapping[tuple[int, int], _Mark],
        frontiers: Mapping[int, dict[int, int]],
    ) -> None:
        """Add into each ``(acc, gpu_id, a, b)``'s accumulator the highest power and the methods
        of the minutes that ``[a, b)`` (epoch µs, both with marks) touches: the minutes
        themselves within one hour; else the marks' parts of the end hours and the hourly (else
        10-minute, else minute) rollups between."""
        minute_pieces: list[tuple[int, int, int, int]] = []  # id, gpu, lo, hi
        level_pieces: list[tuple[int, int, int, int, int]] = []  # id, gpu, level, lo, hi
        piece_owner: list[_SegmentAcc] = []
        for acc, gpu_id, a, b in items:
            ha, hb = a - a % HOUR_US, b - b % HOUR_US
            if ha == hb:  # within one hour: the minutes it touches
                piece_owner.append(acc)
                minute_pieces.append(
                    (len(piece_owner) - 1, gpu_id, a - a % MINUTE_US, _ceil(b, MINUTE_US))
                )
                continue
            ma, mb = marks[(gpu_id, a)], marks[(gpu_id, b)]
            acc.peak(ma.after_max_mw)
            acc.peak(mb.before_max_mw)
            acc.methods.add(ma.after_method)
            acc.methods.add(mb.before_method)
            lo = ha + HOUR_US
            if lo >= hb:
                continue
            gpu_frontiers = frontiers[gpu_id]
            if hb <= gpu_frontiers.get(_HOUR_S, 0):  # whole hours, all rolled up
                piece_owner.append(acc)
                level_pieces.append((len(piece_owner) - 1, gpu_id, _HOUR_S, lo, hb))
                continue
            full: list[tuple[str, int, int, int, float]] = []
            levels = sorted((x for x in ROLLUP_LEVELS_S if x in gpu_frontiers), reverse=True)
            _decompose(lo, hb, levels, gpu_frontiers, full)
            for kind, level_s, p_lo, p_hi, _ in full:
                piece_owner.append(acc)
                if kind == "m":
                    minute_pieces.append((len(piece_owner) - 1, gpu_id, p_lo, p_hi))
                else:
                    level_pieces.append((len(piece_owner) - 1, gpu_id, level_s, p_lo, p_hi))
        stats = "MAX(r.max_power_mw), " + ", ".join(
            f"{fn}(CASE WHEN r.method <> 'none' THEN r.method END)" for fn in ("MIN", "MAX")
        )
        for chunk_start in range(0, len(minute_pieces), _VALUES_CHUNK):
            chunk = minute_pieces[chunk_start : chunk_start + _VALUES_CHUNK]
            self._add_stats(conn.exec_driver_sql(
                f"WITH p(id, gpu_id, lo, hi) AS (VALUES {_values_sql(chunk)}) "
                f"SELECT p.id, {stats} FROM p JOIN rollups_1m r ON r.gpu_id = p.gpu_id "
                "AND r.minute_start >= p.lo AND r.minute_start < p.hi GROUP BY p.id"
            ).all(), piece_owner)
        for chunk_start in range(0, len(level_pieces), _VALUES_CHUNK):
            chunk_l = level_pieces[chunk_start : chunk_start + _VALUES_CHUNK]
            self._add_stats(conn.exec_driver_sql(
                f"WITH p(id, gpu_id, level_s, lo, hi) AS (VALUES {_values_sql(chunk_l)}) "
                f"SELECT p.id, {stats} FROM p JOIN rollups_levels r ON r.gpu_id = p.gpu_id "
                "AND r.level_s = p.level_s "
                "AND r.bucket_start >= p.lo AND r.bucket_start < p.hi GROUP BY p.id"
            ).all(), piece_owner)

    @staticmethod
    def _add_stats(rows: Any, owner: Sequence[_SegmentAcc]) -> None:
        for pid, max_mw, m_lo, m_hi in rows:
            acc = owner[int(pid)]
            acc.peak(None if max_mw is None else int(max_mw))
            if m_lo is not None:
                acc.methods.add(str(m_lo))
                acc.methods.add(str(m_hi))

    def _frontiers_many(
        self, conn: Connection, gpu_ids: Sequence[int]
    ) -> dict[int, dict[int, int]]:
        """``_frontiers`` of several GPUs in one query."""
        if not gpu_ids:
            return {}
        levels = ", ".join(
            f"(SELECT MAX(b.bucket_start) FROM rollups_levels b WHERE b.gpu_id = q.g "
            f"AND b.level_s = {int(level_s)})"
            for level_s in ROLLUP_LEVELS_S
        )
        rows = conn.exec_driver_sql(
            f"WITH q(g) AS (VALUES {_values_sql([(g,) for g in gpu_ids])}) SELECT q.g, "
            f"(SELECT MAX(m.minute_start) FROM rollups_1m m WHERE m.gpu_id = q.g), {levels} "
            "FROM q"
        )
        out: dict[int, dict[int, int]] = {}
        for g, last_minute, *last_levels in rows:
            found: dict[int, int] = {}
            if last_minute is not None:
                found[60] = int(last_minute) + MINUTE_US
            for level_s, last in zip(ROLLUP_LEVELS_S, last_levels, strict=True):
                if last is not None:
                    found[level_s] = int(last) + level_s * 1_000_000
            if found:
                out[int(g)] = found
        return out

    def _stored_marks(
        self, conn: Connection, keys: set[tuple[int, int]]
    ) -> dict[tuple[int, int], _Mark]:
        """The energy marks stored for ``(gpu_id, at µs)`` keys (those that have one).

        One range read over the keys' GPUs and span (marks are few: two per job and GPU)."""
        if not keys:
            return {}
        gpu_ids = sorted({g for g, _ in keys})
        times = [t for _, t in keys]
        rows = conn.exec_driver_sql(
            f"SELECT {_MARK_COLUMNS} FROM energy_marks m "
            f"WHERE m.gpu_id IN ({', '.join(str(int(g)) for g in gpu_ids)}) "
            f"AND m.at >= {int(min(times))} AND m.at <= {int(max(times))}"
        ).all()
        out = {(g, t): _Mark(*fields) for g, t, *fields in rows}
        return {key: out[key] for key in keys & out.keys()}

    def _link_marks(self, conn: Connection, gpu_id: int, from_us: int) -> None:
        """Link each of a GPU's marks from ``from_us`` on (and the one after the last of them)
        to its previous mark, where it is not yet: ``prev_at`` and the ``from_prev_*`` summary
        of the minutes between."""
        start = conn.exec_driver_sql(
            f"SELECT MAX(at) FROM energy_marks WHERE gpu_id = {int(gpu_id)} "
            f"AND at < {int(from_us)}"
        ).scalar_one()
        rows = conn.exec_driver_sql(
            f"SELECT {_MARK_COLUMNS} FROM energy_marks m WHERE m.gpu_id = {int(gpu_id)} "
            f"AND m.at >= {int(from_us if start is None else start)} ORDER BY m.at"
        ).all()
        marks = {(gpu_id, int(t)): _mark_of(fields) for _, t, *fields in rows}
        times = sorted(t for _, t in marks)
        todo = [
            (_SegmentAcc(), gpu_id, a, b)
            for a, b in pairwise(times)
            if marks[(gpu_id, b)].prev_at_us != a
        ]
        if not todo:
            return
        self._add_range_stats(conn, todo, marks, {gpu_id: self._frontiers(conn, gpu_id)})
        m = energy_marks_table.c
        conn.execute(
            update(energy_marks_table)
            .where(m.gpu_id == gpu_id, _us(m.at) == bindparam("b_at", type_=BigInteger()))
            .values(
                prev_at=bindparam("b_prev_at"),
                from_prev_max_mw=bindparam("b_max_mw"),
                from_prev_method=bindparam("b_method"),
            ),
            [
                {"b_at": b, "b_prev_at": from_epoch_us(a), "b_max_mw": acc.max_mw,
                 "b_method": acc.method()}
                for acc, _, a, b in todo
            ],
        )

    def _compute_marks(
        self, conn: Connection, keys: set[tuple[int, int]]
    ) -> dict[tuple[int, int], _Mark]:
        """Energy marks of ``(gpu_id, at µs)`` keys from the minute rollups and raw samples (see
        ``EnergyMark`` in ``telemetry.store.models``)."""
        todo = sorted(keys)
        base: dict[tuple[int, int], tuple[float, float]] = {}  # cum before the minute, its energy
        hours: dict[tuple[int, int], tuple[Any, ...]] = {}
        for chunk_start in range(0, len(todo), _VALUES_CHUNK):
            chunk = todo[chunk_start : chunk_start + _VALUES_CHUNK]
            q = [(i, g, x - x % MINUTE_US) for i, (g, x) in enumerate(chunk)]
            for i, cum, energy in conn.exec_driver_sql(
                f"WITH q(id, g, m) AS (VALUES {_values_sql(q)}) SELECT q.id, "
                "(SELECT r.energy_cum_mj FROM rollups_1m r WHERE r.gpu_id = q.g "
                "AND r.minute_start < q.m ORDER BY r.minute_start DESC LIMIT 1), "
                "(SELECT r.energy_mj FROM rollups_1m r WHERE r.gpu_id = q.g "
                "AND r.minute_start = q.m) FROM q"
            ):
                base[chunk[int(i)]] = (
                    0.0 if cum is None else float(cum), 0.0 if energy is None else float(energy)
                )
            q2 = [
                (i, g, x - x % HOUR_US, x - x % HOUR_US + HOUR_US, _ceil(x, MINUTE_US),
                 x - x % MINUTE_US)
                for i, (g, x) in enumerate(chunk)
            ]
            before = "r.minute_start < q.cut"
            after = "r.minute_start >= q.m"
            method = "CASE WHEN {} AND r.method <> 'none' THEN r.method END"
            for i, *stats in conn.exec_driver_sql(
                f"WITH q(id, g, h, he, cut, m) AS (VALUES {_values_sql(q2)}) SELECT q.id, "
                f"MAX(CASE WHEN {before} THEN r.max_power_mw END), "
                f"MIN({method.format(before)}), MAX({method.format(before)}), "
                f"MAX(CASE WHEN {after} THEN r.max_power_mw END), "
                f"MIN({method.format(after)}), MAX({method.format(after)}) "
                "FROM q JOIN rollups_1m r ON r.gpu_id = q.g AND r.minute_start >= q.h "
                "AND r.minute_start < q.he GROUP BY q.id"
            ):
                hours[chunk[int(i)]] = tuple(stats)
        fractions = self._minute_fractions(
            conn,
            {(g, x - x % MINUTE_US, x) for (g, x), (_, e) in base.items()
             if e and x % MINUTE_US},
        )
        out: dict[tuple[int, int], _Mark] = {}
        for key, (cum, energy) in base.items():
            g, x = key
            w = fractions.get((g, x - x % MINUTE_US, x), 0.0)
            b_max, b_lo, b_hi, a_max, a_lo, a_hi = hours.get(key, (None,) * 6)
            out[key] = _Mark(
                cum + w * energy,
                None if b_max is None else int(b_max),
                _combine_method_strings([b_lo, b_hi]),
                None if a_max is None else int(a_max),
                _combine_method_strings([a_lo, a_hi]),
            )
        return out

    def _mark_job_edges(self, gpu_id: int) -> int:
        """Store the energy marks of the job edges on one GPU whose hour is rolled up and that
        have none yet; return how many were written."""
        j, jg, m, r = jobs_table.c, job_gpus_table.c, energy_marks_table.c, rollups_1m_table.c
        with self._write() as conn:
            last = conn.execute(
                select(func.max(_us(r.minute_start))).where(r.gpu_id == gpu_id)
            ).scalar_one()
            if last is None:
                return 0
            ready_us = _floor(int(last) + MINUTE_US, HOUR_US)  # hours before it are rolled up
            edges: set[int] = set()
            for column in (j.started_at, j.ended_at):
                t_us = _us(column)
                query = (
                    select(t_us)
                    .select_from(jobs_table.join(job_gpus_table, jg.job_id == j.id))
                    .where(jg.gpu_id == gpu_id, column.is_not(None), t_us < ready_us)
                    .where(~select(m.gpu_id).where(m.gpu_id == gpu_id, _us(m.at) == t_us)
                           .exists())
                )
                edges.update(int(t) for t in conn.execute(query).scalars())
            if not edges:
                return 0
            marks = self._compute_marks(conn, {(gpu_id, t) for t in edges})
            conn.execute(
                energy_marks_table.insert(),
                [
                    {
                        "gpu_id": gpu_id,
                        "at": from_epoch_us(t),
                        "energy_cum_mj": mark.energy_mj,
                        "before_max_mw": mark.before_max_mw,
                        "before_method": mark.before_method,
                        "after_max_mw": mark.after_max_mw,
                        "after_method": mark.after_method,
                    }
                    for (_, t), mark in sorted(marks.items())
                ],
            )
            self._link_marks(conn, gpu_id, min(edges))
        return len(marks)

    def _minute_fractions(
        self, conn: Connection, cuts: set[tuple[int, int, int]]
    ) -> dict[tuple[int, int, int], float]:
        """The share of a minute's rolled-up energy that lies before a time inside it.

        For ``(gpu_id, minute, x)``: the energy counter interpolated at ``x`` between the raw
        samples around it, less the counter at the minute's first interval's start (the last
        sample before the minute), over the whole minute's counter delta. Where raw samples are
        gone (retention), lack a counter, or the counter restarted, the share of time instead.
        """
        out: dict[tuple[int, int, int], float] = {}
        todo: list[tuple[int, int, int, int]] = []
        for g, m, x in cuts:
            if x <= m:
                out[(g, m, x)] = 0.0
            elif x >= m + MINUTE_US:
                out[(g, m, x)] = 1.0
            else:
                out[(g, m, x)] = (x - m) / MINUTE_US
                todo.append((len(todo), g, m, x))

        def seek(value: str, op: str, bound: str, order: str) -> str:
            return (f"(SELECT s.{value} FROM samples s WHERE s.gpu_id = q.gpu_id "
                    f"AND s.sampled_at {op} {bound} ORDER BY s.sampled_at {order} LIMIT 1)")

        for chunk_start in range(0, len(todo), _VALUES_CHUNK):
            chunk = todo[chunk_start : chunk_start + _VALUES_CHUNK]
            sql = (
                f"WITH q(id, gpu_id, m, x) AS (VALUES {_values_sql(chunk)}) SELECT q.id, "
                + ", ".join([
                    # the minute's first interval starts at the last sample before it, or at
                    # its own first sample when there is none (the GPU's first minute)
                    f"COALESCE({seek('energy_mj', '<', 'q.m', 'DESC')}, "
                    f"{seek('energy_mj', '>=', 'q.m', 'ASC')})",
                    seek("energy_mj", "<", f"q.m + {MINUTE_US}", "DESC"),
                    seek("sampled_at", "<=", "q.x", "DESC"),
                    seek("energy_mj", "<=", "q.x", "DESC"),
                    seek("sampled_at", ">", "q.x", "ASC"),
                    seek("energy_mj", ">", "q.x", "ASC"),
                ])
                + " FROM q"
            )
            for qid, c0, ck, t_lo, c_lo, t_hi, c_hi in conn.exec_driver_sql(sql):
                _, g, m, x = chunk[int(qid) - chunk_start]
                if c0 is None or ck is None or c_lo is None or ck <= c0 or c_lo < c0:
                    continue
                c_x = float(c_lo)
                if t_hi is not None and c_hi is not None and c_hi >= c_lo and t_hi > t_lo:
                    c_x += (c_hi - c_lo) * (x - int(t_lo)) / (int(t_hi) - int(t_lo))
                out[(g, m, x)] = min(1.0, max(0.0, (c_x - c0) / (ck - c0)))
        return out

    def _raw_segments(
        self,
        conn: Connection,
        gpu_id: int,
        bps: Sequence[int],
        accs: Sequence[_SegmentAcc],
        *,
        leading: bool,
    ) -> None:
        """Add raw-sample energy between breakpoints ``bps`` (epoch µs) into ``accs``.

        An interval between two samples is split across breakpoints in proportion to time. With
        ``leading``, the part of the first interval before ``bps[0]`` counts in the first
        segment (rollups count an interval in the minute where it ends).
        """
        s = samples_table.c
        t_us = _us(s.sampled_at)
        cols = (t_us, s.energy_mj, s.power_mw, s.power_avg_mw)
        start, stop = bps[0], bps[-1]
        before = conn.execute(
            select(*cols)
            .where(s.gpu_id == gpu_id, t_us < start)
            .order_by(t_us.desc(), s.id.desc())
            .limit(1)
        ).first()
        after = conn.execute(
            select(*cols).where(s.gpu_id == gpu_id, t_us >= stop).order_by(t_us, s.id).limit(1)
        ).first()
        inside = conn.execute(
            select(*cols)
            .where(s.gpu_id == gpu_id, t_us >= start, t_us < stop)
            .order_by(t_us, s.id)
        )
        n = len(accs)
        j = 0
        prev: EnergySample | None = None
        prev_us = 0
        rows: Iterator[Any] = _chain_rows(before, inside, after)
        for t, e, p, pa in rows:
            power = p if p is not None else pa
            cur = EnergySample(t / 1e6, e, power)
            t_int = int(t)
            if start <= t_int < stop:
                while j + 1 < n and bps[j + 1] <= t_int:
                    j += 1
                accs[j].peak(power)
            if prev is not None:
                part = interval_energy(prev, cur, max_gap_s=self._max_gap_s)
                if part.energy_mj is not None and part.method is not None:
                    _spread(part.energy_mj, part.method, part.counter_reset, part.gap,
                            prev_us, t_int, bps, accs, leading=leading)
            prev, prev_us = cur, t_int

    # -- chart series and progress -------------------------------------------------------------

    def power_series(
        self, gpu_id: int, since: datetime, until: datetime, *, max_points: int = 600
    ) -> list[PowerPoint]:
        """One GPU's power over ``[since, until)`` in at most about ``max_points`` buckets.

        Raw samples averaged per bucket where the range is short enough for them
        (``RAW_MAX_SPAN_S``) and they are kept; else the finest rollup level with at most
        ``max_points`` buckets (mean power = bucket energy / width), then minutes after that
        level's latest bucket.
        """
        since_us, until_us = to_epoch_us(since), to_epoch_us(until)
        span_us = until_us - since_us
        if span_us <= 0:
            return []
        bucket_us = max(1_000_000, _ceil(span_us // max_points + 1, 1_000_000))
        with self._engine.connect() as conn:
            if span_us <= RAW_MAX_SPAN_S * 1e6 and self._raw_covers(conn, gpu_id, since_us):
                return self._raw_power(conn, gpu_id, since_us, until_us, bucket_us)
            frontiers = self._frontiers(conn, gpu_id)
            level_s = 60
            for candidate in ROLLUP_LEVELS_S:
                if span_us / (level_s * 1e6) <= max_points:
                    break
                if candidate in frontiers:
                    level_s = candidate
            points: list[PowerPoint] = []
            minutes_from = since
            if level_s != 60:
                width = timedelta(seconds=level_s)
                for bucket in self.level_rollups(gpu_id, level_s, since, until):
                    points.append(PowerPoint(bucket.start, bucket.start + width,
                                             bucket.energy_mj / level_s, bucket.max_power_mw))
                minutes_from = max(since, from_epoch_us(frontiers[level_s]))
            for r in self.rollups(gpu_id, minutes_from, until):
                points.append(PowerPoint(r.minute_start, r.minute_start + timedelta(minutes=1),
                                         r.energy_mj / 60.0, r.max_power_mw))
            # after the latest minute rollup (the minute in progress, or never rolled up): raw
            raw_from = max(since_us, frontiers.get(60, since_us))
            if raw_from < until_us:
                points.extend(self._raw_power(conn, gpu_id, raw_from, until_us, bucket_us))
        return points

    def _raw_power(
        self, conn: Connection, gpu_id: int, since_us: int, until_us: int, bucket_us: int
    ) -> list[PowerPoint]:
        s = samples_table.c
        t_us = _us(s.sampled_at)
        power = func.coalesce(s.power_mw, s.power_avg_mw)
        key = (t_us - since_us) // bucket_us
        query = (
            select(type_coerce(key, BigInteger), func.avg(power), func.max(power))
            .where(s.gpu_id == gpu_id, t_us >= since_us, t_us < until_us)
            .group_by(key)
            .order_by(key)
        )
        out = []
        for k, mean, peak in conn.execute(query):
            if mean is None:
                continue
            lo = since_us + int(k) * bucket_us
            out.append(PowerPoint(from_epoch_us(lo), from_epoch_us(min(lo + bucket_us, until_us)),
                                  float(mean), None if peak is None else int(peak)))
        return out

    def progress_at(self, queries: Sequence[tuple[int, datetime]]) -> list[ProgressAt]:
        """Cumulative progress of jobs at given times, in a few queries.

        Args:
            queries: ``(job_id, at)`` pairs (aware UTC).

        Returns:
            For each pair, the job's latest report with ``at <= t`` (``None`` fields: none yet).
        """
        return self.progress_at_us([(job_id, to_epoch_us(t)) for job_id, t in queries])

    def progress_at_us(self, queries: Sequence[tuple[int, int]]) -> list[ProgressAt]:
        """``progress_at`` with times as epoch microseconds."""
        out: list[ProgressAt] = [ProgressAt(None, None, None)] * len(queries)
        rows = [(i, job_id, t_us) for i, (job_id, t_us) in enumerate(queries)]
        with self._engine.connect() as conn:
            for chunk_start in range(0, len(rows), _VALUES_CHUNK):
                chunk = rows[chunk_start : chunk_start + _VALUES_CHUNK]
                sql = (
                    f"WITH q(id, job_id, t) AS (VALUES {_values_sql(chunk)}) "
                    "SELECT q.id, pr.steps, pr.samples, pr.tokens FROM q "
                    "JOIN job_progress pr ON pr.id = ("
                    "SELECT x.id FROM job_progress x WHERE x.job_id = q.job_id AND x.at <= q.t "
                    "ORDER BY x.at DESC, x.id DESC LIMIT 1)"
                )
                for i, steps, samples, tokens in conn.exec_driver_sql(sql).all():
                    out[int(i)] = ProgressAt(steps, samples, tokens)
        return out

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()


def _chain_rows(before: Any, inside: Any, after: Any) -> Iterator[Any]:
    if before is not None:
        yield before
    yield from inside
    if after is not None:
        yield after


def _spread(
    energy_mj: float,
    method: str,
    reset: bool,
    gap: bool,
    t0: int,
    t1: int,
    bps: Sequence[int],
    accs: Sequence[_SegmentAcc],
    *,
    leading: bool,
) -> None:
    """Split one interval's energy (epoch µs ``t0`` to ``t1``) over the segments it overlaps,
    in proportion to time; resets and gaps count where the interval ends. With ``leading``,
    the first segment reaches back without bound."""
    n = len(accs)

    def add(i: int, share: float, flags: bool) -> None:
        acc = accs[i]
        acc.energy_mj += share
        acc.methods.add(method)
        if flags:
            acc.resets += reset
            acc.gaps += gap

    if t1 <= t0:
        if (leading or t1 >= bps[0]) and t1 < bps[-1]:
            add(max(0, bisect_right(bps, t1) - 1), energy_mj, True)
        return
    dt = t1 - t0
    i = max(0, bisect_right(bps, t0) - 1)
    while i < n:
        lower = t0 if (leading and i == 0) else bps[i]
        if lower >= t1:
            break
        a, b = max(t0, lower), min(t1, bps[i + 1])
        if b > a:
            add(i, energy_mj * (b - a) / dt, b == t1 or i + 1 == n)
        i += 1


def _decompose(
    lo: int,
    hi: int,
    levels: Sequence[int],
    frontiers: dict[int, int],
    out: list[tuple[str, int, int, int, float]],
) -> None:
    if lo >= hi:
        return
    if not levels:
        out.append(("m", 60, lo, hi, 1.0))
        return
    level_s, finer = levels[0], levels[1:]
    width = level_s * 1_000_000
    cl, fh = _ceil(lo, width), min(_floor(hi, width), frontiers[level_s])
    if cl >= fh:
        _decompose(lo, hi, finer, frontiers, out)
        return
    _decompose(lo, cl, finer, frontiers, out)
    out.append(("l", level_s, cl, fh, 1.0))
    _decompose(fh, hi, finer, frontiers, out)
