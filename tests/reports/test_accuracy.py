"""Reported energy per job against the simulator's truth: exclusive and shared GPUs, a counter
reset (driver reload), a 30 s sampling gap, raw samples and rollups alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from reports.queries import Report, ReportRequest, build_report
from telemetry.store import Store, open_store
from tests.reports.conftest import Rig, RigJob, by_key, rel_err


@dataclass
class Scenario:
    rig: Rig
    a: RigJob  # GPU 0, alone
    b: RigJob  # GPU 1, alone, across the counter reset
    c: RigJob  # GPU 2, shared with d for part of its life
    d: RigJob
    gpu_truth_mj: dict[int, float]


def run_scenario(store: Store) -> Scenario:
    rig = Rig(store, gpus=3)
    first = {i: rig.sim.true_energy_mj(i) for i in range(3)}
    rig.run(30)
    rig.clock.advance(0.5)  # jobs start and end between samples
    a = rig.start_job("llama-a", (0,), watts=500.0)
    rig.run(20)
    b = rig.start_job("bert-b", (1,), user="bob", tokens_per_s=8_000.0)
    rig.run(10.3)
    c = rig.start_job("gpt-c", (2,), tokens_per_s=5_000.0)
    rig.run(90)
    rig.backend.reload(1)  # driver reload on GPU 1: its counter restarts mid-job
    rig.run(50)
    d = rig.start_job("gpt-d", (2,), user="bob", tokens_per_s=4_000.0)
    rig.run(100)
    rig.run(30, sample=False)  # 30 s without a single sample, all GPUs, every job running
    rig.run(70.7)
    rig.end_job(c, idle=False)  # d still runs on GPU 2
    rig.run(100)
    rig.end_job(a)
    rig.run(50.2)
    rig.end_job(b)
    rig.run(50)
    rig.end_job(d)
    rig.run(200)
    last = {i: rig.sim.true_energy_mj(i) for i in range(3)}
    return Scenario(rig, a, b, c, d, {i: last[i] - first[i] for i in range(3)})


def shared_truth_j(s: Scenario) -> tuple[float, float]:
    """The stated rule applied to the truth: GPU 2 split evenly while c and d share it."""
    c0, c1 = s.c.truth_mj[2]
    d0, d1 = s.d.truth_mj[2]
    shared = c1 - d0
    return ((d0 - c0) + shared / 2) / 1000, (shared / 2 + (d1 - c1)) / 1000


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('acc') / 'store.db'}")
    s = run_scenario(store)
    s.rig.store.rollup(s.rig.now())
    return s


def _report(s: Scenario, source: Any, **kw: Any) -> Report:
    request = ReportRequest(since=s.rig.start, until=s.rig.now(), now=s.rig.now(),
                            source=source, **kw)
    return build_report(s.rig.store, request)


@pytest.mark.parametrize("source", ["auto", "samples", "rollups"])
def test_each_job_is_within_one_percent_of_the_truth(scenario: Scenario, source: str) -> None:
    report = _report(scenario, source)
    rows = by_key(report.rows)
    c_truth, d_truth = shared_truth_j(scenario)
    truths = {
        str(scenario.a.id): scenario.rig.truth_j(scenario.a),
        str(scenario.b.id): scenario.rig.truth_j(scenario.b),
        str(scenario.c.id): c_truth,
        str(scenario.d.id): d_truth,
    }
    errors = {key: rel_err(rows[key].energy_j, truth) for key, truth in truths.items()}
    assert max(errors.values()) < 0.01, errors
    # idle: what the GPUs drew outside every job
    idle_truth = sum(scenario.gpu_truth_mj.values()) / 1000 - sum(
        scenario.rig.truth_j(j) for j in (scenario.a, scenario.b, scenario.c, scenario.d)
    ) + (scenario.rig.truth_j(scenario.c) + scenario.rig.truth_j(scenario.d) - c_truth - d_truth)
    assert rel_err(rows["idle"].energy_j, idle_truth) < 0.02
    total_truth = sum(scenario.gpu_truth_mj.values()) / 1000
    summary = report.summary
    assert rel_err(summary.energy_j, total_truth) < 0.01
    assert summary.idle_energy_j == pytest.approx(rows["idle"].energy_j)
    assert summary.source == ("rollups" if source == "rollups" else "samples")


def test_the_reset_and_the_gap_are_reported(scenario: Scenario) -> None:
    report = _report(scenario, "samples")
    summary = report.summary
    assert summary.counter_resets == 1
    rows = by_key(report.rows)
    assert rows[str(scenario.b.id)].method == "mixed"  # counter, trapezoid across the reset
    assert rows[str(scenario.a.id)].method == "counter"


def test_a_shared_gpu_is_split_evenly_while_shared(scenario: Scenario) -> None:
    report = _report(scenario, "auto")
    rows = by_key(report.rows)
    c, d = rows[str(scenario.c.id)], rows[str(scenario.d.id)]
    _, c1 = scenario.c.truth_mj[2]
    d0, _ = scenario.d.truth_mj[2]
    # the shared part is counted once, half each
    assert c.shared_j == pytest.approx(d.shared_j, rel=1e-9)
    assert rel_err(c.shared_j + d.shared_j, (c1 - d0) / 1000) < 0.01
    assert "evenly" in report.summary.attribution_rule


def test_tokens_and_energy_per_token(scenario: Scenario) -> None:
    report = _report(scenario, "auto")
    rows = by_key(report.rows)
    a = rows[str(scenario.a.id)]
    assert scenario.a.ended_s is not None
    tokens = int(scenario.a.tokens_per_s * (scenario.a.ended_s - scenario.a.started_s))
    assert a.tokens == tokens
    assert a.j_per_token == pytest.approx(a.energy_j / tokens)
    assert a.tokens_per_wh == pytest.approx(tokens / (a.energy_j / 3600))
    assert a.samples == tokens // 500
    assert a.peak_power_w is not None and a.peak_power_w > 300
    assert rows["idle"].tokens is None


@pytest.mark.parametrize("by", ["user", "gpu", "day", "hour"])
def test_every_grouping_adds_up_to_the_same_total(scenario: Scenario, by: str) -> None:
    jobs = _report(scenario, "auto")
    other = _report(scenario, "auto", by=by)
    total = sum(r.energy_j for r in jobs.rows)
    assert sum(r.energy_j for r in other.rows) == pytest.approx(total, rel=1e-9)
    if by == "user":
        rows = by_key(other.rows)
        job_rows = by_key(jobs.rows)
        alice = sum(job_rows[str(j.id)].energy_j for j in (scenario.a, scenario.c))
        assert rows["alice"].energy_j == pytest.approx(alice)
        assert set(rows) == {"alice", "bob", "idle"}
    if by == "gpu":
        rows = by_key(other.rows)
        for i in range(3):
            assert rel_err(rows[str(i)].energy_j, scenario.gpu_truth_mj[i] / 1000) < 0.01


def test_filters_by_job_user_and_gpu(scenario: Scenario) -> None:
    one = _report(scenario, "auto", job_id=scenario.b.id)
    assert [r.key for r in one.rows] == [str(scenario.b.id)]
    assert rel_err(one.rows[0].energy_j, scenario.rig.truth_j(scenario.b)) < 0.01
    bob = _report(scenario, "auto", user="bob")
    assert {r.key for r in bob.rows} == {str(scenario.b.id), str(scenario.d.id)}
    gpu2 = _report(scenario, "auto", gpu_index=2)
    assert {r.key for r in gpu2.rows} == {str(scenario.c.id), str(scenario.d.id), "idle"}


def test_rollups_and_raw_agree_on_postgresql_too(store_url: str) -> None:
    store = open_store(store_url)
    try:
        s = run_scenario(store)
        store.rollup(s.rig.now())
        raw = by_key(_report(s, "samples").rows)
        rolled = by_key(_report(s, "rollups").rows)
        assert raw.keys() == rolled.keys()
        for key in raw:
            assert rel_err(rolled[key].energy_j, raw[key].energy_j) < 0.01, key
        assert rel_err(raw[str(s.a.id)].energy_j, s.rig.truth_j(s.a)) < 0.01
    finally:
        store.close()
