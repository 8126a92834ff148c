"""Budgets held by the real job service and budget loop, in virtual time on simulated H100s.

Each test drives ``bench.simjob.SimNode``: the daemon's ``JobService`` (placement, the budget
loop, the actuators and their journal) with its sampler writing into a SQLite store, and
simulated training jobs that attach or are submitted, report progress and obey the service's
directives as ``scheduler.client`` does, all on one ``VirtualClock``. Power is judged the way the
acceptance states it: 10 s averages from the stored samples' energy counters, per GPU (or for the
node), sliding by 1 s, after a stated settling time. Nothing waits on a real timer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.simjob import HOST, JobSpec, SimJob, SimNode
from energy.optimizer import Knob
from scheduler.actuators import RECOVERY_REASON
from scheduler.jobs import ACTIVE_STATES, JobState
from scheduler.store import JobStore, JournalStore

SETTLE_S = 15.0  # the settling time we state; the controllers need 1-5 s on the simulator
BUDGET_W = 300.0
LIMIT_W = 306.0  # the budget + 2 %
LONG_RUN = 1_000_000  # declared steps, as the example job's --steps: ended by max_s


def job_of(name: str, **fields: object) -> JobSpec:
    """A submitted one-GPU training job declaring a long run, like ``powertrain submit --gpus 1
    ... -- pretrain_gpt.py --steps 1000000 --max-seconds S``."""
    spec: dict[str, object] = {"gpus": 1, "submit": True, "total_steps": LONG_RUN, **fields}
    return JobSpec(name, **spec)  # type: ignore[arg-type]


def finished(*jobs: SimJob) -> bool:
    """Every job has ended, as the service records it."""
    return all((r := j.record) is not None and r.state not in ACTIVE_STATES | {JobState.QUEUED}
               for j in jobs)


def run_until(node: SimNode, done: Callable[[], bool], limit_s: float) -> None:
    """Run a second at a time until ``done`` holds; fail after ``limit_s`` of virtual time."""
    end = node.now_s + limit_s
    while not done():
        assert node.now_s < end, f"not done after {limit_s:.0f} s of virtual time"
        node.run(1.0)


def span_s(node: SimNode, job: SimJob) -> tuple[float, float]:
    """When the service started and ended the job, s since the node's start."""
    record = job.record
    assert record is not None and record.started_at and record.ended_at, record
    return node.since_start_s(record.started_at), node.since_start_s(record.ended_at)


def energy_actions(job: SimJob) -> list[str]:
    return [d.what for d in job.decisions if d.source == "energy"]


@pytest.fixture
def node(tmp_path: Path) -> SimNode:
    return SimNode(gpus=4, home=tmp_path)


def test_each_mode_holds_300_w_per_gpu(node: SimNode) -> None:
    modes = ("hw", "clock", "soft")
    jobs = {m: node.add_job(job_of(m, mode=m, budget_w=BUDGET_W, max_s=45.0)) for m in modes}
    run_until(node, lambda: finished(*jobs.values()), limit_s=60.0)
    assert len({job.gpus for job in jobs.values()}) == 3  # placed on three GPUs
    for mode, job in jobs.items():
        assert job.id is not None
        view = node.service.get(job.id)
        assert view.state == "completed", view
        assert view.mode_effective == mode  # the mode chosen is recorded
        assert view.tokens_per_s and view.tokens_per_s > 0  # throughput recorded
        begin, end = span_s(node, job)
        windows = node.stored_windows_w(job.gpus, begin + SETTLE_S, end)
        assert len(windows) >= 15, (mode, len(windows))
        within = sum(w <= LIMIT_W for w in windows) / len(windows)
        assert within >= 0.99, (mode, max(windows), within)
        # It held the budget without starving the job: well above idle.
        assert min(windows) > 200.0, (mode, min(windows))
        decisions = job.decisions
        assert decisions and decisions[0].source == mode
        assert decisions[0].power_before_w is not None
        assert any(d.power_after_w is not None for d in decisions)


