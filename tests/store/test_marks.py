"""Running energy in the minute rollups and energy marks at job edges, on every database kind:
stored marks give the same segments as marks computed on the fly, late edges relink, and
rollups agree with raw samples."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import text

from scheduler.jobs import JobState
from scheduler.store import JobStore, NewJob
from telemetry.store import SegmentEnergy, Store
from telemetry.store.models import to_epoch_us
from tests.store.data import at, gpu_info, reading

Jobs = dict[str, tuple[float, float, tuple[int, ...]]]
"""Job name to (start s, end s, GPU indices)."""

STEP_S = 5
SPAN_S = 3 * 3600 + 60  # three whole hours and a minute


def _power_mw(gpu: int, t: int, busy: list[tuple[float, float]]) -> int:
    base = 400_000 if any(lo <= t < hi for lo, hi in busy) else 100_000
    return base + (t * 7919 + gpu * 104_729) % 50_000  # a different peak in every minute


def _fill(store: Store, jobs: Jobs) -> dict[int, int]:
    """Two GPUs sampled every 5 s for three hours, with a counter reset on GPU 1 at 1:30."""
    ids = store.register_gpus([gpu_info(0), gpu_info(1)], host="n", backend="simulated",
                              seen_at=at(0))
    rows = []
    for gpu in (0, 1):
        busy = [(lo, hi) for lo, hi, gpus in jobs.values() if gpu in gpus]
        energy = 5_000_000.0
        prev = None
        for t in range(0, SPAN_S, STEP_S):
            power = _power_mw(gpu, t, busy)
            if prev is not None:
                energy += (prev + power) / 2 * STEP_S / 1000 * 1000  # mW x s = mJ
            prev = power
            counter = int(energy)
            if gpu == 1 and t >= 5400:
                counter -= 5_000_000 + 4_000_000_000  # a driver reload restarts the counter
            rows.append((ids[gpu], reading(at(t), index=gpu, power_mw=power, energy_mj=counter)))
    store.insert_samples(rows)
    return ids


def _add_jobs(store: Store, ids: dict[int, int], jobs: Jobs) -> None:
    for name, (start, end, gpus) in jobs.items():
        job = JobStore(store).create(
            NewJob(name=name, user="alice", uid=1000, gid=1000, argv=("python", "t.py"),
                   cwd="/tmp", host="n", gpu_count=len(gpus)),
            at=at(start - 1),
        )
        JobStore(store).transition(job.id, JobState.RUNNING, "placed", at=at(start),
                              gpus=[(ids[g], g) for g in gpus])
        JobStore(store).transition(job.id, JobState.COMPLETED, "exited 0", at=at(end), exit_code=0)


JOBS: Jobs = {
    "a": (602.5, 4807.3, (0,)),  # two hours on GPU 0
    "b": (5100.5, 9633.3, (0, 1)),  # both GPUs, across GPU 1's counter reset
    "c": (310.1, 3020.2, (1,)),  # within the first hour of GPU 1
}
LATE: Jobs = {"late": (4860.7, 5010.2, (0,))}  # between a and b on GPU 0, known only later


def _edges(jobs: Jobs, gpu: int) -> list[float]:
    return sorted({t for lo, hi, gpus in jobs.values() if gpu in gpus for t in (lo, hi)})


def _points(ids: dict[int, int], jobs: Jobs
            ) -> dict[int, list[datetime]]:
    return {ids[g]: [at(0), *map(at, _edges(jobs, g)), at(3 * 3600 + 30.5)] for g in (0, 1)}


def _marks(store: Store) -> list[tuple[int, int, int | None]]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT gpu_id, at, prev_at FROM energy_marks ORDER BY gpu_id, at")
        )
        return [(int(g), int(t), None if p is None else int(p)) for g, t, p in rows]


def _forget_marks(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM energy_marks"))


def _assert_same_segments(
    a: dict[int, list[SegmentEnergy]], b: dict[int, list[SegmentEnergy]]
) -> None:
    assert a.keys() == b.keys()
    for gpu_id in a:
        assert len(a[gpu_id]) == len(b[gpu_id])
        for x, y in zip(a[gpu_id], b[gpu_id], strict=True):
            assert (x.start, x.end, x.max_power_mw, x.method) == (
                y.start, y.end, y.max_power_mw, y.method
            )
            assert x.energy_mj == pytest.approx(y.energy_mj, rel=1e-12, abs=1e-6)


def test_minute_rollups_keep_a_running_total(store: Store) -> None:
    ids = _fill(store, JOBS)
    store.rollup(at(SPAN_S + 10))
    for gpu_id in ids.values():
        running = 0.0
        minutes = store.rollups(gpu_id)
        assert len(minutes) == SPAN_S // 60
        for r in minutes:
            running += r.energy_mj
            assert r.energy_cum_mj == pytest.approx(running, rel=1e-12)


def test_job_edges_are_marked_once_their_hour_is_rolled_up(store: Store) -> None:
    ids = _fill(store, JOBS)
    _add_jobs(store, ids, JOBS)
    store.rollup(at(2 * 3600 + 30))  # minutes up to 2:00:00 settled: hours 0 and 1 done
    marked = {(g, t) for g, t, _ in _marks(store)}
    done = {(ids[g], to_epoch_us(at(t))) for g in (0, 1) for t in _edges(JOBS, g) if t < 7200}
    assert marked == done
    store.rollup(at(SPAN_S + 10))
    marks = _marks(store)
    assert {(g, t) for g, t, _ in marks} == {
        (ids[g], to_epoch_us(at(t))) for g in (0, 1) for t in _edges(JOBS, g)
    }
    # each mark is linked to the GPU's previous one
    for gpu_id in ids.values():
        mine = [(t, p) for g, t, p in marks if g == gpu_id]
        assert mine
        assert [p for _, p in mine] == [None] + [t for t, _ in mine[:-1]]
    store.rollup(at(SPAN_S + 20))  # nothing new
    assert _marks(store) == marks


def test_stored_marks_give_the_segments_computed_on_the_fly(store: Store) -> None:
    ids = _fill(store, JOBS)
    _add_jobs(store, ids, JOBS)
    store.rollup(at(SPAN_S + 10))
    points = _points(ids, JOBS)
    with_marks = store.segment_energy(points, source="rollups")
    _forget_marks(store)
    _assert_same_segments(with_marks, store.segment_energy(points, source="rollups"))
    methods = {s.method for s in with_marks[ids[1]]}
    assert "mixed" in methods and "counter" in methods  # the reset, and clean segments


def test_a_late_edge_is_marked_and_relinks_its_neighbours(store: Store) -> None:
    everything = {**JOBS, **LATE}
    ids = _fill(store, everything)
    _add_jobs(store, ids, JOBS)
    store.rollup(at(SPAN_S + 10))
    _add_jobs(store, ids, LATE)  # its edges fall between marks that are already linked
    store.rollup(at(SPAN_S + 20))
    marks = [(t, p) for g, t, p in _marks(store) if g == ids[0]]
    assert [t for t, _ in marks] == [to_epoch_us(at(t)) for t in _edges(everything, 0)]
    assert [p for _, p in marks] == [None] + [t for t, _ in marks[:-1]]
    points = _points(ids, everything)
    with_marks = store.segment_energy(points, source="rollups")
    _forget_marks(store)
    _assert_same_segments(with_marks, store.segment_energy(points, source="rollups"))


def test_rollup_segments_agree_with_raw_samples(store: Store) -> None:
    ids = _fill(store, JOBS)
    _add_jobs(store, ids, JOBS)
    store.rollup(at(SPAN_S + 10))
    points = _points(ids, JOBS)
    rolled = store.segment_energy(points, source="rollups")
    raw = store.segment_energy(points, source="samples")
    for gpu_id in ids.values():
        for r, s in zip(rolled[gpu_id], raw[gpu_id], strict=True):
            assert r.source == "rollups" and s.source == "samples"
            if s.counter_resets:
                continue  # raw takes the trapezoid across the reset, rollups its minute's
            # the counter is linear between samples: splitting it where the counter puts the
            # edge, or in proportion to time, is the same
            assert r.energy_mj == pytest.approx(s.energy_mj, rel=1e-9)
            assert r.method == s.method
            # rollups read whole minutes at the edges: never lower than the raw peak
            assert r.max_power_mw is not None and s.max_power_mw is not None
            assert r.max_power_mw >= s.max_power_mw
