"""Reports of a store two nodes share, on SQLite and PostgreSQL: one node's report (``node``) is
its GPUs' energy alone, and a distributed run of 4 ranks over both nodes shows its ranks and
straggler (slowest rank, its rate, the spread) in the JSON, CSV, text and HTML outputs."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from rich.console import Console

from reports.html import render_html
from reports.jobrows import MemberRow
from reports.queries import Report, ReportInputError, ReportRequest, build_report
from reports.ranks import run_ranks
from reports.render import table, to_csv, to_json
from scheduler.jobs import JobState
from scheduler.store import JobStore, NewJob, NewMember
from telemetry.store import open_store
from tests.reports.conftest import Rig, RigJob, by_key

# The ranks' step rates at their last report: rank 2 (node b) is the straggler, rank 0 the
# fastest, 30 % apart. At the first report all kept pace; only the last rate counts.
RATES = {0: 2.0, 1: 1.9, 2: 1.4, 3: 1.8}
FIRST_RATE = 2.0
# Each rank's own tokens per report: node a's ranks (0, 1) did 3 of every 10 of the run's.
TOKENS = {0: 1_000, 1: 2_000, 2: 3_000, 3: 4_000}
A_SHARE = 0.3


@dataclass
class Cluster:
    rig: Rig  # node a (2 GPUs), which also samples node b
    b: Rig  # node b (3 GPUs)
    solo: RigJob  # a plain job on b's GPU 2
    run_id: int  # the distributed run: ranks 0, 1 on a's GPUs 0, 1; ranks 2, 3 on b's 0, 1


def _member(r: int, node: Rig) -> NewMember:
    return NewMember(host=node.host, rank=r, local_rank=r % 2, world_size=4, generation=0,
                     pid=2000 + r, pid_create_time=1.0, gpus=(r % 2,))


def _build(rig: Rig) -> Cluster:
    b = rig.add_node("b", gpus=3)
    rig.run(20)
    solo = b.start_job("solo", (2,), tokens_per_s=3_000.0)
    jobs = JobStore(rig.store)
    members = []
    for r in (2, 3, 1, 0):  # a rank on b creates the run; rank 0's node owns it
        node = rig if r < 2 else b
        new = NewJob(name="gpt", user="alice", uid=1000, gid=1000, argv=("train.py",), cwd="/",
                     host=node.host, attached=True, run_key="torchrun:nodes", world_size=4,
                     generation=0)
        _, member = jobs.join_run(new, _member(r, node),
                                  gpus=[(node.gpu_ids[r % 2], r % 2)], at=rig.now())
        node.sim.set_workload(r % 2, "training")
        members.append(member)
    for n, rates in ((1, dict.fromkeys(RATES, FIRST_RATE)), (2, RATES)):
        rig.run(30)
        for m in members:
            jobs.report(m, at=rig.now(), steps=round(30 * n * rates[m.rank]),
                        samples=TOKENS[m.rank] * n // 100, tokens=TOKENS[m.rank] * n,
                        step_time_s=1 / rates[m.rank], steps_per_s=rates[m.rank])
    run_id = members[0].job_id
    jobs.transition(run_id, JobState.COMPLETED, "done", at=rig.now())
    for node in (rig, b):
        for i in (0, 1):
            node.sim.set_workload(i, None)
    rig.run(15)
    b.end_job(solo)
    rig.run(20)
    return Cluster(rig, b, solo, run_id)


@pytest.fixture
def cluster(store_url: str) -> Iterator[Cluster]:
    store = open_store(store_url)
    try:
        yield _build(Rig(store, gpus=2, host="a"))
    finally:
        store.close()


def _report(c: Cluster, **kw: Any) -> Report:
    request = ReportRequest(since=c.rig.start, until=c.rig.now(), now=c.rig.now(), **kw)
    return build_report(c.rig.store, request)


def test_a_nodes_report_is_its_gpus_energy_alone(cluster: Cluster) -> None:
    full = _report(cluster, by="gpu")
    assert sorted(r.key for r in full.rows) == ["a:0", "a:1", "b:0", "b:1", "b:2"]
    totals = {}
    for node, n_gpus in (("a", 2), ("b", 3)):
        mine = _report(cluster, node=node)
        want = sum(r.energy_j for r in full.rows if r.extra["host"] == node)
        assert want > 0
        assert mine.summary.energy_j == pytest.approx(want, rel=1e-9)
        assert mine.summary.n_gpus == n_gpus
        assert {g.host for g in mine.gpus.values()} == {node}
        by_gpu = _report(cluster, node=node, by="gpu")
        assert [r.key for r in by_gpu.rows] == [str(i) for i in range(n_gpus)], "one node: indices"
        totals[node] = mine
    assert totals["a"].summary.energy_j + totals["b"].summary.energy_j == pytest.approx(
        full.summary.energy_j, rel=1e-9)
    assert totals["a"].summary.energy_j < 0.6 * full.summary.energy_j

    # the run's energy splits over its nodes; the solo job is b's alone
    whole = by_key(_report(cluster).rows)
    run, solo = str(cluster.run_id), str(cluster.solo.id)
    on_a, on_b = by_key(totals["a"].rows), by_key(totals["b"].rows)
    assert solo not in on_a and on_b[solo].energy_j == pytest.approx(whole[solo].energy_j)
    assert on_a[run].energy_j + on_b[run].energy_j == pytest.approx(whole[run].energy_j)
    assert 0 < on_a[run].energy_j < 0.7 * whole[run].energy_j


def test_a_runs_tokens_on_a_node_are_its_ranks_there(cluster: Cluster) -> None:
    run = str(cluster.run_id)
    whole = by_key(_report(cluster).rows)[run]
    on_a = by_key(_report(cluster, node="a").rows)[run]
    on_b = by_key(_report(cluster, node="b").rows)[run]
    assert whole.tokens == 2 * sum(TOKENS.values())
    assert on_a.tokens == round(A_SHARE * whole.tokens)
    assert on_b.tokens == round((1 - A_SHARE) * whole.tokens)
    assert on_a.steps == on_b.steps == whole.steps, "every rank takes every step"
    assert on_a.j_per_token == pytest.approx(on_a.energy_j / on_a.tokens)


def test_an_unknown_node_is_one_error_naming_the_known_ones(cluster: Cluster) -> None:
    with pytest.raises(ReportInputError,
                       match=r"^no GPU of node 'c' in the store: the nodes with GPUs are a, b$"):
        _report(cluster, node="c")
    with pytest.raises(ReportInputError, match=r"^no GPU with index 2 on node a$"):
        _report(cluster, node="a", gpu_index=2)
    assert [g.index for g in _report(cluster, node="b", gpu_index=2).gpus.values()] == [2]


def test_the_straggler_view_in_json_csv_text_and_html(cluster: Cluster) -> None:
    report = _report(cluster)
    run, solo = str(cluster.run_id), str(cluster.solo.id)
    rows = {r["key"]: r for r in json.loads(to_json(report))}
    ranks = rows[run]["ranks"]
    assert ranks == {
        "members": 4, "world_size": 4, "generation": 0, "nodes": ["a", "b"],
        "slowest_rank": 2, "slowest_steps_per_s": 1.4,
        "fastest_rank": 0, "fastest_steps_per_s": 2.0,
        "spread": pytest.approx(0.3),
    }
    assert rows[solo]["ranks"] is None, "one process: no ranks"

    by_csv = {r["key"]: r for r in csv.DictReader(io.StringIO(to_csv(report)))}
    assert by_csv[run]["ranks_slowest_rank"] == "2"
    assert float(by_csv[run]["ranks_spread"]) == pytest.approx(0.3)
    assert by_csv[run]["ranks_nodes"] == "a b"
    assert by_csv[solo]["ranks_slowest_rank"] == "" and "ranks" not in by_csv[solo]

    console = Console(file=io.StringIO(), width=200)
    console.print(table(report))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert (f"Job {run}, 4 of 4 ranks on 2 nodes: slowest rank 2 at 1.40 steps/s, fastest "
            "rank 0 at 2.00 steps/s: spread 30% over 4 ranks.") in text
    assert f"Job {solo}," not in text

    page = render_html(report, {})
    assert "<h2>Ranks of distributed runs</h2>" in page and f"<h3>Job {run} (gpt)</h3>" in page
    steps = round(60 * RATES[2])
    assert ('<tr><td class="">2 (slowest)</td><td class="">b</td><td class="">0</td>'
            f'<td class="n">{steps}</td><td class="n">1.40</td><td class="">completed</td>'
            "</tr>") in page
    section = page.split("<h2>Ranks of distributed runs</h2>")[1].split("<h2>")[0]
    assert section.count("(slowest)") == 1 and section.count('<td class="">completed</td>') == 4


def test_a_nodes_report_shows_the_whole_runs_ranks(cluster: Cluster) -> None:
    report = _report(cluster, node="a", by="gpu")
    assert list(report.ranks) == [cluster.run_id]
    view = report.ranks[cluster.run_id]
    assert [(m.rank, m.host) for m in view.members] == [(0, "a"), (1, "a"), (2, "b"), (3, "b")]
    assert view.view is not None and view.view.slowest_rank == 2


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _row(rank: int, generation: int, rate: float | None, world: int = 4) -> MemberRow:
    return MemberRow(job_id=7, host="a", rank=rank, local_rank=rank, world_size=world,
                     generation=generation, gpus=(rank,), state="running", steps=0, samples=0,
                     tokens=0, step_time_s=None, steps_per_s=rate, joined_at=T0, ended_at=None)


def test_only_the_latest_generation_counts() -> None:
    old = [_row(r, 0, 1.0 + r) for r in range(4)]
    new = [_row(1, 1, 0.5, world=2), _row(0, 1, None, world=2)]
    view = run_ranks([*old, *new])
    assert view is not None
    assert (view.generation, view.world_size, [m.rank for m in view.members]) == (1, 2, [0, 1])
    assert view.view is None, "one rate is not a straggler view"
    assert "no step rates yet" in view.sentence()
    assert run_ranks([_row(0, 0, 1.0)]) is None and run_ranks([]) is None
    both = run_ranks([*old, _row(0, 1, 1.0, world=2), _row(1, 1, 0.5, world=2)])
    assert both is not None and both.view is not None
    assert (both.view.slowest_rank, both.view.spread, both.view.ranks) == (1, 0.5, 2)
