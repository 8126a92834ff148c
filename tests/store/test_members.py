"""Runs and members in the store, on SQLite and PostgreSQL: one job per live run, its members'
totals, the checks that keep a run whole, and the per-node view of a run's GPUs."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from scheduler.jobs import JobState, MemberState
from scheduler.store import JobStore, MembershipError, NewJob, NewMember
from telemetry.backends.base import GpuInfo
from telemetry.store import Store, open_store

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def gpus_of(store: Store, host: str, n: int = 2) -> dict[int, int]:
    infos = [GpuInfo(index=i, uuid=f"GPU-{host}-{i}", name="sim", min_limit_mw=None,
                     max_limit_mw=None, default_limit_mw=None, min_sm_clock_mhz=None,
                     max_sm_clock_mhz=None, memory_total_bytes=None, has_energy_counter=True)
             for i in range(n)]
    return store.register_gpus(infos, host=host, backend="simulated")


def run(key: str = "torchrun:abc", uid: int = 1000, host: str = "a") -> NewJob:
    return NewJob(name="gpt", user="alice", uid=uid, gid=uid, argv=("train.py",), cwd="/",
                  host=host, attached=True, run_key=key, world_size=4, generation=0)


def rank(r: int, host: str, world: int = 4, generation: int = 0, pid: int = 0) -> NewMember:
    return NewMember(host=host, rank=r, local_rank=r % 2, world_size=world,
                     generation=generation, pid=pid or 1000 + r, pid_create_time=1.0,
                     gpus=(r % 2,))


def join(jobs: JobStore, ids: dict[str, dict[int, int]], r: int, host: str, **kw: int):  # type: ignore[no-untyped-def]
    member = rank(r, host, **kw)
    return jobs.join_run(run(host=host), member,
                         gpus=[(ids[host][member.gpus[0]], member.gpus[0])], at=T0)


def test_the_ranks_of_a_run_on_two_nodes_join_one_job(store: Store) -> None:
    jobs = JobStore(store)
    ids = {"a": gpus_of(store, "a"), "b": gpus_of(store, "b")}
    for r, host in ((2, "b"), (3, "b"), (1, "a"), (0, "a")):
        _, member = join(jobs, ids, r, host)
        assert member.rank == r and member.host == host and member.state is MemberState.RUNNING
    (only,) = jobs.list()
    assert only.state is JobState.RUNNING and only.attached and only.world_size == 4
    assert only.host == "a", "rank 0's node owns the run (rank 2 created it on b)"
    assert sorted(zip(only.gpu_hosts, only.gpus, strict=True)) == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    on_b = only.on("b")
    assert on_b.gpus == (0, 1) and set(on_b.gpu_ids) == set(ids["b"].values())
    assert only.spans_nodes("a") and not on_b.spans_nodes("b")
    assert [m.rank for m in jobs.members([only.id])[only.id]] == [0, 1, 2, 3]
    # every node sees the run as its own; a third node does not
    assert [j.id for j in jobs.list(node="b")] == [only.id]
    assert jobs.list(node="c") == []


def test_a_runs_totals_are_sums_and_its_steps_the_fewest(store: Store) -> None:
    jobs = JobStore(store)
    ids = {"a": gpus_of(store, "a"), "b": gpus_of(store, "b")}
    members = [join(jobs, ids, r, "a" if r < 2 else "b")[1] for r in range(4)]
    for m in members:
        totals = jobs.report(m, at=T0 + timedelta(seconds=1), steps=10 + m.rank,
                             samples=2 * (m.rank + 1), tokens=100 * (m.rank + 1),
                             step_time_s=0.1, steps_per_s=5.0)
    assert totals == (10, 20, 1000)
    assert jobs.run_totals(members[0].job_id) == (10, 20, 1000)
    series = jobs.progress(members[0].job_id)
    assert [p.tokens for p in series] == [100, 300, 600, 1000], "each report adds the run's sum"
    assert jobs.member(members[3].id).steps == 13  # type: ignore[union-attr]


def test_a_rank_taken_twice_and_a_world_that_changes_are_refused(store: Store) -> None:
    jobs = JobStore(store)
    ids = {"a": gpus_of(store, "a")}
    job, _ = join(jobs, ids, 0, "a")
    with pytest.raises(MembershipError, match=r"rank 0 of job .* already taken by pid 1000"):
        jobs.join(job.id, rank(0, "a", pid=4242), gpus=[], at=T0)
    with pytest.raises(MembershipError, match=r"world has 3 processes, but job .* has 4"):
        jobs.join(job.id, rank(1, "a", world=3), gpus=[], at=T0)
    with pytest.raises(MembershipError, match=r"another|not yours"):
        jobs.join_run(run(uid=2000), rank(1, "a"), gpus=[], at=T0)
    assert [m.rank for m in jobs.members([job.id])[job.id]] == [0], "nothing was written"
    # an elastic restart (a new generation) may change the world size
    _, joined = jobs.join(job.id, rank(0, "a", world=2, generation=1), gpus=[], at=T0)
    first, second = jobs.members([job.id])[job.id]
    assert first.state is MemberState.STOPPED and "elastic generation 1" in str(first.end_reason)
    now = jobs.get(job.id)
    assert now is not None and second.id == joined.id
    assert (now.world_size, now.generation) == (2, 1)
    with pytest.raises(MembershipError, match=r"generation 0, but job .* is at generation 1"):
        jobs.join(job.id, rank(1, "a"), gpus=[], at=T0)


def test_the_same_process_joining_again_gets_its_member_back(store: Store) -> None:
    """A client whose first attach answer was lost (a timeout) attaches again: same member."""
    jobs = JobStore(store)
    ids = {"a": gpus_of(store, "a")}
    job, first = join(jobs, ids, 0, "a")
    again_job, again = join(jobs, ids, 0, "a")
    assert (again_job.id, again.id) == (job.id, first.id)
    assert len(jobs.members([job.id])[job.id]) == 1


def test_a_run_key_names_a_new_job_once_the_last_has_ended(store: Store) -> None:
    jobs = JobStore(store)
    ids = {"a": gpus_of(store, "a")}
    first, _ = join(jobs, ids, 0, "a")
    jobs.transition(first.id, JobState.COMPLETED, "done", at=T0 + timedelta(seconds=5))
    assert all(m.state is MemberState.COMPLETED for m in jobs.members([first.id])[first.id])
    with pytest.raises(MembershipError, match="completed: only a running job takes members"):
        jobs.join(first.id, rank(1, "a"), gpus=[], at=T0)
    second, _ = join(jobs, ids, 0, "a")
    assert second.id != first.id


def test_daemons_racing_to_create_a_run_make_one_job(store_url: str) -> None:
    """Two stores (two daemons) create the same run at once: one job, both ranks in it."""
    stores = [open_store(store_url) for _ in range(2)]
    try:
        ids = {"a": gpus_of(stores[0], "a"), "b": gpus_of(stores[1], "b")}
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def go(i: int) -> None:
            host = "ab"[i]
            barrier.wait()
            try:
                join(JobStore(stores[i]), ids, i, host)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        (job,) = JobStore(stores[0]).list()
        assert sorted(m.rank for m in JobStore(stores[0]).members([job.id])[job.id]) == [0, 1]
    finally:
        for s in stores:
            s.close()
