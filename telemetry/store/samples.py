"""GPUs and raw samples in the store: registering GPUs, the hot insert path, reads, energy.

``insert_samples`` is the sampler's path into the database (every flush, once a second): its
statements are compiled once and run on the driver with tuples already in their stored form.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

from sqlalchemy import BigInteger, Connection, Engine, bindparam, func, select, type_coerce, update
from sqlalchemy.exc import SQLAlchemyError

from energy.counters import EnergyResult, EnergySample, integrate
from energy.units import us_to_s
from telemetry.backends.base import READING_FIELDS, GpuInfo, GpuReading
from telemetry.store.errors import write_error
from telemetry.store.models import (
    gpu_processes_table,
    gpus_table,
    samples_table,
    to_epoch_us,
)
from telemetry.store.records import GpuRecord, ProcessRecord, SampleRecord
from telemetry.store.sql import (
    DriverStatement,
    inserted_id,
    raw_us,
    time_range,
    write_transaction,
)

_reading_values = attrgetter(*READING_FIELDS)
"""A reading's ``READING_FIELDS`` values as a tuple: the ``samples`` columns after ``gpu_id`` and
``sampled_at``, in the order ``insert_samples`` writes them."""


def _energy_samples(
    conn: Connection, gpu_id: int, since_us: int | None, until_us: int | None
) -> Iterator[EnergySample]:
    """One GPU's samples with ``since_us <= t < until_us`` (epoch µs) as ``EnergySample``s
    (power: instant, else the 1 s average), oldest first."""
    c = samples_table.c
    t_us = raw_us(c.sampled_at)
    query = select(t_us, c.energy_mj, c.power_mw, c.power_avg_mw).where(c.gpu_id == gpu_id)
    if since_us is not None:
        query = query.where(t_us >= since_us)
    if until_us is not None:
        query = query.where(t_us < until_us)
    query = query.order_by(t_us, c.id)
    for t, energy_mj, power_mw, power_avg_mw in conn.execute(query):
        power = power_mw if power_mw is not None else power_avg_mw
        yield EnergySample(us_to_s(t), energy_mj, power)


class Samples:
    """GPUs, samples and processes in a SQL database (one connection per call)."""

    def __init__(self, engine: Engine, *, max_gap_s: float) -> None:
        """Wrap an engine whose database is at the latest schema.

        Args:
            engine: The store's engine.
            max_gap_s: Trapezoid intervals longer than this many seconds count as gaps.
        """
        self._engine = engine
        self._max_gap_s = max_gap_s
        dialect = engine.dialect
        self._insert_samples = DriverStatement(
            samples_table.insert().inline(), dialect, ("gpu_id", "sampled_at", *READING_FIELDS)
        )
        self._insert_processes = DriverStatement(
            gpu_processes_table.insert().inline(),
            dialect,
            ("gpu_id", "sampled_at", "pid", "used_memory_bytes"),
        )
        us = BigInteger()
        self._touch_gpus = DriverStatement(
            update(gpus_table)
            .where(gpus_table.c.id == bindparam("b_gpu_id"))
            .where(raw_us(gpus_table.c.last_seen_at) < bindparam("b_seen_at", type_=us))
            .values(last_seen_at=type_coerce(bindparam("b_seen_at", type_=us), BigInteger)),
            dialect,
            ("b_gpu_id", "b_seen_at"),
        )

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
            with write_transaction(self._engine) as conn:
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
                        gpu_id = inserted_id(result)
                    else:
                        conn.execute(
                            update(gpus_table).where(gpus_table.c.id == gpu_id).values(**values)
                        )
                    ids[info.index] = gpu_id
        except SQLAlchemyError as exc:
            raise write_error("registering GPUs", exc) from exc
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
            sample_rows.append((gpu_id, at_us, *_reading_values(r)))
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
            raise write_error(f"inserting {len(rows)} samples", exc) from exc
        return len(sample_rows)

    def samples(
        self, gpu_id: int, since: datetime | None = None, until: datetime | None = None
    ) -> list[SampleRecord]:
        """One GPU's samples with ``since <= sampled_at < until``, oldest first."""
        c = samples_table.c
        query = (
            select(c.gpu_id, c.sampled_at, *(c[name] for name in READING_FIELDS))
            .where(c.gpu_id == gpu_id, *time_range(c.sampled_at, since, until))
            .order_by(c.sampled_at, c.id)
        )
        with self._engine.connect() as conn:
            return [SampleRecord(*row) for row in conn.execute(query)]

    def latest_samples(self, gpu_ids: Sequence[int]) -> dict[int, SampleRecord]:
        """Each GPU's latest sample (GPUs without one are left out): one index probe each."""
        c = samples_table.c
        out: dict[int, SampleRecord] = {}
        with self._engine.connect() as conn:
            for gpu_id in gpu_ids:
                row = conn.execute(
                    select(c.gpu_id, c.sampled_at, *(c[name] for name in READING_FIELDS))
                    .where(c.gpu_id == gpu_id)
                    .order_by(c.sampled_at.desc(), c.id.desc())
                    .limit(1)
                ).first()
                if row is not None:
                    out[gpu_id] = SampleRecord(*row)
        return out

    def sample_count(
        self,
        gpu_id: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> int:
        """How many samples (of one GPU, or all) have ``since <= sampled_at < until``."""
        c = samples_table.c
        query = select(func.count()).select_from(samples_table)
        query = query.where(*time_range(c.sampled_at, since, until))
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
            .where(c.gpu_id == gpu_id, *time_range(c.sampled_at, since, until))
            .order_by(c.sampled_at, c.id)
        )
        with self._engine.connect() as conn:
            return [ProcessRecord(*row) for row in conn.execute(query)]

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
            series = list(_energy_samples(conn, gpu_id, since_us, until_us))
        return integrate(series, max_gap_s=self._max_gap_s)
