"""Rollups and retention: minute rollups, 10-minute and hourly buckets, their reads, old samples.

Each GPU's minutes are rolled up once complete, every interval between consecutive samples
counting in the minute where it ends, with a running total of energy (``energy_cum_mj``); the
coarser buckets are exact sums of their minutes. Retention deletes raw samples and processes,
never rollups, so readers ask ``raw_covers`` whether raw samples still reach back far enough.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from energy.counters import EnergySample, IntervalMethod, combine_methods, interval_energy
from energy.units import US_PER_S, us_to_s
from telemetry.store.models import (
    from_epoch_us,
    gpu_processes_table,
    gpus_table,
    rollups_1m_table,
    rollups_levels_table,
    samples_table,
    to_epoch_us,
)
from telemetry.store.records import BucketRecord, RollupRecord
from telemetry.store.sql import raw_us, time_range, values_sql, write_transaction

MINUTE_US = 60_000_000
HOUR_US = 3_600_000_000
ROLLUP_SETTLE_S = 10.0
"""A minute is rolled up this many seconds after it ends (the sampler flushes every second)."""
ROLLUP_WINDOW_US = 60 * MINUTE_US
"""Rollups of a long backlog are written an hour at a time, each hour in its own transaction."""
ROLLUP_LEVELS_S = (600, 3600)
"""Widths, in seconds, of the coarser buckets summed from the minutes (``rollups_levels``)."""
RAW_MAX_SPAN_S = 6 * 3600.0
"""Energy over at most this many seconds is read from raw samples (where they are still kept);
longer ranges read rollups."""


def floor_us(t_us: int, width_us: int) -> int:
    """``t_us`` rounded down to a multiple of ``width_us``."""
    return t_us - t_us % width_us


def ceil_us(t_us: int, width_us: int) -> int:
    """``t_us`` rounded up to a multiple of ``width_us``."""
    return -((-t_us) // width_us) * width_us


def frontiers(conn: Connection, gpu_id: int) -> dict[int, int]:
    """Where each rollup level of one GPU ends: level width (60 for minutes) to the end of its
    latest row, epoch µs; levels without rows are absent."""
    m, b = rollups_1m_table.c, rollups_levels_table.c
    out: dict[int, int] = {}
    last = conn.execute(
        select(func.max(raw_us(m.minute_start))).where(m.gpu_id == gpu_id)
    ).scalar_one()
    if last is not None:
        out[60] = int(last) + MINUTE_US
    for level_s in ROLLUP_LEVELS_S:
        last = conn.execute(
            select(func.max(raw_us(b.bucket_start))).where(
                b.gpu_id == gpu_id, b.level_s == level_s
            )
        ).scalar_one()
        if last is not None:
            out[level_s] = int(last) + level_s * US_PER_S
    return out


def frontiers_many(conn: Connection, gpu_ids: Sequence[int]) -> dict[int, dict[int, int]]:
    """``frontiers`` of several GPUs in one query (GPUs without rollups are absent)."""
    if not gpu_ids:
        return {}
    levels = ", ".join(
        f"(SELECT MAX(b.bucket_start) FROM rollups_levels b WHERE b.gpu_id = q.g "
        f"AND b.level_s = {int(level_s)})"
        for level_s in ROLLUP_LEVELS_S
    )
    rows = conn.exec_driver_sql(
        f"WITH q(g) AS (VALUES {values_sql([(g,) for g in gpu_ids])}) SELECT q.g, "
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
                found[level_s] = int(last) + level_s * US_PER_S
        if found:
            out[int(g)] = found
    return out


def raw_covers(conn: Connection, gpu_id: int, start_us: int) -> bool:
    """Whether raw samples reach back to ``start_us``: the GPU's first kept sample is no later,
    or no rollup is older than it (retention deletes samples, never rollups, so rollups from
    before the first sample mean older samples were deleted)."""
    s, m = samples_table.c, rollups_1m_table.c
    first_sample = conn.execute(
        select(func.min(raw_us(s.sampled_at))).where(s.gpu_id == gpu_id)
    ).scalar_one()
    if first_sample is None:
        return False
    if int(first_sample) <= start_us:
        return True
    first_minute = conn.execute(
        select(func.min(raw_us(m.minute_start))).where(m.gpu_id == gpu_id)
    ).scalar_one()
    return first_minute is None or int(first_minute) >= floor_us(int(first_sample), MINUTE_US)


def rolled_up_until_us(conn: Connection, gpu_id: int) -> int | None:
    """The end of a GPU's last rolled-up minute (epoch µs), or ``None`` when none is."""
    r = rollups_1m_table.c
    last = conn.execute(
        select(func.max(raw_us(r.minute_start))).where(r.gpu_id == gpu_id)
    ).scalar_one()
    return None if last is None else int(last) + MINUTE_US


