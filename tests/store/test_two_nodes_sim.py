"""Two nodes on one store for ten minutes of virtual time: each node's daemon (the real job service,
budget loop, sampler and writer of ``bench.simjob.SimNode``) samples, rolls up and retains its own
node's data; a run with a rank on each node is one job whose energy decisions its owner takes and
the other node carries out; each node's report is its own samples' energy. On PostgreSQL, the
store several nodes share."""

from __future__ import annotations

import logging

import pytest

from bench.simjob import JobSpec, SimNode
from energy.optimizer import Knob
from energy.units import mj_to_j
from reports.queries import ReportRequest, build_report
from scheduler.jobs import JobState
from scheduler.store import JobStore, JournalStore
from telemetry.store import Store

MINUTES = 10


def counter_energy_j(store: Store, host: str, since_s: float, node: SimNode) -> float:
    """A node's GPUs' energy from their own samples: each counter's last minus its first."""
    total = 0.0
    for gpu in store.gpus(host=host):
        samples = [s for s in store.samples(gpu.id, since=node.at(since_s), until=node.at(
            node.now_s)) if s.energy_mj is not None]
        total += mj_to_j(samples[-1].energy_mj - samples[0].energy_mj)  # type: ignore[operator]
    return total


def report_energy_j(store: Store, host: str, since_s: float, node: SimNode) -> float:
    report = build_report(store, ReportRequest(
        since=node.at(since_s), until=node.at(node.now_s), by="gpu", node=host,
        now=node.at(node.now_s)))
    return sum(row.energy_j for row in report.rows)


@pytest.mark.cluster
def test_two_nodes_share_one_store_for_ten_minutes(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    a = SimNode(gpus=2, host="node-a", store_url=pg_url, seed=1)
    b = SimNode(gpus=2, host="node-b", store_url=pg_url, seed=2)
    try:
        # A run with one rank on each node, handed to the energy optimiser by its budget
        # (``slow``). Its ranks report every 2 s (the client's default is 1 s): the test is
        # about the store, and half the reports take half the time.
        run = {"run_key": "run:two-nodes", "world_size": 2, "total_steps": 10**6,
               "energy_budget_wh": 1.0, "on_exceed": "slow", "report_interval_s": 2.0}
        rank0 = a.add_job(JobSpec("run", gpus=(0,), rank=0, **run))  # type: ignore[arg-type]
        rank1 = b.add_job(JobSpec("run", gpus=(0,), rank=1, **run))  # type: ignore[arg-type]
        # A run held to 300 W per GPU by pacing (soft mode): each node's controller asks its
        # own duty, and both ranks are paced at the lower.
        soft = {"run_key": "run:soft", "world_size": 2, "mode": "soft", "budget_w": 300.0,
                "report_interval_s": 2.0}
        paced = [n.add_job(JobSpec("soft", gpus=(1,), rank=r, **soft))  # type: ignore[arg-type]
                 for r, n in enumerate((a, b))]
        for second in range(MINUTES * 60):
            a.run(1.0)
            b.run(1.0)
            if second % 60 == 59:  # the daemons' rollup job, each for its own node
                for n in (a, b):
                    n.store.rollup(n.at(n.now_s), host=n.host)
        store = a.store
        jobs = JobStore(store)

        # No store error, no failing control on either node.
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text

        # One job for the run, owned by rank 0's node, with both ranks.
        assert rank0.id == rank1.id and rank0.id is not None
        job = jobs.get(rank0.id)
        assert job is not None and job.state is JobState.RUNNING and job.host == "node-a"
        assert sorted(job.gpu_hosts) == ["node-a", "node-b"]
        # The owner's optimiser searched (a's decisions), b applied what it chose.
        (search, *_) = jobs.searches([job.id])[job.id]
        assert search.knob is Knob.POWER_LIMIT
        assert job.knob is Knob.POWER_LIMIT and job.knob_setting is not None
        limits = {n.host: [e.value for e in JournalStore(store).entries(n.host, job_id=job.id)]
                  for n in (a, b)}
        assert limits["node-a"] and limits["node-b"], limits
        assert limits["node-b"][-1] == limits["node-a"][-1] == job.knob_setting
        followed = [d for d in jobs.decisions(job.id) if "node node-a, which owns" in d.why]
        assert followed, "node b recorded why it set its GPU"

        # The paced run: one duty for both ranks, and both GPUs at or under the budget.
        duties = [p.directive.duty for p in paced]
        assert duties[0] < 1.0 and duties[0] == pytest.approx(duties[1], abs=0.02), duties
        for n in (a, b):
            assert n.gpu_power_w(1, 300.0, n.now_s - 1.0) <= 300.0 * 1.03, n.host

        # Rollups per node: every GPU of both nodes is rolled up, each by its own node.
        for n in (a, b):
            for gpu in store.gpus(host=n.host):
                assert len(store.rollups(gpu.id)) >= MINUTES - 2, (n.host, gpu.index)

        # Each node's report is its own samples' energy (the other node's GPUs are not in it).
        since_s = 30.0
        for n in (a, b):
            own_j = counter_energy_j(store, n.host, since_s, n)
            assert report_energy_j(store, n.host, since_s, n) == pytest.approx(own_j, rel=0.01)
        both_j = counter_energy_j(store, "node-a", since_s, a) + counter_energy_j(
            store, "node-b", since_s, b)
        assert report_energy_j(store, "node-a", since_s, a) < 0.75 * both_j

        # Retention per node: node a drops its samples older than five minutes; b keeps all.
        before = {n.host: sum(store.sample_count(g.id) for g in store.gpus(host=n.host))
                  for n in (a, b)}
        a_report_j = report_energy_j(store, "node-a", since_s, a)
        deleted = a.store.apply_retention(a.at(a.now_s), 5 / 1440, host="node-a")
        after = {n.host: sum(store.sample_count(g.id) for g in store.gpus(host=n.host))
                 for n in (a, b)}
        assert deleted > 0 and after["node-a"] == before["node-a"] - deleted
        assert after["node-b"] == before["node-b"]
        # the report of a's older minutes now comes from its rollups, and agrees
        assert report_energy_j(store, "node-a", since_s, a) == pytest.approx(a_report_j, rel=0.01)
    finally:
        a.close()
        b.close()
