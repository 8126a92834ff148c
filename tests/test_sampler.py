"""The sampler and batch writer against faults, on simulated GPUs and a real SQLite store.

Time is virtual and every tick is driven by hand: no scheduler, no sleeping.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from telemetry.backends.simulated import FaultKind, SimulatedBackend
from telemetry.clock import VirtualClock
from telemetry.sampler import BatchWriter, Sampler
from telemetry.store import Store, open_store

TICK_S = 0.1


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def node(clock: VirtualClock) -> SimulatedBackend:
    sim = SimulatedBackend(gpus=8, clock=clock)
    for index in range(0, 8, 2):
        sim.set_workload(index, "training")
    return sim


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.close()


def run_ticks(sampler: Sampler, writer: BatchWriter, clock: VirtualClock, n: int) -> None:
    for i in range(n):
        sampler.tick()
        clock.advance(TICK_S)
        if i % 10 == 9:
            writer.flush()


def counts(store: Store, gpu_ids: dict[int, int]) -> dict[int, int]:
    return {index: store.sample_count(gpu_id) for index, gpu_id in gpu_ids.items()}


def test_a_lost_gpu_does_not_cost_the_others_a_sample(
    node: SimulatedBackend, store: Store, clock: VirtualClock
) -> None:
    gpu_ids = store.register_gpus(node.devices(), host="test", backend=node.name)
    writer = BatchWriter(store)
    sampler = Sampler(node, gpu_ids, writer, clock=clock, backoff_initial_s=0.5,
                      backoff_max_s=2.0)

    run_ticks(sampler, writer, clock, 20)
    node.inject_fault(3, FaultKind.GPU_LOST)
    run_ticks(sampler, writer, clock, 40)
    assert sampler.lost_gpus() == [3]
    node.clear_faults(3)
    run_ticks(sampler, writer, clock, 40)
    writer.flush()

    stored = counts(store, gpu_ids)
    assert all(stored[i] == 100 for i in range(8) if i != 3), stored
    # GPU 3: 20 before, none while lost, and back within one backoff (at most 2 s) after.
    assert 20 + 40 - 20 <= stored[3] < 100
    assert sampler.lost_gpus() == []
    times = [s.sampled_at for s in store.samples(gpu_ids[3])]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert max(gaps) <= 4.0 + 2.0 + 1e-6


def _switchable_read_only(store: Store) -> dict[str, bool]:
    """Make the store's SQLite database read-only (``PRAGMA query_only``) on demand."""
    switch = {"on": False}

    @event.listens_for(store.engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        if switch["on"]:
            dbapi_conn.execute("PRAGMA query_only = ON")

    return switch


def set_read_only(store: Store, switch: dict[str, bool], on: bool) -> None:
    switch["on"] = on
    store.engine.dispose()  # new connections pick the mode up


def test_read_only_store_loses_nothing_within_the_buffer(
    node: SimulatedBackend, store: Store, clock: VirtualClock
) -> None:
    gpu_ids = store.register_gpus(node.devices(), host="test", backend=node.name)
    writer = BatchWriter(store, max_rows=10_000)
    sampler = Sampler(node, gpu_ids, writer, clock=clock)
    switch = _switchable_read_only(store)

    run_ticks(sampler, writer, clock, 10)
    set_read_only(store, switch, True)
    run_ticks(sampler, writer, clock, 50)
    stats = writer.stats()
    assert stats.store_failing and stats.failed_flushes == 5
    assert stats.pending == 50 * 8
    set_read_only(store, switch, False)
    run_ticks(sampler, writer, clock, 10)

    stats = writer.stats()
    assert not stats.store_failing and stats.pending == 0 and stats.dropped == 0
    assert counts(store, gpu_ids) == dict.fromkeys(range(8), 70)


def test_a_full_buffer_drops_the_oldest_rows_and_counts_them(
    node: SimulatedBackend, store: Store, clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    gpu_ids = store.register_gpus(node.devices(), host="test", backend=node.name)
    writer = BatchWriter(store, max_rows=200)
    sampler = Sampler(node, gpu_ids, writer, clock=clock)
    switch = _switchable_read_only(store)

    set_read_only(store, switch, True)
    run_ticks(sampler, writer, clock, 50)  # 400 rows into a 200-row buffer
    assert writer.stats().dropped == 200
    assert "dropped" in caplog.text
    set_read_only(store, switch, False)
    writer.flush()

    assert writer.stats().pending == 0
    assert sum(counts(store, gpu_ids).values()) == 200
    # What survived is the newest: the last 25 ticks of every GPU.
    kept = sorted(r.sampled_at.timestamp() for r in store.samples(gpu_ids[0]))
    assert len(kept) == 25
    assert kept[0] == pytest.approx(VirtualClock().now() + 25 * TICK_S, abs=1e-3)


def test_rows_dropped_during_a_slow_flush_are_not_popped_twice(
    node: SimulatedBackend, store: Store, clock: VirtualClock
) -> None:
    gpu_ids = store.register_gpus(node.devices(), host="test", backend=node.name)

    class SlowSink:
        """Adds rows (overflowing the buffer) while a write is in flight, as the sampler may."""

        def __init__(self) -> None:
            self.written: list[Any] = []

        def insert_samples(self, rows: Any) -> int:
            if not self.written:
                sampler.tick()  # 8 more rows arrive mid-write; the buffer bound drops 8 old ones
            self.written.extend(rows)
            return store.insert_samples(rows)

    sink = SlowSink()
    writer = BatchWriter(sink, max_rows=16)
    sampler = Sampler(node, gpu_ids, writer, clock=clock)
    sampler.tick()
    clock.advance(TICK_S)
    sampler.tick()  # 16 rows: the buffer is full
    clock.advance(TICK_S)
    writer.flush()
    writer.flush()

    stats = writer.stats()
    # The 8 rows dropped from the front were in the batch being written, so they are stored
    # anyway; the drop counter errs on the side of reporting a loss.
    assert stats.pending == 0 and stats.dropped == 8
    assert len(sink.written) == 16 + 8
    assert sum(counts(store, gpu_ids).values()) == 24


def test_latest_readings_are_each_gpus_last_fresh_read(
    node: SimulatedBackend, store: Store, clock: VirtualClock
) -> None:
    """What the control loop observes: each GPU's last reading; none for a GPU whose last read
    failed until it answers again; none at all once the sampler has not read for ``fresh_s``."""
    gpu_ids = store.register_gpus(node.devices(), host="test", backend=node.name)
    sampler = Sampler(node, gpu_ids, BatchWriter(store), clock=clock, backoff_initial_s=0.5,
                      fresh_s=1.0)
    assert sampler.latest() == {}
    sampler.tick()
    first = sampler.latest()
    assert first == {index: node.read(index) for index in range(8)}  # the same instant

    clock.advance(TICK_S)
    node.inject_fault(3, FaultKind.GPU_LOST)
    sampler.tick()
    latest = sampler.latest()
    assert sorted(latest) == [0, 1, 2, 4, 5, 6, 7]
    assert latest[0].sampled_at > first[0].sampled_at
    node.clear_faults(3)
    clock.advance(TICK_S)
    sampler.tick()
    assert 3 not in sampler.latest()  # waiting out its backoff: no reading to pass off as new
    clock.advance(0.5)
    sampler.tick()
    assert sorted(sampler.latest()) == list(range(8))

    clock.advance(0.9)
    assert len(sampler.latest()) == 8
    clock.advance(0.2)
    assert sampler.latest() == {}, "a stalled sampler's readings are not the GPUs' state"
