"""JobStore on SQLite and PostgreSQL: jobs, transitions and their events, progress, energy."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from scheduler.jobs import JobState, Mode, OnExceed
from scheduler.store import (
    InvalidTransitionError,
    JobNotFoundError,
    JobStore,
    NewJob,
    ProbeRecord,
    SearchRecord,
)
from telemetry.store import Store, StoreWriteError, open_store
from telemetry.store.sql import write_transaction
from tests.store.data import at, gpu_info, reading

NEW = NewJob(
    name="llama-pretrain",
    user="alice",
    uid=1001,
    gid=1001,
    argv=("python", "train.py", "--lr", "3e-4"),
    cwd="/home/alice/run",
    host="node-a",
    env={"PATH": "/usr/bin", "HF_HOME": "/data/hf"},
    gpu_count=2,
    watts_per_gpu=450.0,
    energy_budget_wh=1200.5,
    mode=Mode.SOFT,
    on_exceed=OnExceed.PAUSE,
    priority=5,
    total_steps=10_000,
)


@pytest.fixture
def jobs(store: Store) -> JobStore:
    return JobStore(store)


def _gpus(store: Store, n: int = 4) -> dict[int, int]:
    return store.register_gpus([gpu_info(i) for i in range(n)], host="node-a", backend="simulated")


def test_the_telemetry_store_knows_no_jobs(store: Store) -> None:
    assert not hasattr(store, "jobs") and not hasattr(store, "journal")


def test_create_stores_every_field_queued_with_a_submitted_event(jobs: JobStore) -> None:
    job = jobs.create(NEW, at=at(0))
    assert job.id > 0
    assert job.state is JobState.QUEUED
    assert (job.name, job.user, job.uid, job.gid) == ("llama-pretrain", "alice", 1001, 1001)
    assert job.argv == ("python", "train.py", "--lr", "3e-4")
    assert job.env == {"PATH": "/usr/bin", "HF_HOME": "/data/hf"}
    assert (job.cwd, job.host) == ("/home/alice/run", "node-a")
    assert (job.gpu_count, job.gpu_ids_requested) == (2, None)
    assert (job.watts_per_gpu, job.energy_budget_wh) == (450.0, 1200.5)
    assert (job.mode, job.on_exceed, job.priority) == (Mode.SOFT, OnExceed.PAUSE, 5)
    assert (job.mode_effective, job.mode_reason, job.objective) == (None, None, None)
    assert (job.total_steps, job.total_tokens) == (10_000, None)
    assert job.attached is False
    assert job.submitted_at == at(0)
    assert job.started_at is None and job.ended_at is None and job.exit_code is None
    assert job.gpus == () and job.gpu_ids == ()
    assert jobs.get(job.id) == job
    [event] = jobs.events(job.id)
    assert (event.from_state, event.to_state, event.reason, event.at) == (
        None,
        JobState.QUEUED,
        "submitted",
        at(0),
    )


def test_create_an_attached_job_with_explicit_gpu_ids(jobs: JobStore) -> None:
    new = replace(
        NEW, gpu_count=None, gpu_ids_requested=(3, 1), attached=True, pid=4242,
        pid_create_time=1767268800.25,
    )  # fmt: skip
    job = jobs.create(new, at=at(1))
    assert job.attached and job.gpu_ids_requested == (3, 1)
    assert (job.pid, job.pid_create_time) == (4242, 1767268800.25)
    assert jobs.events(job.id)[0].reason == "attached"


def test_create_refuses_a_naive_time_and_both_gpu_count_and_ids(jobs: JobStore) -> None:
    with pytest.raises(ValueError, match="aware"):
        jobs.create(NEW, at=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="not both"):
        jobs.create(replace(NEW, gpu_ids_requested=(0,)), at=at(0))
    assert jobs.list() == []


def test_get_unknown_is_none(jobs: JobStore) -> None:
    assert jobs.get(12345) is None


def test_list_filters_by_state_user_and_host(store: Store, jobs: JobStore) -> None:
    ids = _gpus(store)
    a = jobs.create(NEW, at=at(0))
    b = jobs.create(replace(NEW, user="bob", uid=1002), at=at(1))
    c = jobs.create(replace(NEW, host="node-b"), at=at(2))
    jobs.transition(a.id, JobState.RUNNING, "placed", at=at(3), gpus=[(ids[0], 0)])
    assert [j.id for j in jobs.list()] == [a.id, b.id, c.id]
    assert [j.id for j in jobs.list(states=[JobState.QUEUED])] == [b.id, c.id]
    assert [j.id for j in jobs.list(states=["running", "paused"])] == [a.id]
    assert [j.id for j in jobs.list(user="bob")] == [b.id]
    assert [j.id for j in jobs.list(host="node-a", states=[JobState.QUEUED])] == [b.id]
    assert jobs.list(states=[]) == []
    assert jobs.list()[0].gpus == (0,)


def test_a_job_runs_and_completes_with_events_times_and_gpus(store: Store, jobs: JobStore) -> None:
    ids = _gpus(store)
    job = jobs.create(NEW, at=at(0))
    running = jobs.transition(
        job.id,
        JobState.RUNNING,
        "placed",
        at=at(10),
        gpus=[(ids[3], 3), (ids[2], 2)],
        pid=777,
        pid_create_time=1.5,
    )
    assert running.state is JobState.RUNNING
    assert running.started_at == at(10) and running.ended_at is None
    assert running.gpus == (2, 3) and running.gpu_ids == (ids[2], ids[3])
    assert (running.pid, running.pid_create_time) == (777, 1.5)

    done = jobs.transition(job.id, JobState.COMPLETED, "exited 0", at=at(70), exit_code=0)
    assert done.state is JobState.COMPLETED
    assert (done.started_at, done.ended_at) == (at(10), at(70))
    assert (done.exit_code, done.end_reason) == (0, "exited 0")
    assert done.gpus == (2, 3)  # kept for energy and reports
    assert [(e.from_state, e.to_state, e.reason, e.at) for e in jobs.events(job.id)] == [
        (None, JobState.QUEUED, "submitted", at(0)),
        (JobState.QUEUED, JobState.RUNNING, "placed", at(10)),
        (JobState.RUNNING, JobState.COMPLETED, "exited 0", at(70)),
    ]


def test_pause_and_resume_keep_the_first_start_time(jobs: JobStore) -> None:
    job = jobs.create(NEW, at=at(0))
    jobs.transition(job.id, JobState.RUNNING, "placed", at=at(1))
    jobs.transition(job.id, JobState.PAUSED, "energy budget exhausted", at=at(2))
    resumed = jobs.transition(job.id, JobState.RUNNING, "budget raised", at=at(3))
    assert resumed.started_at == at(1)
    stopped = jobs.transition(
        job.id, JobState.STOPPED, "energy budget exhausted", at=at(4), end_reason="budget"
    )
    assert stopped.end_reason == "budget"  # an explicit field wins
    assert len(jobs.events(job.id)) == 5


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ([], JobState.COMPLETED),
        ([], JobState.PAUSED),
        ([JobState.RUNNING], JobState.QUEUED),
        ([JobState.CANCELLED], JobState.RUNNING),
        ([JobState.RUNNING, JobState.FAILED], JobState.RUNNING),
        ([JobState.RUNNING, JobState.COMPLETED], JobState.CANCELLED),
    ],
)
def test_invalid_transitions_raise_and_write_nothing(
    jobs: JobStore, path: list[JobState], bad: JobState
) -> None:
    job = jobs.create(NEW, at=at(0))
    for i, state in enumerate(path, start=1):
        jobs.transition(job.id, state, "test", at=at(i))
    before = jobs.get(job.id)
    n_events = len(jobs.events(job.id))
    with pytest.raises(InvalidTransitionError) as caught:
        jobs.transition(job.id, bad, "nope", at=at(50), exit_code=9)
    assert isinstance(caught.value, ValueError)
    assert jobs.get(job.id) == before
    assert len(jobs.events(job.id)) == n_events


def test_transition_checks_its_arguments(jobs: JobStore) -> None:
    job = jobs.create(NEW, at=at(0))
    with pytest.raises(JobNotFoundError):
        jobs.transition(job.id + 1, JobState.RUNNING, "x", at=at(1))
    with pytest.raises(TypeError, match="state"):
        jobs.transition(job.id, JobState.RUNNING, "x", at=at(1), state="completed")
    with pytest.raises(TypeError, match="bogus"):
        jobs.transition(job.id, JobState.RUNNING, "x", at=at(1), bogus=1)
    with pytest.raises(ValueError, match="aware"):
        jobs.transition(job.id, JobState.RUNNING, "x", at=datetime(2026, 1, 1))
    after = jobs.get(job.id)
    assert after is not None and after.state is JobState.QUEUED


def test_a_bad_gpu_id_rolls_the_whole_transition_back(jobs: JobStore) -> None:
    job = jobs.create(NEW, at=at(0))
    with pytest.raises(StoreWriteError):
        jobs.transition(job.id, JobState.RUNNING, "placed", at=at(1), gpus=[(999_999, 0)])
    after = jobs.get(job.id)
    assert after is not None and after.state is JobState.QUEUED and after.started_at is None
    assert len(jobs.events(job.id)) == 1


def test_set_fields(jobs: JobStore) -> None:
    job = jobs.create(NEW, at=at(0))
    changed = jobs.set_fields(
        job.id,
        watts_per_gpu=300.0,
        energy_budget_wh=None,
        mode_effective=Mode.SOFT,
        mode_reason="no permission to set power limits",
        total_tokens=2**40,
        env={"A": "1"},
        gpu_ids_requested=(0, 1),
        gpu_count=None,
    )
    assert (changed.watts_per_gpu, changed.energy_budget_wh) == (300.0, None)
    assert changed.mode_effective is Mode.SOFT
    assert changed.mode_reason == "no permission to set power limits"
    assert changed.total_tokens == 2**40
    assert changed.env == {"A": "1"} and changed.gpu_ids_requested == (0, 1)
    assert jobs.get(job.id) == changed
    assert len(jobs.events(job.id)) == 1  # not a state change
    with pytest.raises(TypeError, match="transition"):
        jobs.set_fields(job.id, state="running")
    with pytest.raises(ValueError):
        jobs.set_fields(job.id, mode="turbo")
    with pytest.raises(ValueError, match="aware"):
        jobs.set_fields(job.id, started_at=datetime(2026, 1, 1))
    with pytest.raises(JobNotFoundError):
        jobs.set_fields(job.id + 1, priority=1)
    assert jobs.set_fields(job.id) == changed


def test_progress_and_latest(jobs: JobStore) -> None:
    job = jobs.create(NEW, at=at(0))
    assert jobs.latest_progress(job.id) is None and jobs.progress(job.id) == []
    for t in range(5):
        jobs.add_progress(job.id, at=at(t), steps=10 * t, samples=320 * t, tokens=None)
    rows = jobs.progress(job.id)
    assert [r.steps for r in rows] == [0, 10, 20, 30, 40]
    assert rows[0].tokens is None and rows[0].job_id == job.id
    assert [r.at for r in jobs.progress(job.id, since=at(3))] == [at(3), at(4)]
    latest = jobs.latest_progress(job.id)
    assert latest is not None and (latest.at, latest.steps, latest.samples) == (at(4), 40, 1280)
    with pytest.raises(StoreWriteError):
        jobs.add_progress(job.id + 1, at=at(0), steps=1, samples=None, tokens=None)


def test_throughput_over_a_window(jobs: JobStore) -> None:
    job = jobs.create(NEW, at=at(0))
    assert jobs.throughput(job.id) is None
    jobs.add_progress(job.id, at=at(0), steps=0, samples=0, tokens=0)
    assert jobs.throughput(job.id) is None  # one report is no rate
    # 2 steps/s for 60 s, then 4 steps/s for 30 s
    for t in range(1, 61):
        jobs.add_progress(job.id, at=at(t), steps=2 * t, samples=64 * t, tokens=None)
    for t in range(61, 91):
        jobs.add_progress(job.id, at=at(t), steps=120 + 4 * (t - 60), samples=None, tokens=None)
    rate = jobs.throughput(job.id, window_s=30)
    assert rate is not None
    assert rate.steps_per_s == pytest.approx(4.0)
    assert rate.samples_per_s is None and rate.tokens_per_s is None
    earlier = jobs.throughput(job.id, window_s=20, now=at(50))
    assert earlier is not None and earlier.steps_per_s == pytest.approx(2.0)
    assert earlier.samples_per_s == pytest.approx(64.0)
    assert jobs.throughput(job.id, window_s=30, now=at(200)) is None  # stalled: no reports


def test_throughput_ignores_a_restart_from_a_checkpoint(jobs: JobStore) -> None:
    job = jobs.create(NEW, at=at(0))
    for t, steps in [(0, 100), (10, 110), (11, 90), (20, 99)]:
        jobs.add_progress(job.id, at=at(t), steps=steps, samples=None, tokens=None)
    rate = jobs.throughput(job.id, window_s=60)
    assert rate is not None and rate.steps_per_s == pytest.approx((10 + 9) / 20)


def test_energy_sums_the_jobs_gpus_between_start_and_end(store: Store, jobs: JobStore) -> None:
    ids = _gpus(store)
    # every GPU draws 300 W (counter +300 J/s) from t=0 to t=100 s, one sample a second
    store.insert_samples(
        [
            (ids[i], reading(at(t), index=i, energy_mj=300_000 * t))
            for t in range(0, 101)
            for i in range(4)
        ]
    )
    job = jobs.create(NEW, at=at(0))
    assert jobs.energy(job.id).energy_mj == 0 and jobs.energy(job.id).method == "none"
    jobs.transition(job.id, JobState.RUNNING, "placed", at=at(10), gpus=[(ids[1], 1), (ids[2], 2)])
    running = jobs.energy(job.id, until=at(40))  # samples 10..39: 29 s per GPU
    assert running.energy_mj == pytest.approx(2 * 29 * 300_000)
    assert running.method == "counter" and running.n_samples == 60
    so_far = jobs.energy(job.id)  # up to the latest sample (t=100): 90 s per GPU
    assert so_far.energy_mj == pytest.approx(2 * 90 * 300_000)
    jobs.transition(job.id, JobState.COMPLETED, "exited 0", at=at(70), exit_code=0)
    done = jobs.energy(job.id)  # samples 10..69
    assert done.energy_mj == pytest.approx(2 * 59 * 300_000)
    assert done.energy_j == pytest.approx(2 * 59 * 300)
    assert jobs.energy(job.id, until=at(500)).energy_mj == done.energy_mj
    with pytest.raises(JobNotFoundError):
        jobs.energy(job.id + 1)


def test_energy_outlives_the_raw_samples_and_long_jobs_read_rollups(store: Store) -> None:
    ids = _gpus(store, 1)
    # 450 W, then 150 W after 2 h: one sample every 5 s for 8 h
    rows, energy = [], 0
    for t in range(0, 8 * 3600 + 1, 5):
        rows.append((ids[0], reading(at(t), power_mw=450_000 if t < 7200 else 150_000,
                                     energy_mj=energy)))
        energy += 5 * (450_000 if t < 7200 else 150_000)
    store.insert_samples(rows)
    short = JobStore(store).create(NEW, at=at(0))
    JobStore(store).transition(short.id, JobState.RUNNING, "placed", at=at(600), gpus=[(ids[0], 0)])
    JobStore(store).transition(short.id, JobState.COMPLETED, "exited 0", at=at(4200), exit_code=0)
    long = JobStore(store).create(NEW, at=at(0))  # 7 h: more than raw samples are read for
    JobStore(store).transition(long.id, JobState.RUNNING, "placed", at=at(3600), gpus=[(ids[0], 0)])
    JobStore(store).transition(long.id, JobState.COMPLETED, "exited 0", at=at(28800), exit_code=0)

    edges = 2 * 5 * 450_000  # either path may put a sample interval at each edge on either side
    before = JobStore(store).energy(short.id)
    assert before.energy_mj == pytest.approx(3600 * 450_000, abs=edges) and before.n_samples > 0
    store.rollup(at(8 * 3600 + 120))
    long_energy = JobStore(store).energy(long.id)
    assert long_energy.n_samples == 0  # from the rollups
    assert long_energy.energy_mj == pytest.approx(3600 * 450_000 + 6 * 3600 * 150_000, abs=edges)
    assert long_energy.method == "counter"

    assert store.apply_retention(at(8 * 3600 + 120), days=1 / 24) > 0  # samples before 7 h go
    after = JobStore(store).energy(short.id)
    assert after.n_samples == 0 and after.energy_mj == pytest.approx(before.energy_mj, abs=edges)
    assert JobStore(store).energy(long.id).energy_mj == pytest.approx(long_energy.energy_mj)


def test_two_jobstores_on_one_store_see_the_same_jobs(store: Store) -> None:
    ids = _gpus(store, 1)
    store.insert_samples([(ids[0], reading(at(t), energy_mj=1000 * t)) for t in range(5)])
    direct = JobStore(store)
    job = direct.create(NEW, at=at(0))
    direct.transition(job.id, JobState.RUNNING, "placed", at=at(0), gpus=[(ids[0], 0)])
    assert direct.energy(job.id).energy_mj == 4000
    assert JobStore(store).get(job.id) == direct.get(job.id)


def test_optimiser_searches_are_saved_replaced_and_read_back(jobs: JobStore) -> None:
    job = jobs.create(NEW, at=at(0))
    other = jobs.create(NEW, at=at(0))
    probes = (
        ProbeRecord(700_000, 40, 4.0, 2_400.0),
        ProbeRecord(450_000, 40, 4.6, 1_700.0),
    )
    first = SearchRecord(
        job_id=job.id, number=1, at=at(10), objective="energy", knob="power_limit",
        setting=450_000, top_setting=700_000, feasible=True, reason="walked down",
        revisions=0, profiling_steps=96, profiling_time_s=9.9, profiling_energy_j=4_400.0,
        probes=probes,
    )
    jobs.save_search(first)
    assert jobs.searches([job.id, other.id]) == {job.id: [first]}
    # Kept up to date while the job runs: the held setting measured longer, a revision.
    later = replace(
        first, at=at(70), setting=400_000, revisions=1, reason="walked down; revised",
        probes=(probes[0], ProbeRecord(450_000, 640, 73.6, 27_200.0),
                ProbeRecord(400_000, 40, 5.0, 1_650.0)),
    )
    jobs.save_search(later)
    second = replace(first, number=2, at=at(90), probes=())
    jobs.save_search(second)
    (stored_later, stored_second), = jobs.searches([job.id]).values()
    assert stored_later == later and stored_second == second
    assert stored_later.probe(450_000) == ProbeRecord(450_000, 640, 73.6, 27_200.0)
    assert stored_later.probe(300_000) is None
    assert stored_later.probes[0].power_w == pytest.approx(600.0)
    assert jobs.searches([]) == {}


def test_a_joint_search_keeps_its_micro_batches(jobs: JobStore) -> None:
    job = jobs.create(NEW, at=at(0))
    search = SearchRecord(
        job_id=job.id, number=1, at=at(10), objective="energy", knob="power_limit",
        setting=250_000, top_setting=700_000, feasible=True, reason="micro-batch 8 scores best",
        revisions=0, profiling_steps=200, profiling_time_s=60.0, profiling_energy_j=9_000.0,
        # the micro-batch probes at the top setting, and the setting's at the chosen one: the
        # same setting at several micro-batches
        probes=(ProbeRecord(700_000, 16, 4.0, 2_600.0, micro_batch=8),
                ProbeRecord(700_000, 16, 4.5, 2_700.0, micro_batch=2),
                ProbeRecord(250_000, 300, 60.0, 18_000.0, micro_batch=8)),
        micro_batch=8, default_micro_batch=2,
    )
    jobs.save_search(search)
    (stored,) = jobs.searches([job.id])[job.id]
    assert stored == replace(search, probes=tuple(sorted(
        search.probes, key=lambda p: (-p.setting, -(p.micro_batch or 0)))))
    assert stored.probe(700_000) == ProbeRecord(700_000, 16, 4.0, 2_600.0, micro_batch=8)


def test_a_search_is_saved_while_another_connection_writes(tmp_path: Path) -> None:
    # SQLite's: a read lock upgraded while another connection writes fails at once.
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        _save_while_another_writes(store)
    finally:
        store.close()


def _save_while_another_writes(store: Store) -> None:
    jobs = JobStore(store)
    job = jobs.create(NEW, at=at(0))
    search = SearchRecord(
        job_id=job.id, number=1, at=at(10), objective="energy", knob="power_limit",
        setting=450_000, top_setting=700_000, feasible=True, reason="walked down",
        revisions=0, profiling_steps=1, profiling_time_s=1.0, profiling_energy_j=1.0, probes=(),
    )
    locked, failed = threading.Event(), []
    holder = threading.Thread(target=_write_for, args=(store, 0.5, locked, failed))
    holder.start()
    assert locked.wait(10)  # the other connection holds the write lock now
    jobs.searches([job.id])  # this connection has read the store before
    jobs.save_search(search)  # waits for it (busy timeout) instead of failing at once
    holder.join()
    assert not failed
    assert jobs.searches([job.id]) == {job.id: [search]}


def _write_for(store: Store, seconds: float, locked: threading.Event,
               failed: list[BaseException]) -> None:
    try:
        with write_transaction(store.engine) as conn:
            conn.exec_driver_sql("UPDATE jobs SET priority = priority")
            locked.set()
            time.sleep(seconds)
    except BaseException as exc:
        failed.append(exc)
        locked.set()