def test_a_crash_leaves_caps_that_the_next_daemon_undoes(
    node: SimNode, caplog: pytest.LogCaptureFixture
) -> None:
    capped = node.add_job(job_of("capped", mode="hw", budget_w=BUDGET_W, max_s=120.0))
    locked = node.add_job(job_of("locked", mode="clock", budget_w=BUDGET_W, max_s=120.0))
    run_until(node, lambda: all(j.choice is not None for j in (capped, locked)), limit_s=60.0)
    node.run(6.0)  # let the clock search settle
    gpus = {capped.gpus[0], locked.gpus[0]}
    node.crash()  # no stop, no undo: the daemon and its jobs die with the node

    assert (node.backend.read(capped.gpus[0]).power_limit_mw or 0) < 700_000  # outlived it
    assert node.backend.true_clock_mhz(locked.gpus[0]) < 1980
    left = JournalStore(node.store).outstanding(HOST)
    assert {(e.gpu_index, e.setting) for e in left} == {
        (capped.gpus[0], Knob.POWER_LIMIT), (locked.gpus[0], Knob.SM_CLOCKS)}

    with caplog.at_level(logging.INFO, logger="scheduler.actuators"):
        node.restart()  # as a restarted daemon: a new service, then Actuators.recover()
    for index in gpus:
        assert node.backend.read(index).power_limit_mw == 700_000
    # The GPU still runs its load until the new daemon reaps the dead job: unlocked, at the top.
    assert node.backend.true_clock_mhz(locked.gpus[0]) == 1980
    assert "left in force by a previous daemon" in caplog.text
    node.run(2.0)
    assert finished(capped, locked)
    for job in (capped, locked):
        record = job.record
        assert record is not None and record.state == JobState.FAILED
        assert record.end_reason and "lost" in record.end_reason

    entries = JournalStore(node.store).entries(HOST)
    undone = [e for e in entries if e.undo_reason and "previous daemon" in e.undo_reason]
    assert {e.gpu_index for e in undone} == gpus
    assert {e.setting for e in undone} == {"power_limit", "sm_clocks"}
    assert {e.undo_reason for e in undone} == {RECOVERY_REASON}
    assert {e.id for e in node.recovered} == {e.id for e in undone}
    assert not [e for e in entries if e.outstanding]


def test_dry_run_changes_no_setting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = SimNode(gpus=4, home=tmp_path, dry_run=True)
    hw = node.add_job(job_of("hw", mode="hw", budget_w=BUDGET_W, max_s=15.0))
    clock = node.add_job(job_of("clock", mode="clock", budget_w=BUDGET_W, max_s=15.0))
    limits: set[int | None] = set()
    clocks: set[float] = set()
    with caplog.at_level(logging.INFO, logger="scheduler.actuators"):
        while not finished(hw, clock):
            assert node.now_s < 60.0
            node.run(0.5)
            for index in range(4):
                limits.add(node.backend.read(index).power_limit_mw)
            if clock.gpus:
                clocks.add(node.backend.true_clock_mhz(clock.gpus[0]))
    assert limits == {700_000}
    assert min(clocks) >= 1980 or clocks <= {345.0, 1980.0}  # never locked below the top
    log = caplog.text
    assert "dry run: would set GPU" in log and "power limit to" in log
    assert "SM clocks to" in log
    entries = JournalStore(node.store).entries(HOST)
    assert {e.setting for e in entries} == {"power_limit", "sm_clocks"}  # what it would set
    assert all(e.dry_run for e in entries)
    assert all(j.record and j.record.state == JobState.COMPLETED for j in (hw, clock))


def test_energy_budgets_warn_slow_pause_and_stop(node: SimNode) -> None:
    warn = node.add_job(job_of("warn", energy_budget_wh=1.0, on_exceed="warn", max_s=20.0))
    slow = node.add_job(job_of("slow", energy_budget_wh=1.0, on_exceed="slow", mode="hw",
                               budget_w=650.0, max_s=40.0))
    pause = node.add_job(job_of("pause", energy_budget_wh=1.0, on_exceed="pause", max_s=60.0))
    stop = node.add_job(job_of("stop", energy_budget_wh=8.0, on_exceed="stop", max_s=300.0))

    run_until(node, lambda: (r := pause.record) is not None and r.state == JobState.PAUSED,
              limit_s=120.0)
    node.run(3.0)
    steps = pause.steps
    node.run(3.0)
    assert pause.steps == steps and pause.paused  # a paused client steps no more
    node.resume(pause)  # powertrain resume
    run_until(node, lambda: finished(warn, slow, pause, stop), limit_s=400.0)

    def state(job: SimJob) -> JobState | None:
        return None if job.record is None else job.record.state

    assert energy_actions(warn) == ["warn"] and state(warn) == JobState.COMPLETED
    assert energy_actions(slow) == ["slow"]
    assert any(d.source == "optimizer" for d in slow.decisions)
    assert energy_actions(pause) == ["pause", "resume"]
    assert "resumed by hand" in pause.decisions[-1].why
    assert state(pause) == JobState.COMPLETED and pause.steps > steps
    assert pause.id is not None
    states = [e.to_state for e in JobStore(node.store).events(pause.id)]
    assert states == ["queued", "running", "paused", "running", "completed"]
    assert energy_actions(stop)[-1] == "stop" and state(stop) == JobState.STOPPED
    assert stop.id is not None
    energy_wh = JobStore(node.store).energy(stop.id).energy_mj / 1000 / 3600
    assert energy_wh == pytest.approx(8.0, rel=0.02), energy_wh


