"""Prometheus metrics (``scheduler.metrics``): the energy counter, the collector's series, the
daemon's wiring, and the address option.

The energy counter is checked against the store's own rule and across a daemon restart and a
counter reset on simulated GPUs in virtual time; the collector on hand-made state; and a real
``Daemon`` (in process, its threads not started) is scraped over HTTP while its GPUs and store
raise on any call, which proves that a scrape reads neither. ``tests/test_metrics_prometheus.py``
has a real Prometheus scrape a real daemon.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from pydantic import ValidationError

from energy.counters import integrate
from energy.units import mw_to_w
from scheduler.daemon import Daemon
from scheduler.errors import Caller
from scheduler.metrics import (
    THROTTLE_REASONS,
    DaemonHealth,
    GpuEnergy,
    PowertrainCollector,
    reason_name,
)
from scheduler.schemas import AttachRequest, ProgressReport
from scheduler.service import RunningJob
from scheduler.settings import Settings
from telemetry.backends.base import GpuInfo, GpuReading, ThrottleReason
from telemetry.backends.simulated import SimulatedBackend
from telemetry.clock import VirtualClock, to_datetime
from telemetry.sampler import BatchWriter, Sampler, WriterStats
from telemetry.store import Store, open_store
from tests.daemon_proc import free_port

TICK_S = 0.1
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: str) -> Series:
    """Every sample of a Prometheus text body: (name, labels) → value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def pick(series: Series, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """The samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return {ls: v for (n, ls), v in series.items() if n == name and want <= ls}


def one(series: Series, name: str, **labels: str) -> float:
    found = pick(series, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return next(iter(found.values()))


def scrape(collector: PowertrainCollector) -> Series:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return parse(generate_latest(registry).decode())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.close()


def reading(t_s: float, energy_mj: int | None, power_mw: int | None, **fields: Any) -> GpuReading:
    values: dict[str, Any] = dict(
        index=0, sampled_at=to_datetime(t_s), power_mw=power_mw, power_avg_mw=power_mw,
        energy_mj=energy_mj, sm_clock_mhz=1980, mem_clock_mhz=2619, gpu_util_pct=97,
        mem_util_pct=40, temperature_c=61, memory_used_bytes=2**30, power_limit_mw=500_000,
        throttle_reasons=int(ThrottleReason.SW_POWER_CAP),
    )
    return GpuReading(**(values | fields))


# -- the energy counter ---------------------------------------------------------------------------


def test_the_energy_counter_adds_up_readings_with_the_stores_rule() -> None:
    # counter deltas; a reset (driver reload) bridged by the trapezoid of power; readings
    # without a counter (power only); the counter back
    series = [(0.0, 1_000, 300_000), (0.1, 31_000, 300_000), (0.2, 61_000, 310_000),
              (0.3, 500, 320_000), (0.4, 32_500, 320_000), (0.5, None, 330_000),
              (0.6, None, 330_000), (0.7, 99_000, 300_000), (0.8, 129_000, 300_000)]
    energy = GpuEnergy()
    seen = []
    for t, e, p in series:
        energy.observe(0, reading(t, e, p))
        seen.append(energy.totals()[0][0])
    assert all(b >= a for a, b in pairwise(seen))  # a counter never falls
    expected = integrate(series)
    assert expected.counter_resets == 1
    assert seen[-1] == pytest.approx(expected.energy_j, rel=1e-12)
    assert energy.totals()[0][1] == pytest.approx(0.8)


def test_a_second_daemon_continues_from_the_first_ones_total(store: Store) -> None:
    """Two daemons one after the other on one store: the second starts where the first's counter
    stood (rolled-up minutes and raw samples after them), adds the time it was down, and ends at
    the store's energy of every sample."""
    clock = VirtualClock()
    node = SimulatedBackend(gpus=2, clock=clock)
    node.set_workload(0, "training")
    gpu_ids = store.register_gpus(node.devices(), host="test", backend=node.name,
                                  seen_at=to_datetime(clock.now()))

    def run(energy: GpuEnergy, ticks: int) -> None:
        writer = BatchWriter(store)
        sampler = Sampler(node, gpu_ids, writer, clock=clock, observer=energy)
        for _ in range(ticks):
            sampler.tick()
            clock.advance(TICK_S)
        writer.flush()

    first = GpuEnergy.from_store(store, gpu_ids)
    assert first.totals() == {}
    run(first, 900)  # 90 s: a minute rolls up
    assert store.rollup(to_datetime(clock.now())) > 0
    before = first.totals()

    clock.advance(30.0)  # the daemon is down; the GPUs draw on
    second = GpuEnergy.from_store(store, gpu_ids)
    assert {i: v[0] for i, v in second.totals().items()} == pytest.approx(
        {i: v[0] for i, v in before.items()}, rel=1e-12)
    run(second, 50)
    for index, gpu_id in gpu_ids.items():
        total_j = second.totals()[index][0]
        assert total_j > before[index][0]
        assert total_j == pytest.approx(store.gpu_energy(gpu_id).energy_j, rel=1e-12)
    # the busy GPU's 30 s down count too: the counter's delta across them
    assert second.totals()[0][0] - before[0][0] > 30 * 200


class _ResettingNode:
    """Simulated GPUs whose energy counter restarts from zero (a driver reload) at a time."""

    def __init__(self, node: SimulatedBackend, clock: VirtualClock, reset_at: float) -> None:
        self._node, self._clock, self._reset_at = node, clock, reset_at
        self._offset: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    def read(self, index: int) -> GpuReading:
        r = self._node.read(index)
        if self._clock.now() < self._reset_at or r.energy_mj is None:
            return r
        offset = self._offset.setdefault(index, r.energy_mj)
        return replace(r, energy_mj=r.energy_mj - offset)


def test_a_counter_reset_never_takes_the_counter_back(store: Store) -> None:
    clock = VirtualClock()
    sim = SimulatedBackend(gpus=1, clock=clock)
    sim.set_workload(0, "training")
    node = _ResettingNode(sim, clock, reset_at=clock.now() + 5.0)
    gpu_ids = store.register_gpus(sim.devices(), host="test", backend=sim.name)
    energy = GpuEnergy.from_store(store, gpu_ids)
    writer = BatchWriter(store)
    sampler = Sampler(node, gpu_ids, writer, clock=clock, observer=energy)  # type: ignore[arg-type]
    seen = []
    for _ in range(100):
        sampler.tick()
        seen.append(energy.totals()[0][0])
        clock.advance(TICK_S)
    writer.flush()
    assert all(b >= a for a, b in pairwise(seen))
    stored = store.gpu_energy(gpu_ids[0])
    assert stored.counter_resets == 1
    assert seen[-1] == pytest.approx(stored.energy_j, rel=1e-12)
    # and the next daemon carries on from it
    assert GpuEnergy.from_store(store, gpu_ids).totals()[0][0] == pytest.approx(seen[-1])


# -- the collector --------------------------------------------------------------------------------


class _Readings:
    def __init__(self, readings: dict[int, GpuReading]) -> None:
        self.readings = readings

    def latest(self) -> dict[int, GpuReading]:
        return dict(self.readings)


def _info(index: int) -> GpuInfo:
    return GpuInfo(index, f"GPU-{index:04d}", "sim", 200_000, 700_000, 700_000, 345, 1980,
                   80 * 2**30, True)


def _job(job_id: int, **fields: Any) -> RunningJob:
    values: dict[str, Any] = dict(
        id=job_id, name=f"job-{job_id}", user="ada", state="running", mode="auto",
        mode_effective="hw", on_exceed="pause", owner=True, gpus=(0,), power_w=480.5,
        budget_w=500.0, energy_j=12_345.0, energy_budget_wh=50.0, tokens=40_960,
    )
    return RunningJob(**(values | fields))


def test_the_collector_shows_gpus_jobs_and_the_daemon() -> None:
    now = 1_767_225_600.0
    energy = GpuEnergy()
    energy.observe(0, reading(now - 0.2, 1_000_000, 450_000))
    energy.observe(0, reading(now - 0.1, 1_045_000, 450_000))
    energy.observe(1, reading(now - 5.0, 7_000, 70_000, index=1))
    health = DaemonHealth()
    health.record("control", 0.003)
    health.record("control", 0.2)
    with pytest.raises(RuntimeError):
        health.timed("rollup", lambda: (_ for _ in ()).throw(RuntimeError("store gone")))()
    jobs = [_job(7), _job(8, user="bob", owner=False, gpus=(1,), power_w=None, budget_w=None,
                         energy_j=None, energy_budget_wh=None, state="paused")]
    collector = PowertrainCollector(
        node="n1", infos={0: _info(0), 1: _info(1)},
        readings=_Readings({0: reading(now - 0.1, 1_045_000, 450_000)}),  # GPU 1 is lost
        energy=energy,
        writer_stats=lambda: WriterStats(pending=12, written=3_000, dropped=4, failed_flushes=2,
                                         store_failing=True),
        running_jobs=lambda: jobs, health=health, version="9.9", backend="simulated",
        clock=lambda: now,
    )
    series = scrape(collector)
    gpu0 = {"node": "n1", "gpu": "0", "uuid": "GPU-0000"}
    gpu1 = {"node": "n1", "gpu": "1", "uuid": "GPU-0001"}
    assert one(series, "powertrain_gpu_up", **gpu0) == 1.0
    assert one(series, "powertrain_gpu_up", **gpu1) == 0.0
    assert one(series, "powertrain_gpu_power_watts", **gpu0) == 450.0
    assert one(series, "powertrain_gpu_power_limit_watts", **gpu0) == 500.0
    assert one(series, "powertrain_gpu_sm_clock_hertz", **gpu0) == 1.98e9
    assert one(series, "powertrain_gpu_memory_clock_hertz", **gpu0) == 2.619e9
    assert one(series, "powertrain_gpu_utilization_ratio", **gpu0) == 0.97
    assert one(series, "powertrain_gpu_memory_utilization_ratio", **gpu0) == 0.40
    assert one(series, "powertrain_gpu_temperature_celsius", **gpu0) == 61.0
    assert one(series, "powertrain_gpu_memory_used_bytes", **gpu0) == 2.0**30
    assert one(series, "powertrain_gpu_energy_joules_total", **gpu0) == pytest.approx(45.0)
    # a lost GPU keeps its energy counter and its last sample's time, and shows nothing else
    assert one(series, "powertrain_gpu_energy_joules_total", **gpu1) == 0.0
    assert one(series, "powertrain_gpu_last_sample_timestamp_seconds", **gpu1) == now - 5.0
    assert not pick(series, "powertrain_gpu_power_watts", **gpu1)
    # one series per active throttle reason
    throttle = pick(series, "powertrain_gpu_throttle_reason", **gpu0)
    assert {dict(ls)["reason"]: v for ls, v in throttle.items()} == {"sw_power_cap": 1.0}
    assert reason_name(ThrottleReason.SW_POWER_CAP) == "sw_power_cap"
    assert len(THROTTLE_REASONS) == 11

    ada = {"node": "n1", "job_id": "7", "user": "ada"}
    bob = {"node": "n1", "job_id": "8", "user": "bob"}
    info = pick(series, "powertrain_job_info", **ada)
    assert [dict(ls) for ls in info] == [ada | {"name": "job-7", "state": "running",
                                                "gpus": "0", "mode": "auto",
                                                "mode_effective": "hw", "on_exceed": "pause",
                                                "owner": "true"}]
    assert one(series, "powertrain_job_power_watts", **ada) == 480.5
    assert one(series, "powertrain_job_power_budget_watts", **ada) == 500.0
    assert one(series, "powertrain_job_energy_joules_total", **ada) == 12_345.0
    assert one(series, "powertrain_job_energy_budget_joules", **ada) == 50.0 * 3600
    assert one(series, "powertrain_job_tokens_total", **ada) == 40_960.0
    # a job another node owns: its power here, not the run's energy or tokens
    assert one(series, "powertrain_job_info", **bob) == 1.0
    for name in ("powertrain_job_power_watts", "powertrain_job_energy_joules_total",
                 "powertrain_job_tokens_total", "powertrain_job_energy_budget_joules"):
        assert not pick(series, name, **bob), name

    n1 = {"node": "n1"}
    assert one(series, "powertrain_daemon_info", **n1) == 1.0
    assert dict(next(iter(pick(series, "powertrain_daemon_info")))) == n1 | {
        "version": "9.9", "backend": "simulated"}
    assert one(series, "powertrain_sampler_lag_seconds", **n1) == pytest.approx(0.1)
    assert one(series, "powertrain_store_rows_buffered", **n1) == 12.0
    assert one(series, "powertrain_store_rows_written_total", **n1) == 3_000.0
    assert one(series, "powertrain_store_rows_dropped_total", **n1) == 4.0
    assert one(series, "powertrain_store_write_failures_total", **n1) == 2.0
    assert one(series, "powertrain_store_failing", **n1) == 1.0
    control = {"node": "n1", "task": "control"}
    assert one(series, "powertrain_daemon_task_duration_seconds_count", **control) == 2.0
    assert one(series, "powertrain_daemon_task_duration_seconds_sum", **control) == 0.203
    assert one(series, "powertrain_daemon_task_duration_seconds_bucket", **control,
               le="0.005") == 1.0
    assert one(series, "powertrain_daemon_task_duration_seconds_bucket", **control,
               le="0.1") == 1.0
    assert one(series, "powertrain_daemon_task_duration_seconds_bucket", **control,
               le="0.5") == 2.0
    assert one(series, "powertrain_daemon_task_failures_total", node="n1", task="rollup") == 1.0
    assert one(series, "powertrain_daemon_task_failures_total", **control) == 0.0

    # Bounded: a job that ends is gone from the next scrape; the GPU and daemon series stay.
    jobs.clear()
    after = scrape(collector)
    assert not any(name.startswith("powertrain_job_") for name, _ in after)
    assert {k for k in after if not k[0].startswith("powertrain_job_")} == {
        k for k in series if not k[0].startswith("powertrain_job_")}


# -- the daemon: a scrape reads neither the GPUs nor the store ------------------------------------


class _Forbidden(Exception):
    pass


def _forbid(monkeypatch: pytest.MonkeyPatch, obj: object, what: str, calls: list[str]) -> None:
    """Every public method of ``obj`` records its call and raises."""
    for name in dir(obj):
        if name.startswith("_") or not callable(getattr(obj, name)):
            continue

        def boom(*args: Any, _name: str = name, **kwargs: Any) -> Any:
            calls.append(f"{what}.{_name}")
            raise _Forbidden(f"a scrape called {what}.{_name}")

        monkeypatch.setattr(obj, name, boom)


def test_a_scrape_of_the_daemon_touches_neither_gpus_nor_store(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    port = free_port()
    node = SimulatedBackend(gpus=2, state_path=home / "simulated-gpus.json")
    settings = Settings(home=home, socket=tmp_path / "api.sock",
                        metrics_address=f"127.0.0.1:{port}", runner_python=sys.executable)
    daemon = Daemon(settings, node, store, host="metrics-test")
    assert daemon.metrics is not None
    try:
        # a job on GPU 0, with progress, as the API would take them
        me = Caller(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), user="me", admin=False)
        view = daemon.service.attach(me, AttachRequest(name="scraped", gpu_ids=[0], watts=400,
                                                       energy_wh=10))
        for _ in range(5):
            daemon.sampler.tick()
        daemon.service.tick()
        daemon.service.progress(me, view.id, ProgressReport(steps=3, tokens=3_000,
                                                            member=view.member_id))
        daemon.service.tick()
        daemon.sampler.tick()
        daemon.writer.flush()
        calls: list[str] = []
        with monkeypatch.context() as m:
            _forbid(m, node, "backend", calls)
            _forbid(m, store, "store", calls)
            _forbid(m, store.engine, "engine", calls)
            daemon.metrics.start()
            answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
            daemon.metrics.stop()
        assert not calls, calls
        assert answer.status_code == 200, answer.text
        series = parse(answer.text)
        latest = daemon.sampler.latest()
        for index, r in latest.items():
            labels = {"node": "metrics-test", "gpu": str(index)}
            power_w = one(series, "powertrain_gpu_power_watts", **labels)
            assert power_w == mw_to_w(r.power_avg_mw or 0)
            assert one(series, "powertrain_gpu_up", **labels) == 1.0
            stored = store.gpu_energy(daemon.gpu_ids[index])
            assert stored.n_samples == 6
            assert one(series, "powertrain_gpu_energy_joules_total", **labels) == pytest.approx(
                stored.energy_j, rel=1e-12)
        job = {"node": "metrics-test", "job_id": str(view.id), "user": me.user}
        assert one(series, "powertrain_job_tokens_total", **job) == 3_000.0
        assert one(series, "powertrain_job_energy_budget_joules", **job) == 36_000.0
        assert one(series, "powertrain_job_power_budget_watts", **job) == 400.0
        assert one(series, "powertrain_job_power_watts", **job) > 0
        assert one(series, "powertrain_store_rows_written_total", node="metrics-test") == 12.0
    finally:
        daemon.stop()


# -- the address ---------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1:9488", "[::1]:9488", "localhost:1",
                                     "node-7.example:65535"])
