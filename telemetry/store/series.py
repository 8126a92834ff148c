"""Chart series from the store: one GPU's power over a range, in a bounded number of buckets."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import BigInteger, Connection, Engine, func, select, type_coerce

from energy.units import US_PER_S, s_to_us
from telemetry.store.models import from_epoch_us, samples_table, to_epoch_us
from telemetry.store.records import PowerPoint
from telemetry.store.rollups import (
    RAW_MAX_SPAN_S,
    ROLLUP_LEVELS_S,
    Rollups,
    ceil_us,
    frontiers,
    raw_covers,
)
from telemetry.store.sql import raw_us


class Series:
    """Chart series read from a SQL database (one connection per call)."""

    def __init__(self, engine: Engine, rollups: Rollups) -> None:
        """Wrap an engine whose database is at the latest schema.

        Args:
            engine: The store's engine.
            rollups: The same store's rollups (long ranges read them).
        """
        self._engine = engine
        self._rollups = rollups

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
        bucket_us = max(US_PER_S, ceil_us(span_us // max_points + 1, US_PER_S))
        with self._engine.connect() as conn:
            if span_us <= s_to_us(RAW_MAX_SPAN_S) and raw_covers(conn, gpu_id, since_us):
                return self._raw_power(conn, gpu_id, since_us, until_us, bucket_us)
            fronts = frontiers(conn, gpu_id)
            level_s = 60
            for candidate in ROLLUP_LEVELS_S:
                if span_us / s_to_us(level_s) <= max_points:
                    break
                if candidate in fronts:
                    level_s = candidate
            points: list[PowerPoint] = []
            minutes_from = since
            if level_s != 60:
                width = timedelta(seconds=level_s)
                for bucket in self._rollups.level_rollups(gpu_id, level_s, since, until):
                    points.append(PowerPoint(bucket.start, bucket.start + width,
                                             bucket.energy_mj / level_s, bucket.max_power_mw))
                minutes_from = max(since, from_epoch_us(fronts[level_s]))
            for r in self._rollups.rollups(gpu_id, minutes_from, until):
                points.append(PowerPoint(r.minute_start, r.minute_start + timedelta(minutes=1),
                                         r.energy_mj / 60.0, r.max_power_mw))
            # after the latest minute rollup (the minute in progress, or never rolled up): raw
            raw_from = max(since_us, fronts.get(60, since_us))
            if raw_from < until_us:
                points.extend(self._raw_power(conn, gpu_id, raw_from, until_us, bucket_us))
        return points

    def _raw_power(
        self, conn: Connection, gpu_id: int, since_us: int, until_us: int, bucket_us: int
    ) -> list[PowerPoint]:
        s = samples_table.c
        t_us = raw_us(s.sampled_at)
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
