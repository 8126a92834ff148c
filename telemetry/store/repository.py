"""The repository: every read and write of GPU telemetry, returning plain frozen dataclasses."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

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
    from_epoch_us,
    gpu_processes_table,
    gpus_table,
    rollups_1m_table,
    samples_table,
    to_epoch_us,
)

if TYPE_CHECKING:
    from telemetry.store.jobs import JobStore

MINUTE_US = 60_000_000
ROLLUP_SETTLE_S = 10.0
"""A minute is rolled up this many seconds after it ends (the sampler flushes every second)."""
ROLLUP_WINDOW_US = 60 * MINUTE_US
"""Rollups of a long backlog are written an hour at a time, each hour in its own transaction."""

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
    """

    gpu_id: int
    minute_start: datetime
    n_samples: int
    energy_mj: float
    mean_power_mw: float | None
    min_power_mw: int | None
    max_power_mw: int | None
    method: str


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

            self._jobs = JobStore(self._engine, gpu_energy=self.gpu_energy)
        return self._jobs

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

    # -- rollups and retention -----------------------------------------------------------------

    def rollup(self, now: datetime, *, settle_s: float = ROLLUP_SETTLE_S) -> int:
        """Write one-minute rollups for every complete minute not yet rolled up.

        Idempotent: a minute is rolled up once, when complete, after the latest rolled-up minute
        of its GPU. Each interval between consecutive samples counts in the minute in which it
        ends. A minute counts as complete ``settle_s`` after it ends, so that rows still in the
        sampler's buffer land first; rows arriving for a minute after it was rolled up are not
        counted in it.

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
            except SQLAlchemyError as exc:
                raise _write_error(f"rolling up GPU {gpu_id}", exc) from exc
        return written

    def _rollup_gpu(self, gpu_id: int, end_us: int) -> int:
        s, r = samples_table.c, rollups_1m_table.c
        t_us = _us(s.sampled_at)
        written = 0
        while True:
            with self._write() as conn:
                last = conn.execute(
                    select(func.max(_us(r.minute_start))).where(r.gpu_id == gpu_id)
                ).scalar_one()
                first_query = select(func.min(t_us)).where(s.gpu_id == gpu_id, t_us < end_us)
                if last is not None:
                    first_query = first_query.where(t_us >= int(last) + MINUTE_US)
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
                    prev_row,
                    conn.execute(
                        select(t_us, s.energy_mj, s.power_mw, s.power_avg_mw)
                        .where(s.gpu_id == gpu_id, t_us >= start_us, t_us < stop_us)
                        .order_by(t_us, s.id)
                    ),
                )
                conn.execute(rollups_1m_table.insert(), rows)
                written += len(rows)

    def _minute_rows(self, gpu_id: int, prev_row: Any, rows: Any) -> list[dict[str, Any]]:
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
        return [
            {
                "gpu_id": gpu_id,
                "minute_start": from_epoch_us(minute),
                "n_samples": acc.n,
                "energy_mj": acc.energy_mj,
                "mean_power_mw": acc.sum_mw / acc.n_power if acc.n_power else None,
                "min_power_mw": acc.min_mw,
                "max_power_mw": acc.max_mw,
                "method": combine_methods(acc.methods),
            }
            for minute, acc in minutes.items()
        ]

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

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()
