"""The store on every database kind: round trips, atomic batches, energy, rollups, retention."""

from __future__ import annotations

import random
import sqlite3
from dataclasses import fields
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError

from telemetry.backends.base import READING_FIELDS, GpuProcess, GpuReading
from telemetry.store import SampleRecord, Store, StoreWriteError, make_engine, open_store
from telemetry.store.models import samples_table
from tests.store.data import T0, at, gpu_info, reading


def _register(store: Store, n: int = 2) -> dict[int, int]:
    return store.register_gpus([gpu_info(i) for i in range(n)], host="node-a", backend="simulated")


def test_register_gpus_upserts_by_host_and_uuid(store: Store) -> None:
    ids = store.register_gpus(
        [gpu_info(0), gpu_info(1)], host="node-a", backend="simulated", seen_at=T0
    )
    assert sorted(ids) == [0, 1] and len(set(ids.values())) == 2
    again = store.register_gpus(
        [gpu_info(1), gpu_info(2)], host="node-a", backend="nvml", seen_at=at(60)
    )
    assert again[1] == ids[1]
    assert again[2] not in ids.values()
    other_host = store.register_gpus([gpu_info(0)], host="node-b", backend="nvml")
    assert other_host[0] not in ids.values()

    gpus = {g.id: g for g in store.gpus(host="node-a")}
    assert len(gpus) == 3
    g1 = gpus[ids[1]]
    assert g1.backend == "nvml" and g1.index == 1 and g1.has_energy_counter
    assert g1.first_seen_at == T0 and g1.last_seen_at == at(60)
    assert g1.first_seen_at.tzinfo is not None and g1.first_seen_at.utcoffset() == timedelta(0)
    assert (g1.min_limit_mw, g1.max_limit_mw, g1.default_limit_mw) == (200_000, 700_000, 700_000)
    assert g1.memory_total_bytes == 80 * 2**30
    assert len(store.gpus()) == 4


def test_samples_keep_every_reading_field() -> None:
    """The table and its record are written out for SQLAlchemy and mypy; they must hold exactly
    ``GpuReading``'s measured values (``READING_FIELDS``, the one list), in its order."""
    stored = ("gpu_id", "sampled_at", *READING_FIELDS)
    assert tuple(f.name for f in fields(SampleRecord)) == stored
    assert tuple(c.name for c in samples_table.columns if c.name != "id") == stored


def test_round_trip_keeps_values_nulls_and_aware_utc(store: Store) -> None:
    ids = _register(store)
    full = reading(
        T0 + timedelta(microseconds=123_457),
        energy_mj=2**40 + 5,  # beyond 32 bits, as a long-running counter is
        processes=(GpuProcess(4242, 3 * 2**30), GpuProcess(4243, None)),
    )
    sparse = GpuReading(
        index=1,
        # same instant written in another zone: stored and returned as UTC
        sampled_at=datetime(2026, 1, 1, 14, 0, 1, tzinfo=timezone(timedelta(hours=2))),
        **dict.fromkeys(READING_FIELDS),
    )
    assert store.insert_samples([(ids[0], full), (ids[1], sparse)]) == 2

    [got] = store.samples(ids[0])
    assert got.gpu_id == ids[0]
    assert got.sampled_at == full.sampled_at
    assert got.sampled_at.tzinfo == UTC
    assert got.energy_mj == 2**40 + 5
    for name in READING_FIELDS:
        assert getattr(got, name) == getattr(full, name)
    assert (got.temperature_c, got.memory_used_bytes) == (61, 70 * 2**30)
    assert (got.power_limit_mw, got.throttle_reasons) == (700_000, 0x4)

    [none] = store.samples(ids[1])
    assert none.sampled_at == at(1) and none.sampled_at.tzinfo == UTC
    assert all(getattr(none, f) is None for f in READING_FIELDS)

    procs = store.processes(ids[0])
    assert [(p.pid, p.used_memory_bytes) for p in procs] == [(4242, 3 * 2**30), (4243, None)]
    assert all(p.sampled_at == full.sampled_at for p in procs)
    assert store.processes(ids[1]) == []