def rollup_end_us(now: datetime, settle_s: float) -> int:
    """The end of the minutes complete ``settle_s`` seconds before ``now``, epoch µs.

    Raises:
        ValueError: ``settle_s`` is negative or not finite.
    """
    if not (math.isfinite(settle_s) and settle_s >= 0):
        raise ValueError(f"settle_s must be a finite number >= 0 (got {settle_s})")
    return floor_us(to_epoch_us(now - timedelta(seconds=settle_s)), MINUTE_US)


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


class Rollups:
    """Rollups in a SQL database: writing minutes and buckets, reading them, retention."""

    def __init__(self, engine: Engine, *, max_gap_s: float) -> None:
        """Wrap an engine whose database is at the latest schema.

        Args:
            engine: The store's engine.
            max_gap_s: Trapezoid intervals longer than this many seconds count as gaps.
        """
        self._engine = engine
        self._max_gap_s = max_gap_s

    def gpu_ids(self, host: str | None = None) -> list[int]:
        """The GPUs of one host (``None``: every GPU in the store), by id."""
        query = select(gpus_table.c.id).order_by(gpus_table.c.id)
        if host is not None:
            query = query.where(gpus_table.c.host == host)
        with self._engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def roll_up(self, gpu_id: int, end_us: int) -> int:
        """Write one GPU's minutes before ``end_us`` (epoch µs) not yet rolled up, then its
        complete coarser buckets; return how many minute rows were written.

        Each hour of a backlog is written in its own transaction, so an error leaves the
        earlier ones written.

        Raises:
            SQLAlchemyError: The current hour was not written.
        """
        written = self._roll_up_minutes(gpu_id, end_us)
        for level_s in ROLLUP_LEVELS_S:
            self._roll_up_level(gpu_id, level_s, end_us)
        return written

    def _roll_up_level(self, gpu_id: int, level_s: int, end_us: int) -> int:
        """Sum the minutes of every complete ``level_s`` bucket not yet written (ending by
        ``end_us``, the minute rollups' frontier)."""
        width_us = level_s * US_PER_S
        m, b = rollups_1m_table.c, rollups_levels_table.c
        m_us = raw_us(m.minute_start)
        stop_us = floor_us(end_us, width_us)
        with write_transaction(self._engine) as conn:
            last = conn.execute(
                select(func.max(raw_us(b.bucket_start))).where(
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
                key = floor_us(int(t), width_us)
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
                    "method": combine_methods(acc[6]),
                }
                for key, acc in buckets.items()
            ]
            if rows:
                conn.execute(rollups_levels_table.insert(), rows)
        return len(rows)

    def _roll_up_minutes(self, gpu_id: int, end_us: int) -> int:
        s, r = samples_table.c, rollups_1m_table.c
        t_us = raw_us(s.sampled_at)
        written = 0
        while True:
            with write_transaction(self._engine) as conn:
                last_row = conn.execute(
                    select(raw_us(r.minute_start), r.energy_cum_mj)
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
                start_us = floor_us(int(first), MINUTE_US)
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
            prev = EnergySample(us_to_s(t), e, p if p is not None else pa)
        for t, e, p, pa in rows:
            power = p if p is not None else pa
            cur = EnergySample(us_to_s(t), e, power)
            minute = floor_us(int(t), MINUTE_US)
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
            .where(c.gpu_id == gpu_id, *time_range(c.minute_start, since, until))
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
                *time_range(c.bucket_start, since, until),
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

    def delete_raw(self, gpu_id: int, cutoff_us: int) -> int:
        """Delete one GPU's raw samples and processes older than ``cutoff_us`` (epoch µs) that
        are rolled up, keeping its last rolled-up sample (the start of the next minute's first
        interval); return how many sample rows were deleted.

        Raises:
            SQLAlchemyError: Nothing was deleted.
        """
        s, p = samples_table.c, gpu_processes_table.c
        t_us, pt_us = raw_us(s.sampled_at), raw_us(p.sampled_at)
        with write_transaction(self._engine) as conn:
            rolled_until_us = rolled_up_until_us(conn, gpu_id)
            if rolled_until_us is None:
                return 0
            keep_us = conn.execute(
                select(func.max(t_us)).where(s.gpu_id == gpu_id, t_us < rolled_until_us)
            ).scalar_one()
            bound_us = min(cutoff_us, int(keep_us) if keep_us is not None else cutoff_us)
            deleted = conn.execute(
                samples_table.delete().where(s.gpu_id == gpu_id, t_us < bound_us)
            ).rowcount
            conn.execute(gpu_processes_table.delete().where(p.gpu_id == gpu_id, pt_us < bound_us))
        return int(deleted)
