"""The real daemon, as a subprocess on simulated GPUs with a SQLite file: rate, energy, crashes."""

from __future__ import annotations

import itertools
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from scheduler.daemon import Ticker
from telemetry.backends.simulated import SimulatedBackend
from telemetry.store import Store, open_store
from tests.daemon_proc import DaemonProcess

pytestmark = pytest.mark.slow


def sqlite_url(home: Path) -> str:
    return f"sqlite:///{home / 'powertrain.db'}"


def stored(home: Path) -> int:
    with sqlite3.connect(home / "powertrain.db") as conn:
        return int(conn.execute("SELECT count(*) FROM samples").fetchone()[0])


def prepare_node(home: Path, gpus: int) -> SimulatedBackend:
    """A simulated node with a mix of loads that stays constant while the daemon runs."""
    node = SimulatedBackend(gpus=gpus, state_path=home / "simulated-gpus.json")
    for index in range(gpus):
        if index % 2 == 0:
            node.set_workload(index, "training")
    node.set_power_limit(gpus - 2, 300_000)  # one busy GPU held at 300 W
    return node


def newest(home: Path) -> float:
    """The newest stored sample's time, s since the epoch (0 with none)."""
    with sqlite3.connect(home / "powertrain.db") as conn:
        (us,) = conn.execute("SELECT coalesce(max(sampled_at), 0) FROM samples").fetchone()
    return float(us) / 1e6


def shortest_span_s(home: Path) -> float:
    """The shortest time any GPU's stored samples span, s."""
    with sqlite3.connect(home / "powertrain.db") as conn:
        spans = conn.execute(
            "SELECT (max(sampled_at) - min(sampled_at)) / 1e6 FROM samples GROUP BY gpu_id"
        ).fetchall()
    return min((s for (s,) in spans), default=0.0)


def test_eight_gpus_at_10_hz_for_10_s(tmp_path: Path) -> None:
    """Eight GPUs sampled for 10 s: every one in order, and its energy exact. How many of the
    ticks a busy machine lets through is a rate, measured by bench/daemon_overhead.py."""
    node = prepare_node(tmp_path, 8)
    daemon = DaemonProcess(tmp_path, gpus=8)
    daemon.wait_for(lambda: shortest_span_s(tmp_path) >= 10.0, timeout_s=120)
    assert daemon.terminate() == 0, daemon.log()

    store = open_store(sqlite_url(tmp_path))
    try:
        gpus = store.gpus()
        assert sorted(g.index for g in gpus) == list(range(8))
        for gpu in gpus:
            times = [s.sampled_at.timestamp() for s in store.samples(gpu.id)]
            assert all(a < b for a, b in itertools.pairwise(times)), gpu.index
            span_s = times[-1] - times[0]
            assert span_s >= 10.0
            # The load was constant, so the truth is the simulator's true power times the span.
            true_mj = node.true_power_w(gpu.index) * span_s * 1000
            energy = store.gpu_energy(gpu.id)
            assert energy.method == "counter"
            assert energy.energy_mj == pytest.approx(true_mj, rel=0.01), gpu.index
    finally:
        store.close()


def test_sigkill_leaves_a_sound_store_and_a_restart_carries_on(tmp_path: Path) -> None:
    prepare_node(tmp_path, 4)
    daemon = DaemonProcess(tmp_path, gpus=4)
    daemon.wait_for(lambda: stored(tmp_path) >= 4 * 30)
    # killed in the middle of its writing: right after a batch reached the store, with the
    # next one buffered (what a kill loses is at most one flush interval; here it is the
    # store's soundness and what was written before that are checked, not a latency)
    seen = newest(tmp_path)
    daemon.wait_for(lambda: newest(tmp_path) > seen)
    written = newest(tmp_path)
    killed_at = time.time()
    daemon.kill()

    with sqlite3.connect(tmp_path / "powertrain.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store: Store = open_store(sqlite_url(tmp_path))
    try:
        gpu_ids = {g.index: g.id for g in store.gpus()}
        last = max(store.samples(g)[-1].sampled_at.timestamp() for g in gpu_ids.values())
        assert last >= written  # nothing that was written is lost
        before = store.sample_count()
    finally:
        store.close()

    restarted = DaemonProcess(tmp_path, gpus=4)
    restarted.wait_for(lambda: stored(tmp_path) >= before + 4 * 20)
    restarted.proc.send_signal(signal.SIGINT)
    assert restarted.proc.wait(30) == 0, restarted.log()

    store = open_store(sqlite_url(tmp_path))
    try:
        assert {g.index: g.id for g in store.gpus()} == gpu_ids  # same GPUs, same rows
        for gpu_id in gpu_ids.values():
            times = [s.sampled_at.timestamp() for s in store.samples(gpu_id)]
            assert any(t > killed_at for t in times)
            assert all(a < b for a, b in itertools.pairwise(times))
    finally:
        store.close()


def test_a_second_daemon_on_the_same_home_is_refused(tmp_path: Path) -> None:
    first = DaemonProcess(tmp_path, gpus=2)
    first.wait_for(lambda: stored(tmp_path) > 0)
    second = DaemonProcess(tmp_path, gpus=2)
    assert second.proc.wait(30) == 1
    assert "another powertrain daemon" in second.log()
    assert first.terminate() == 0


def test_the_ticker_outlives_a_failing_call_and_stops_when_told() -> None:
    calls: list[float] = []
    done = threading.Event()

    def tick() -> None:
        calls.append(time.monotonic())
        if len(calls) >= 3:
            done.set()
        raise RuntimeError("a failing tick")

    ticker = Ticker(tick, 0.01, "test-ticker")
    ticker.start()
    assert done.wait(10), "the ticker stopped after a failing call"
    ticker.stop()
    stopped_at = len(calls)
    time.sleep(0.05)
    assert len(calls) == stopped_at
    with pytest.raises(ValueError, match="positive"):
        Ticker(tick, 0.0, "bad")