def test_time_ranges_are_half_open_and_ordered(store: Store) -> None:
    ids = _register(store, 1)
    # written out of order: read back in time order
    rows = [(ids[0], reading(at(s))) for s in (3, 0, 2, 1, 4)]
    store.insert_samples(rows)
    assert [s.sampled_at for s in store.samples(ids[0])] == [at(s) for s in range(5)]
    assert [s.sampled_at for s in store.samples(ids[0], at(1), at(3))] == [at(1), at(2)]
    assert store.sample_count() == 5
    assert store.sample_count(ids[0], since=at(1)) == 4
    assert store.sample_count(ids[0], until=at(1)) == 1


def test_insert_updates_last_seen(store: Store) -> None:
    ids = store.register_gpus([gpu_info(0)], host="n", backend="simulated", seen_at=T0)
    store.insert_samples([(ids[0], reading(at(30))), (ids[0], reading(at(20)))])
    assert store.gpus()[0].last_seen_at == at(30)
    store.insert_samples([(ids[0], reading(at(10)))])  # late rows never move it back
    assert store.gpus()[0].last_seen_at == at(30)


def test_a_failing_batch_writes_nothing(store: Store) -> None:
    ids = _register(store, 1)
    store.insert_samples([(ids[0], reading(at(0)))])
    bad_gpu_id = max(ids.values()) + 100
    batch = [
        (ids[0], reading(at(1), processes=(GpuProcess(1, 1),))),
        (ids[0], reading(at(2))),
        (bad_gpu_id, reading(at(2))),  # foreign key violation, after good rows
    ]
    with pytest.raises(StoreWriteError) as caught:
        store.insert_samples(batch)
    assert caught.value.transient is False
    assert isinstance(caught.value.__cause__, DBAPIError)
    assert store.sample_count() == 1
    assert store.processes(ids[0]) == []
    assert store.gpus()[0].last_seen_at != at(2)
    # the store still works afterwards
    assert store.insert_samples(batch[:2]) == 2


def test_naive_timestamps_are_rejected_before_writing(store: Store) -> None:
    ids = _register(store, 1)
    naive = reading(datetime(2026, 1, 1, 12, 0, 0))
    with pytest.raises(ValueError, match="timezone-aware"):
        store.insert_samples([(ids[0], reading(at(0))), (ids[0], naive)])
    assert store.sample_count() == 0


def test_empty_batch_is_a_no_op(store: Store) -> None:
    assert store.insert_samples([]) == 0


def _counter_series(
    seconds: float, *, hz: float = 10.0, seed: int = 1, start: float = 7.3
) -> list[tuple[float, int, int]]:
    """(t_s, energy_mj, power_mw) at ``hz`` with jittered times and an uneven counter."""
    rng = random.Random(seed)
    out = []
    counter = 123_456_789
    t = start
    while t < start + seconds:
        power = rng.randint(250_000, 690_000)
        out.append((t, counter, power))
        dt = 1 / hz + rng.uniform(-0.02, 0.02)
        counter += int(power * dt) + rng.randint(-500, 500)
        t += dt
    return out


def _insert_series(store: Store, gpu_id: int, series: list[tuple[float, int, int]]) -> None:
    rows = [(gpu_id, reading(at(t), energy_mj=e, power_mw=p)) for t, e, p in series]
    for i in range(0, len(rows), 80):
        store.insert_samples(rows[i : i + 80])


def test_energy_is_the_counter_delta(store: Store) -> None:
    ids = _register(store, 1)
    series = _counter_series(30.0)
    _insert_series(store, ids[0], series)

    result = store.gpu_energy(ids[0])
    assert result.energy_mj == series[-1][1] - series[0][1]
    assert result.method == "counter"
    assert result.n_samples == len(series)

    window = store.gpu_energy(ids[0], since=at(10), until=at(20))
    inside = [s for s in series if 10 <= s[0] < 20]
    assert window.energy_mj == inside[-1][1] - inside[0][1]
    assert store.gpu_energy(ids[0], since=at(1000)).method == "none"


def test_energy_across_a_counter_reset_and_without_counter(store: Store) -> None:
    ids = store.register_gpus(
        [gpu_info(0), gpu_info(1, counter=False)], host="n", backend="simulated"
    )
    reset = [(0.0, 9_000_000, 200_000), (1.0, 9_200_000, 200_000), (2.0, 50, 400_000)]
    _insert_series(store, ids[0], reset)
    result = store.gpu_energy(ids[0])
    assert result.energy_mj == pytest.approx(200_000 + 300_000)
    assert (result.method, result.counter_resets) == ("mixed", 1)

    no_counter = [(0, None, 100_000), (2, None, 300_000)]
    store.insert_samples(
        [(ids[1], reading(at(t), energy_mj=e, power_mw=p)) for t, e, p in no_counter]
    )
    result = store.gpu_energy(ids[1])
    assert result.energy_mj == pytest.approx(400_000)
    assert result.method == "trapezoid"