def test_node_cap_holds_with_two_jobs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A submitted job within its budget, and an attached job that placement never saw and that
    has no budget: together with two idle GPUs they draw ~1200 W against a 1000 W cap."""
    node = SimNode(gpus=4, home=tmp_path, node_cap_w=1000.0)
    with caplog.at_level(logging.WARNING, logger="scheduler.budgets"):
        first = node.add_job(job_of("first", mode="auto", budget_w=400.0, priority=1,
                                    max_s=50.0))
        run_until(node, lambda: first.running, limit_s=60.0)
        # CUDA_VISIBLE_DEVICES=3, no budget: the client attaches on its own.
        second = node.add_job(JobSpec("nb", gpus=(3,), total_steps=LONG_RUN, max_s=50.0,
                                      start_s=node.now_s))
        run_until(node, lambda: finished(first, second), limit_s=300.0)
    a, b = first.record, second.record
    assert a and b and not a.attached
    assert b.attached and b.watts_per_gpu is None
    (a_start, a_end), (b_start, b_end) = span_s(node, first), span_s(node, second)
    windows = node.stored_windows_w(range(4), max(a_start, b_start) + SETTLE_S,
                                    min(a_end, b_end))
    assert len(windows) >= 10
    within = sum(w <= 1000.0 for w in windows) / len(windows)
    assert within >= 0.99, (max(windows), within)
    assert max(windows) > 900.0  # held near the cap, not far below it
    held = [d for d in second.decisions if d.source == "node-cap"]
    assert held, "the lower-priority job was the one held back"
    assert not [d for d in first.decisions if d.source == "node-cap"]
    assert "node cap:" in caplog.text


def test_a_deadline_forecasts_energy_without_declared_totals(node: SimNode) -> None:
    """A command that reports no progress: the forecast is its power until the deadline."""
    job = node.add_job(JobSpec("sleep", gpus=1, submit=True, client=False, max_s=6.0,
                               energy_budget_wh=1.0, deadline_s=3600.0, on_exceed="warn"))
    run_until(node, lambda: finished(job), limit_s=30.0)
    assert job.id is not None
    view = node.service.get(job.id)
    assert view.deadline == node.at(3600.0) and view.state == "completed"
    warnings = [d for d in job.decisions if d.source == "energy"]
    # An idle H100 (~75 W) until the deadline in an hour is ~75 Wh: over the 1 Wh budget.
    assert [d.what for d in warnings] == ["warn"]
    assert "(deadline)" in warnings[0].why


def test_a_submitted_jobs_declared_steps_reach_its_energy_forecast(node: SimNode) -> None:
    # 200 steps of 0.5 s at about 655 W: about 18 Wh, against a 12 Wh budget.
    job = node.add_job(job_of("declared", total_steps=200, energy_budget_wh=12.0,
                              on_exceed="warn"))
    node.run(15.0)
    record = job.record
    assert record is not None and record.total_steps == 200  # the service has the totals
    warnings = [d for d in job.decisions if d.source == "energy"]
    assert [d.what for d in warnings] == ["warn"]
    assert "(steps)" in warnings[0].why


def test_a_rank_that_joins_a_run_later_is_held_to_the_budget_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The ranks of a run join one by one: the run's GPUs on the node grow after its wattage
    controller started, and the controller takes the new GPU in (it failed on it before)."""
    caplog.set_level(logging.WARNING)
    with SimNode(gpus=2) as node:
        run = {"run_key": "run:late", "world_size": 2, "mode": "hw", "budget_w": 300.0}
        first = node.add_job(JobSpec("run", gpus=(0,), rank=0, **run))  # type: ignore[arg-type]
        late = node.add_job(JobSpec("run", gpus=(1,), rank=1, start_s=10.0,
                                    **run))  # type: ignore[arg-type]
        node.run(60.0)
        assert first.id == late.id
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        for index in (0, 1):
            assert node.gpu_power_w(index, 30.0, 59.0) <= 300.0 * 1.02, index
