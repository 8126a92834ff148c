"""The daemon's optimiser helpers (``scheduler.optimising``): windows at progress reports, the
candidate grid, windows set in seconds; which node cap the budget loop holds; and one job's failing
control."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from energy.optimizer import SettingSpace
from scheduler.budgets import BudgetLoop, Progress
from scheduler.errors import Caller
from scheduler.optimising import daemon_search, grid_step, report_point
from scheduler.schemas import AttachRequest, NodeUpdate, ProgressReport
from scheduler.service import JobService
from scheduler.settings import Settings
from scheduler.sim_adapter import SimulatedGpus
from scheduler.store import JobRecord
from telemetry.backends.simulated import SimulatedBackend
from telemetry.clock import VirtualClock
from telemetry.sampler import BatchWriter, Sampler
from telemetry.store import open_store


def test_a_window_edge_is_a_report_with_the_energy_at_its_time() -> None:
    progress = Progress()
    energy_at = [(10.0, 100.0), (11.0, 400.0), (12.0, 700.0)]
    progress.add(10.4, 50, 5_000, 0.1)
    progress.add(11.5, 60, 6_000, 0.1)
    progress.add(12.3, 70, 7_000, 0.1)  # after the last tick: its energy is not known yet
    t, steps, energy = report_point(progress.reports, energy_at, since_s=10.0) or (0, 0, 0)
    assert (t, steps) == (11.5, 60)
    assert energy == pytest.approx(400.0 + 300.0 * 0.5)
    # Nothing since the setting changed at 11.8, or no report the ticks reach: no edge yet.
    assert report_point(progress.reports, energy_at, since_s=11.8) is None
    assert report_point(Progress().reports, energy_at, since_s=0.0) is None
    assert report_point(progress.reports, [(12.0, 700.0)], since_s=0.0) is None


def test_the_grid_spans_a_range_in_about_ten_steps() -> None:
    # H100: 200-700 W in 50 W steps (11 candidates); a 250 W range keeps Zeus's 25 W, a 300 W
    # one (12 steps of 25 W) takes 50 W; H100 clocks, 345-1980 MHz, 180 MHz steps.
    assert grid_step(500_000, 25_000) == 50_000
    assert len(SettingSpace.power_limits(200_000, 700_000, 50_000).candidates()) == 11
    assert grid_step(250_000, 25_000) == 25_000
    assert grid_step(300_000, 25_000) == 50_000
    assert grid_step(1980 - 345, 90) == 180
    assert grid_step(0, 25_000) == 25_000


def test_daemon_windows_are_seconds_at_the_jobs_pace() -> None:
    slow, fast = daemon_search(0.25), daemon_search(0.005)
    # Slow steps: the step floors bind; fast steps: the seconds do.
    assert (slow.min_measure_steps, slow.screen_steps, slow.wait_steps) == (8, 16, 20)
    assert (fast.min_measure_steps, fast.screen_steps, fast.wait_steps) == (400, 800, 1000)
    assert fast.budget_steps_per_candidate == 2000 and slow.budget_steps_per_candidate == 40
    assert slow.warmup_s == fast.warmup_s == 1.5


@pytest.mark.parametrize("set_at_start", [None, 500.0])
def test_node_cap_is_held_at_run_time_only_once_set(tmp_path: Path,
                                                    set_at_start: float | None) -> None:
    """A real H200 at its 700 W default drew 688-697 W; with the default cap (the sum of the
    cards' maximum limits) the guard held such a job 3 % under it. Unset, nothing is held."""
    backend = SimulatedBackend(gpus=2, sku="A40", clock=VirtualClock())
    store = open_store(f"sqlite:///{tmp_path / 'powertrain.db'}")
    try:
        gpu_ids = store.register_gpus(backend.devices(), host="node", backend=backend.name)
        settings = Settings(home=tmp_path, node_cap_w=set_at_start)
        sampler = Sampler(backend, gpu_ids, BatchWriter(store))
        service = JobService(settings, store, backend, gpu_ids, host="node", readings=sampler)
        assert service.node_cap_w == (set_at_start or 600.0)  # placement checks against this
        assert service.budgets.node_cap_w == set_at_start
        admin = Caller(pid=1, uid=0, gid=0, user="root", admin=True)
        service.set_node(admin, NodeUpdate(node_cap_w=450.0))
        assert service.budgets.node_cap_w == 450.0
    finally:
        store.close()


def test_a_job_whose_control_fails_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two jobs under 150 W budgets on A40s (300 W); the first one's control raises every tick.
    The second is still held to its budget, and the failure is logged once, not every tick."""
    clock = VirtualClock()
    backend = SimulatedBackend(gpus=2, sku="A40", clock=clock)
    store = open_store(f"sqlite:///{tmp_path / 'powertrain.db'}")
    try:
        gpu_ids = store.register_gpus(backend.devices(), host="node", backend=backend.name)
        # The daemon's parts: the budget loop observes the sampler's readings, and the service
        # keeps the simulated GPUs busy while their jobs step.
        sampler = Sampler(backend, gpu_ids, BatchWriter(store), clock=clock)
        service = JobService(Settings(home=tmp_path), store, backend, gpu_ids, host="node",
                             readings=sampler, sim=SimulatedGpus(backend), clock=clock)
        me = Caller(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), user="me", admin=False)
        broken, fine = (
            service.attach(me, AttachRequest(name=f"job{i}", gpu_ids=[i], watts=150.0)).id
            for i in (0, 1)
        )
        hold = BudgetLoop._hold_power

        def hold_or_fail(self: BudgetLoop, job: JobRecord, *args: object) -> None:
            if job.id == broken:
                raise RuntimeError("a bug in this job's control")
            hold(self, job, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(BudgetLoop, "_hold_power", hold_or_fail)
        for second in range(1, 21):
            for job_id in (broken, fine):
                service.progress(me, job_id, ProgressReport(steps=10 * second, step_time_s=0.1))
            sampler.tick()
            service.tick()
            clock.advance(1.0)
        untouched, held = backend.read(0), backend.read(1)
        assert untouched.power_limit_mw == 300_000 and (untouched.power_avg_mw or 0) > 250_000
        assert held.power_limit_mw is not None and held.power_limit_mw < 200_000
        assert 140_000 < (held.power_avg_mw or 0) <= 151_500, held
        failures = [r for r in caplog.records if "control failed" in r.getMessage()]
        assert len(failures) == 1 and f"job {broken}:" in failures[0].getMessage()
    finally:
        store.close()