def test_rollups_are_exact_and_idempotent(store: Store) -> None:
    ids = _register(store, 2)
    series = _counter_series(200.0)  # 12:00:07.3 to about 12:03:27
    _insert_series(store, ids[0], series)
    _insert_series(store, ids[1], _counter_series(90.0, seed=2))

    now = at(200.0)  # 12:03:20: minutes 12:00, 12:01 and 12:02 are complete and settled
    written = store.rollup(now)
    assert written == 3 + 2
    rollups = store.rollups(ids[0])
    assert [r.minute_start for r in rollups] == [at(0), at(60), at(120)]
    assert all(r.minute_start.tzinfo == UTC for r in rollups)

    # every interval belongs to the minute in which it ends: the sum is the counter delta
    # from the first sample to the last one before 12:03
    before = [s for s in series if s[0] < 180]
    assert sum(r.energy_mj for r in rollups) == before[-1][1] - before[0][1]
    assert all(r.method == "counter" for r in rollups)
    for r, lo in zip(rollups, (0, 60, 120), strict=True):
        minute = [s for s in series if lo <= s[0] < lo + 60]
        powers = [p for _, _, p in minute]
        assert r.n_samples == len(minute)
        assert r.mean_power_mw == pytest.approx(sum(powers) / len(powers))
        assert (r.min_power_mw, r.max_power_mw) == (min(powers), max(powers))
        prev = [s for s in series if s[0] < lo]
        start = prev[-1][1] if prev else minute[0][1]
        assert r.energy_mj == minute[-1][1] - start

    # idempotent, and the incomplete minute is not rolled up until it completes
    assert store.rollup(now) == 0
    assert store.rollups(ids[0]) == rollups
    assert store.rollup(at(239.0)) == 0  # 12:03 ended, but writes may still be in flight
    assert store.rollup(at(250.0)) == 1
    everything = store.rollups(ids[0])
    assert len(everything) == 4
    assert sum(r.energy_mj for r in everything) == series[-1][1] - series[0][1]
    assert store.rollups(ids[0], since=at(60), until=at(180)) == everything[1:3]


def test_incremental_rollups_match_one_shot(store_url: str, tmp_path: Path) -> None:
    series = _counter_series(300.0, seed=3)
    store = open_store(store_url)
    try:
        ids = _register(store, 1)
        _insert_series(store, ids[0], series)
        for minute in range(1, 7):
            store.rollup(at(60.0 * minute + 10.5))
        incremental = store.rollups(ids[0])
    finally:
        store.close()
    other = open_store(f"sqlite:///{tmp_path / 'one-shot.db'}")
    try:
        ids = _register(other, 1)
        _insert_series(other, ids[0], series)
        other.rollup(at(400.0))
        one_shot = other.rollups(ids[0])
    finally:
        other.close()
    assert [(r.minute_start, r.energy_mj, r.n_samples) for r in incremental] == [
        (r.minute_start, r.energy_mj, r.n_samples) for r in one_shot
    ]


def test_rollup_waits_for_a_minute_to_settle(store: Store) -> None:
    ids = _register(store, 1)
    _insert_series(store, ids[0], [(t, 1_000 * int(t), 100_000) for t in (1.0, 30.0, 59.0)])
    assert store.rollup(at(65.0)) == 0  # 10 s settle by default
    assert store.rollup(at(65.0), settle_s=0.0) == 1
    with pytest.raises(ValueError, match="settle_s"):
        store.rollup(at(65.0), settle_s=-1.0)


def test_rollup_bridges_silent_minutes_and_hours(store: Store) -> None:
    ids = _register(store, 1)
    rows = [
        (0.0, 1_000, 100_000),
        (30.0, 2_000, 100_000),
        (3 * 3600 + 5.0, 9_000_000, 100_000),  # three hours later, counter continuous
        (3 * 3600 + 6.0, 9_000_100, 100_000),
    ]
    _insert_series(store, ids[0], rows)
    assert store.rollup(at(4 * 3600)) == 2
    first, later = store.rollups(ids[0])
    assert first.energy_mj == 1_000
    assert later.minute_start == at(3 * 3600) and later.energy_mj == 9_000_100 - 2_000
    assert later.method == "counter"