def test_a_metrics_address_is_host_and_port(address: str) -> None:
    assert Settings(metrics_address=address).metrics_address == address
    assert Settings().metrics_address is None  # off by default


@pytest.mark.parametrize("address", ["9488", "localhost", ":9488", "host:", "host:0",
                                     "host:65536", "host:http", "::1:9488"])
def test_a_bad_metrics_address_is_refused(address: str) -> None:
    with pytest.raises(ValidationError, match="HOST:PORT"):
        Settings(metrics_address=address)


def _daemon(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POWERTRAIN_")}
    return subprocess.run(
        [sys.executable, "-m", "scheduler", "daemon", "--backend", "simulated", "--sim-gpus", "1",
         "--home", str(tmp_path / "home"), *args],
        capture_output=True, text=True, timeout=60, env=env,
    )


def test_the_daemon_refuses_a_bad_address_or_a_port_in_use(tmp_path: Path) -> None:
    done = _daemon(tmp_path, "--metrics-address", "nowhere")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: invalid --metrics-address: expected HOST:PORT (or [IPv6]:PORT), got 'nowhere'"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _daemon(tmp_path, "--metrics-address", f"127.0.0.1:{port}")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: metrics address 127.0.0.1:{port}: Address already in use"]
    assert done.stderr.strip().splitlines()[-1] == errors[0]


def test_health_times_tasks_and_keeps_their_names() -> None:
    health = DaemonHealth()

    def tick() -> int:
        return 5

    timed = health.timed("control", tick)
    assert timed() == 5 and timed.__name__ == "tick"
    counts, sum_s, failures = health.snapshot()["control"]
    assert sum(counts) == 1 and failures == 0 and 0 <= sum_s < 1
    health.timed("nap", tick)  # shown from when it is wrapped, before it first runs
    assert health.snapshot()["nap"] == ([0] * 8, 0.0, 0)


def test_the_suggested_port_is_documented() -> None:
    from scheduler.metrics import SUGGESTED_PORT

    doc = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    assert f":{SUGGESTED_PORT}" in doc
