"""A simulated node driven by hand on a virtual clock, with jobs and their true energy.

GPUs are sampled at 1 Hz through the real ``Sampler`` and ``BatchWriter`` into a real store; jobs
go through ``JobStore`` (created, running on their GPUs, completed). The truth is the simulator's
noiseless ``true_energy_mj`` read at every job start and end.

Several nodes sharing one store (``Rig.add_node``) are more simulated GPUs registered under another
host, sampled on the same clock.

A driver reload (the energy counter restarting from zero) is not something the simulator models:
``ReloadingBackend`` wraps it and, from ``reload(index)`` on, reports that GPU's counter minus its
value at the reload, exactly what NVML shows after the driver is reloaded. Power readings and the
truth are untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from scheduler.jobs import JobState
from scheduler.store import JobStore, NewJob
from telemetry.backends.base import GpuInfo, GpuReading
from telemetry.backends.simulated import SimulatedBackend
from telemetry.clock import VirtualClock, to_datetime
from telemetry.sampler import BatchWriter, Sampler
from telemetry.store import Store, open_store
from tests.store.conftest import store_url  # noqa: F401  (a fixture)

TICK_S = 1.0


class ReloadingBackend:
    """A simulated node whose energy counters can restart, as after a driver reload."""

    name = "simulated"

    def __init__(self, sim: SimulatedBackend) -> None:
        self.sim = sim
        self.offsets: dict[int, int] = {}

    def devices(self) -> list[GpuInfo]:
        return self.sim.devices()

    def read(self, index: int) -> GpuReading:
        reading = self.sim.read(index)
        offset = self.offsets.get(index)
        if offset is None or reading.energy_mj is None:
            return reading
        return dataclasses.replace(reading, energy_mj=reading.energy_mj - offset)

    def reload(self, index: int) -> None:
        counter = self.sim.read(index).energy_mj
        assert counter is not None
        self.offsets[index] = counter


@dataclass
class RigJob:
    id: int
    gpus: tuple[int, ...]
    tokens_per_s: float
    started_s: float
    ended_s: float | None = None
    truth_mj: dict[int, list[float]] = field(default_factory=dict)  # gpu index -> [start, end]


class Rig:
    """GPUs, a sampler and jobs on a virtual clock; ``run`` moves time and samples (on the
    nodes added with ``add_node`` too)."""

    def __init__(self, store: Store, gpus: int, *, host: str = "test",
                 clock: VirtualClock | None = None, seed: int = 0) -> None:
        self.store = store
        self.host = host
        self.clock = clock or VirtualClock()
        self.sim = SimulatedBackend(gpus=gpus, clock=self.clock, seed=seed)
        self.backend = ReloadingBackend(self.sim)
        self.start = self.now()
        self.gpu_ids = store.register_gpus(
            self.sim.devices(), host=host, backend="simulated", seen_at=self.start
        )
        self.writer = BatchWriter(store)
        self.sampler = Sampler(self.backend, self.gpu_ids, self.writer,  # type: ignore[arg-type]
                               clock=self.clock)
        self.jobs: list[RigJob] = []
        self.paused: set[int] = set()
        self.nodes: list[Rig] = []
        self._last_progress = self.clock.now()

    def add_node(self, host: str, gpus: int) -> Rig:
        """Another node on the same store and clock, sampled by this rig's ``run``."""
        node = Rig(self.store, gpus, host=host, clock=self.clock, seed=len(self.nodes) + 1)
        self.nodes.append(node)
        return node

    def now(self) -> datetime:
        return to_datetime(self.clock.now())

    def run(self, seconds: float, *, sample: bool = True) -> None:
        """Tick once per second (unless ``sample`` is false: a gap), reporting progress every
        10 s for running jobs."""
        rigs = [self, *self.nodes]
        end = self.clock.now() + seconds
        while self.clock.now() < end - 1e-9:
            if sample:
                for rig in rigs:
                    rig.sampler.tick()
            step = min(TICK_S, end - self.clock.now())
            self.clock.advance(step)
            if self.clock.now() - self._last_progress >= 10.0 - 1e-9:
                for rig in rigs:
                    rig._report_progress()
                self._last_progress = self.clock.now()
        for rig in rigs:
            rig.writer.flush()

    def _report_progress(self) -> None:
        t = self.clock.now()
        for job in self.jobs:
            if job.ended_s is None:
                tokens = int(job.tokens_per_s * (t - job.started_s))
                JobStore(self.store).add_progress(job.id, at=self.now(), steps=tokens // 1000,
                                             samples=tokens // 500, tokens=tokens)

    def start_job(self, name: str, gpus: tuple[int, ...], *, user: str = "alice",
                  tokens_per_s: float = 10_000.0, watts: float | None = None) -> RigJob:
        record = JobStore(self.store).create(
            NewJob(name=name, user=user, uid=1000, gid=1000, argv=("python", "train.py"),
                   cwd="/tmp", host=self.host, gpu_count=len(gpus), watts_per_gpu=watts),
            at=self.now(),
        )
        JobStore(self.store).transition(record.id, JobState.RUNNING, "placed", at=self.now(),
                                   gpus=[(self.gpu_ids[i], i) for i in gpus])
        job = RigJob(record.id, gpus, tokens_per_s, self.clock.now())
        for i in gpus:
            job.truth_mj[i] = [self.sim.true_energy_mj(i)]
            self.sim.set_workload(i, "training")
        JobStore(self.store).add_progress(job.id, at=self.now(), steps=0, samples=0, tokens=0)
        self.jobs.append(job)
        return job

    def end_job(self, job: RigJob, *, idle: bool = True) -> None:
        self._report_final(job)
        JobStore(self.store).transition(job.id, JobState.COMPLETED, "exited 0", at=self.now(),
                                   exit_code=0)
        job.ended_s = self.clock.now()
        for i in job.gpus:
            job.truth_mj[i].append(self.sim.true_energy_mj(i))
            if idle:
                self.sim.set_workload(i, None)

    def _report_final(self, job: RigJob) -> None:
        tokens = int(job.tokens_per_s * (self.clock.now() - job.started_s))
        JobStore(self.store).add_progress(job.id, at=self.now(), steps=tokens // 1000,
                                     samples=tokens // 500, tokens=tokens)

    def truth_j(self, job: RigJob) -> float:
        return sum(end - start for start, end in job.truth_mj.values()) / 1000.0


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        yield s
    finally:
        s.close()


def rel_err(value: float, truth: float) -> float:
    return abs(value - truth) / truth


def by_key(rows: list[Any]) -> dict[str, Any]:
    return {r.key: r for r in rows}