def test_rollup_without_power_or_counter(store: Store) -> None:
    ids = store.register_gpus([gpu_info(0, counter=False)], host="n", backend="simulated")
    store.insert_samples(
        [(ids[0], reading(at(t), power_mw=None, energy_mj=None)) for t in (1, 2, 3)]
    )
    store.rollup(at(120))
    [r] = store.rollups(ids[0])
    assert (r.n_samples, r.energy_mj, r.method) == (3, 0.0, "none")
    assert r.mean_power_mw is None and r.min_power_mw is None and r.max_power_mw is None


def test_each_host_rolls_up_and_retains_its_own_gpus_only(store: Store) -> None:
    """Two daemons on one store: node-a's rollup and retention leave node-b's rows alone."""
    a = _register(store, 1)[0]
    b = store.register_gpus([gpu_info(0)], host="node-b", backend="simulated")[0]
    day = 86_400.0
    for gpu_id in (a, b):
        _insert_series(store, gpu_id, _counter_series(120.0))
    now = at(day + 90.0)

    assert store.rollup(now, host="node-a") > 0
    assert store.rollups(a) and store.rollups(b) == []
    a_samples, b_samples = len(store.samples(a)), len(store.samples(b))
    deleted = store.apply_retention(now, days=0.5, host="node-a")
    assert deleted > 0 and len(store.samples(a)) == a_samples - deleted  # a's old raw rows went
    assert len(store.samples(b)) == b_samples and store.rollups(b) == []

    assert store.rollup(now, host="node-b") > 0  # node-b's own daemon does its share
    assert [r.minute_start for r in store.rollups(b)] == [r.minute_start for r in store.rollups(a)]


def test_retention_deletes_old_samples_but_keeps_rollups(store: Store) -> None:
    ids = _register(store, 1)
    day = 86_400.0
    series = _counter_series(120.0) + [
        (t + day, e + 10**9, p) for t, e, p in _counter_series(120.0, seed=5)
    ]
    _insert_series(store, ids[0], series[1:])
    t, e, p = series[0]
    first = reading(at(t), energy_mj=e, power_mw=p, processes=(GpuProcess(7, None),))
    store.insert_samples([(ids[0], first)])
    now = at(day + 90.0)  # 12:01:30 the next day: its 12:01 minute is not complete

    deleted = store.apply_retention(now, days=0.5)
    remaining = store.samples(ids[0])
    assert deleted == len([s for s in series if s[0] < day])
    assert all(s.sampled_at >= at(day) for s in remaining)
    assert store.processes(ids[0]) == []
    rollups = store.rollups(ids[0])
    assert [r.minute_start for r in rollups] == [at(0), at(60), at(120), at(day)]
    assert store.apply_retention(now, days=0.5) == 0

    # nothing not yet rolled up is ever deleted, however short the retention
    store.apply_retention(now, days=1e-6)
    left = store.samples(ids[0])
    assert [s.sampled_at for s in left if s.sampled_at >= at(day + 60)] == [
        at(t) for t, _, _ in series if t >= day + 60
    ]
    store.rollup(at(day + 300))
    assert sum(r.energy_mj for r in store.rollups(ids[0])) == series[-1][1] - series[0][1]


def test_retention_rejects_nonsense(store: Store) -> None:
    for days in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive"):
            store.apply_retention(T0, days)


def test_sqlite_lock_is_a_transient_write_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    open_store(url).close()
    blocker = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    store = Store(make_engine(url, busy_timeout_ms=50))
    try:
        ids = _register(store, 1)
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreWriteError) as caught:
            store.insert_samples([(ids[0], reading(T0))])
        assert caught.value.transient is True
        blocker.execute("ROLLBACK")
        assert store.insert_samples([(ids[0], reading(T0))]) == 1
    finally:
        blocker.close()
        store.close()


def test_read_only_sqlite_is_a_permanent_write_error(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    writable = open_store(f"sqlite:///{path}")
    ids = _register(writable, 1)
    writable.close()
    store = Store(make_engine(f"sqlite:///file:{path}?mode=ro&uri=true"))
    try:
        with pytest.raises(StoreWriteError) as caught:
            store.insert_samples([(ids[0], reading(T0))])
        assert caught.value.transient is False
    finally:
        store.close()
