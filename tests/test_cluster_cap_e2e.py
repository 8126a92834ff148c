"""The cluster power cap with real daemons: two nodes on one PostgreSQL, a job on each, one cap
over both; the leader divides it, every node holds its part, and when the leader's daemon is
killed another leads within 10 s while the cap holds throughout."""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from telemetry.store import open_store
from tests.daemon_proc import REPO, DaemonProcess, powertrain, start_daemon, submit
from tests.test_distributed_e2e import daemon_gpus, wait

GATED = REPO / "tests" / "jobs" / "gated.py"
CAP_W = 1000.0


def status(pg_url: str) -> dict[str, Any]:
    done = powertrain("cluster", "status", "--json", "--db", pg_url)
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def window_means(pg_url: str, since: datetime, until: datetime) -> list[float]:
    """The cluster's draw (every GPU's samples) in each whole 10 s window of [since, until)."""
    store = open_store(pg_url)
    try:
        sums: dict[int, float] = defaultdict(float)
        for gpu in store.gpus():
            by_window: dict[int, list[float]] = defaultdict(list)
            for s in store.samples(gpu.id, since, until):
                if s.power_avg_mw is not None:
                    k = int((s.sampled_at - since).total_seconds() // 10)
                    by_window[k].append(s.power_avg_mw / 1000)
            for k, watts in by_window.items():
                sums[k] += statistics.fmean(watts)
    finally:
        store.close()
    whole = int((until - since).total_seconds() // 10)
    return [sums[k] for k in range(whole) if k in sums]


@pytest.mark.cluster
def test_one_cap_over_two_nodes_survives_its_leader(
    pg_url: str, tmp_path: Path, sock_dir: Path
) -> None:
    socks = {n: sock_dir / f"{n}.sock" for n in "ab"}
    daemons: dict[str, DaemonProcess] = {}
    for n in "ab":  # a first: it creates the schema
        daemons[n] = start_daemon(tmp_path / n, socks[n], "--node", f"node-{n}", "--db",
                                  pg_url, gpus=2)
    gate = tmp_path / "open"
    gate.touch()
    alive = list(daemons.values())
    try:
        jobs = {n: submit(socks[n], "--name", f"load-{n}", "--", sys.executable, str(GATED),
                          "--steps", "1000000", "--gate", str(gate), "--step-s", "0.02")
                for n in "ab"}
        wait(lambda: all(g["power_w"] > 300 for n in "ab" for g in daemon_gpus(socks[n])
                         if g["job"] == jobs[n]), "both jobs drawing", alive)
        set_cap = powertrain("cluster", "cap", str(CAP_W), "--db", pg_url)
        assert set_cap.returncode == 0, set_cap.stderr

        def divided() -> bool:
            data = status(pg_url)
            return data["leader"] is not None and len(data["jobs"]) == 2
        wait(divided, "the leader's first division", alive)
        data = status(pg_url)
        assert sum(n["cap_w"] for n in data["nodes"]) == pytest.approx(CAP_W, rel=1e-6)
        share = {j["job"]: j["watts_per_gpu"] for j in data["jobs"]}

        def held(n: str) -> bool:  # the job's GPU limited to its share of the cap
            watts = status(pg_url)["jobs"]
            mine = next(j["watts_per_gpu"] for j in watts if j["job"] == jobs[n])
            return all(g["power_limit_w"] <= mine + 1 for g in daemon_gpus(socks[n])
                       if g["job"] == jobs[n])
        wait(lambda: held("a") and held("b"), "each node holding its jobs' shares", alive)
        assert all(w < 700 for w in share.values()), share  # under the card's top limit
        held_from = datetime.now(UTC)
        time.sleep(12)

        # the leader's daemon dies: another node leads within 10 s
        leader = status(pg_url)["leader"]
        n_dead = leader.removeprefix("node-")
        term = status(pg_url)["term"]
        daemons[n_dead].kill()
        killed = datetime.now(UTC)
        alive = [d for n, d in daemons.items() if n != n_dead]
        wait(lambda: status(pg_url)["leader"] not in (None, leader), "a new leader", alive,
             timeout_s=20)
        after = status(pg_url)
        # when the new leader took the lease, by the store (not when this test saw it)
        took_s = (datetime.fromisoformat(after["leader_since"]) - killed).total_seconds()
        assert 0 < took_s <= 10, took_s
        assert after["term"] > term
        time.sleep(12)
        until = datetime.now(UTC)
        means = window_means(pg_url, held_from, until)
        assert len(means) >= 2 and max(means) <= CAP_W, means
    finally:
        for d in alive:
            d.terminate()
        for proc in psutil.process_iter(["cmdline"]):  # jobs outlive their daemons
            if str(gate) in (proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
    logs = "".join(d.log() for d in daemons.values())
    assert "cluster cap: this node leads" in logs


def test_cluster_cap_says_in_one_line_what_is_wrong(tmp_path: Path) -> None:
    for args, words in ((["cap", "lots"], "WATTS"), (["cap", "0"], "positive"),
                        (["cap", "nan"], "positive"), (["status"], "no store")):
        done = powertrain("cluster", *args, "--home", str(tmp_path))
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines


