"""Energy between breakpoints, for many GPUs at once, and the energy marks at job edges.

A segment's energy comes from raw samples while they cover a short range (``RAW_MAX_SPAN_S``),
else from the rollups' running energy: the difference of its values at the segment's two ends,
a breakpoint inside a minute taking the part of that minute the raw energy counter puts before
it. Job edges (a job's start or end on a GPU) keep that reading as an energy mark
(``energy_marks``), written once their hour is rolled up, so that reports over long ranges cost
a few queries per job rather than per sample. The job tables are read only for those edges'
times.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from typing import Any, Literal

from sqlalchemy import BigInteger, Connection, Engine, bindparam, func, select, update

from energy.counters import (
    EnergyMethod,
    EnergyResult,
    EnergySample,
    combine_methods,
    interval_energy,
)
from energy.units import US_PER_S, s_to_us, us_to_s
from telemetry.store.models import (
    energy_marks_table,
    from_epoch_us,
    job_gpus_table,
    jobs_table,
    samples_table,
    to_epoch_us,
)
from telemetry.store.records import EnergySource, SegmentEnergy, SegmentEnergyUs
from telemetry.store.rollups import (
    HOUR_US,
    MINUTE_US,
    RAW_MAX_SPAN_S,
    ROLLUP_LEVELS_S,
    ceil_us,
    floor_us,
    frontiers,
    frontiers_many,
    raw_covers,
    rolled_up_until_us,
)
from telemetry.store.samples import Samples
from telemetry.store.sql import VALUES_CHUNK, raw_us, values_sql, write_transaction

_HOUR_S = 3600


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
        return combine_methods(self.methods)


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


_mark = energy_marks_table.c
_mark_at_us = raw_us(_mark.at)
_MARK_COLUMNS = (
    _mark.gpu_id, _mark_at_us, _mark.energy_cum_mj, _mark.before_max_mw, _mark.before_method,
    _mark.after_max_mw, _mark.after_method, raw_us(_mark.prev_at), _mark.from_prev_max_mw,
    _mark.from_prev_method,
)
"""``gpu_id``, ``at`` (epoch µs), then the fields of a ``_Mark`` in order (``prev_at`` in µs)."""


class Segments:
    """Segment energy and energy marks in a SQL database (one connection per call)."""

    def __init__(self, engine: Engine, samples: Samples, *, max_gap_s: float) -> None:
        """Wrap an engine whose database is at the latest schema.

        Args:
            engine: The store's engine.
            samples: The same store's samples (short spans are integrated from them).
            max_gap_s: Trapezoid intervals longer than this many seconds count as gaps.
        """
        self._engine = engine
        self._samples = samples
        self._max_gap_s = max_gap_s

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
                    select(func.max(raw_us(samples_table.c.sampled_at)))
                    .where(samples_table.c.gpu_id == gpu_id)
                ).scalar_one()
                end_us = start_us if last is None else max(start_us, int(last) + 1)
            else:
                end_us = max(start_us, to_epoch_us(until))
            raw = (end_us - start_us <= s_to_us(RAW_MAX_SPAN_S)
                   and raw_covers(conn, gpu_id, start_us))
        if raw:
            return self._samples.gpu_energy(gpu_id, since, until)
        seg = self.segment_energy_us({gpu_id: [start_us, end_us]}, source="rollups")[gpu_id]
        if not seg:
            return EnergyResult(energy_mj=0.0, method="none", duration_s=0.0, n_samples=0)
        return EnergyResult(
            energy_mj=seg[0].energy_mj, method=seg[0].method,
            duration_s=us_to_s(end_us - start_us), n_samples=0,
            counter_resets=seg[0].counter_resets, gaps=seg[0].gaps,
        )

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
                    source == "rollups" or (bps[-1] - bps[0]) > s_to_us(RAW_MAX_SPAN_S)
                )
            }
            fronts = frontiers_many(conn, sorted(long_gpus))
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
                    and raw_covers(conn, gpu_id, bps[0])
                )
                if use_raw:
                    sources[gpu_id] = "samples"
                    self._raw_segments(conn, gpu_id, bps, seg_accs, leading=False)
                    continue
                sources[gpu_id] = "rollups"
                gpu_frontiers = fronts.get(gpu_id)
                if gpu_frontiers is None:
                    gpu_frontiers = frontiers(conn, gpu_id)
                    fronts[gpu_id] = gpu_frontiers
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
                self._rollup_segments(conn, rolled, fronts, accs)
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
        fronts: Mapping[int, dict[int, int]],
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
        self._add_range_stats(conn, unlinked, marks, fronts)

    def _add_range_stats(
        self,
        conn: Connection,
        items: Sequence[tuple[_SegmentAcc, int, int, int]],
        marks: Mapping[tuple[int, int], _Mark],
        fronts: Mapping[int, dict[int, int]],
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
                    (len(piece_owner) - 1, gpu_id, a - a % MINUTE_US, ceil_us(b, MINUTE_US))
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
            gpu_frontiers = fronts[gpu_id]
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
        for chunk_start in range(0, len(minute_pieces), VALUES_CHUNK):
            chunk = minute_pieces[chunk_start : chunk_start + VALUES_CHUNK]
            self._add_stats(conn.exec_driver_sql(
                f"WITH p(id, gpu_id, lo, hi) AS (VALUES {values_sql(chunk)}) "
                f"SELECT p.id, {stats} FROM p JOIN rollups_1m r ON r.gpu_id = p.gpu_id "
                "AND r.minute_start >= p.lo AND r.minute_start < p.hi GROUP BY p.id"
            ).all(), piece_owner)
        for chunk_start in range(0, len(level_pieces), VALUES_CHUNK):
            chunk_l = level_pieces[chunk_start : chunk_start + VALUES_CHUNK]
            self._add_stats(conn.exec_driver_sql(
                f"WITH p(id, gpu_id, level_s, lo, hi) AS (VALUES {values_sql(chunk_l)}) "
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

    def _stored_marks(
        self, conn: Connection, keys: set[tuple[int, int]]
    ) -> dict[tuple[int, int], _Mark]:
        """The energy marks stored for ``(gpu_id, at µs)`` keys (those that have one).

        One range read over the keys' GPUs and span (marks are few: two per job and GPU)."""
        if not keys:
            return {}
        gpu_ids = sorted({g for g, _ in keys})
        times = [t for _, t in keys]
        rows = conn.execute(
            select(*_MARK_COLUMNS).where(
                _mark.gpu_id.in_(gpu_ids), _mark_at_us >= min(times), _mark_at_us <= max(times)
            )
        ).all()
        out = {(int(g), int(t)): _Mark(*fields) for g, t, *fields in rows}
        return {key: out[key] for key in keys & out.keys()}

    def _link_marks(self, conn: Connection, gpu_id: int, from_us: int) -> None:
        """Link each of a GPU's marks from ``from_us`` on (and the one after the last of them)
        to its previous mark, where it is not yet: ``prev_at`` and the ``from_prev_*`` summary
        of the minutes between."""
        start = conn.execute(
            select(func.max(_mark_at_us)).where(_mark.gpu_id == gpu_id, _mark_at_us < from_us)
        ).scalar_one()
        rows = conn.execute(
            select(*_MARK_COLUMNS)
            .where(_mark.gpu_id == gpu_id, _mark_at_us >= (from_us if start is None else start))
            .order_by(_mark_at_us)
        ).all()
        marks = {(gpu_id, int(t)): _Mark(*fields) for _, t, *fields in rows}
        times = sorted(t for _, t in marks)
        todo = [
            (_SegmentAcc(), gpu_id, a, b)
            for a, b in pairwise(times)
            if marks[(gpu_id, b)].prev_at_us != a
        ]
        if not todo:
            return
        self._add_range_stats(conn, todo, marks, {gpu_id: frontiers(conn, gpu_id)})
        conn.execute(
            update(energy_marks_table)
            .where(_mark.gpu_id == gpu_id, _mark_at_us == bindparam("b_at", type_=BigInteger()))
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
        for chunk_start in range(0, len(todo), VALUES_CHUNK):
            chunk = todo[chunk_start : chunk_start + VALUES_CHUNK]
            q = [(i, g, x - x % MINUTE_US) for i, (g, x) in enumerate(chunk)]
            for i, cum, energy in conn.exec_driver_sql(
                f"WITH q(id, g, m) AS (VALUES {values_sql(q)}) SELECT q.id, "
                "(SELECT r.energy_cum_mj FROM rollups_1m r WHERE r.gpu_id = q.g "
                "AND r.minute_start < q.m ORDER BY r.minute_start DESC LIMIT 1), "
                "(SELECT r.energy_mj FROM rollups_1m r WHERE r.gpu_id = q.g "
                "AND r.minute_start = q.m) FROM q"
            ):
                base[chunk[int(i)]] = (
                    0.0 if cum is None else float(cum), 0.0 if energy is None else float(energy)
                )
            q2 = [
                (i, g, x - x % HOUR_US, x - x % HOUR_US + HOUR_US, ceil_us(x, MINUTE_US),
                 x - x % MINUTE_US)
                for i, (g, x) in enumerate(chunk)
            ]
            before = "r.minute_start < q.cut"
            after = "r.minute_start >= q.m"
            method = "CASE WHEN {} AND r.method <> 'none' THEN r.method END"
            for i, *stats in conn.exec_driver_sql(
                f"WITH q(id, g, h, he, cut, m) AS (VALUES {values_sql(q2)}) SELECT q.id, "
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
                combine_methods([b_lo, b_hi]),
                None if a_max is None else int(a_max),
                combine_methods([a_lo, a_hi]),
            )
        return out

    def mark_job_edges(self, gpu_id: int) -> int:
        """Store the energy marks of the job edges on one GPU whose hour is rolled up and that
        have none yet; return how many were written."""
        j, jg, m = jobs_table.c, job_gpus_table.c, energy_marks_table.c
        with write_transaction(self._engine) as conn:
            rolled_until_us = rolled_up_until_us(conn, gpu_id)
            if rolled_until_us is None:
                return 0
            ready_us = floor_us(rolled_until_us, HOUR_US)  # hours before it are rolled up
            edges: set[int] = set()
            for column in (j.started_at, j.ended_at):
                t_us = raw_us(column)
                query = (
                    select(t_us)
                    .select_from(jobs_table.join(job_gpus_table, jg.job_id == j.id))
                    .where(jg.gpu_id == gpu_id, column.is_not(None), t_us < ready_us)
                    .where(~select(m.gpu_id).where(m.gpu_id == gpu_id, raw_us(m.at) == t_us)
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

        for chunk_start in range(0, len(todo), VALUES_CHUNK):
            chunk = todo[chunk_start : chunk_start + VALUES_CHUNK]
            sql = (
                f"WITH q(id, gpu_id, m, x) AS (VALUES {values_sql(chunk)}) SELECT q.id, "
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
        t_us = raw_us(s.sampled_at)
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
            cur = EnergySample(us_to_s(t), e, power)
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
    fronts: dict[int, int],
    out: list[tuple[str, int, int, int, float]],
) -> None:
    if lo >= hi:
        return
    if not levels:
        out.append(("m", 60, lo, hi, 1.0))
        return
    level_s, finer = levels[0], levels[1:]
    width = level_s * US_PER_S
    cl, fh = ceil_us(lo, width), min(floor_us(hi, width), fronts[level_s])
    if cl >= fh:
        _decompose(lo, hi, finer, fronts, out)
        return
    _decompose(lo, cl, finer, fronts, out)
    out.append(("l", level_s, cl, fh, 1.0))
    _decompose(fh, hi, finer, fronts, out)
