"""A real Prometheus server scrapes a real daemon on simulated GPUs (``--metrics-address``).

Checked against that server: the energy counter's PromQL answers agree with the store's energy of
the same window; ``promtool check metrics`` passes the scraped text without a word; and every
query of the Grafana dashboard (docs/grafana/powertrain-dashboard.json) is valid PromQL that
returns data. Prometheus and promtool come from Debian's ``prometheus`` package, which CI installs
(.ci/prometheus.sh): without them this test fails, it does not skip.

One test, one daemon and one Prometheus for all three checks (about 20 s): a training client
steps on GPU 0 under a wattage and an energy budget while GPU 1 idles.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import httpx
import pytest

from energy.units import mj_to_j
from telemetry.clock import to_datetime
from telemetry.store import open_store
from tests.daemon_proc import REPO, free_port, start_daemon
from tests.prometheus_proc import Prometheus, binaries, concrete, dashboard_panels

pytestmark = pytest.mark.slow

WINDOW_S = 10.0
"""Seconds of scrapes (one a second) after the job is seen stepping; the energy checks span every
scrape, from the daemon's first."""

# A training loop that uses the client: steps of 20 ms on GPU 0 with 4096 tokens each, until the
# test creates the stop file.
JOB = """
import os, sys, time
from scheduler.client import track
sock, stop = sys.argv[1], sys.argv[2]
with track(name="prom-test", gpu_ids=[0], watts=500, energy_wh=50, total_tokens=10**9,
           socket_path=sock, report_interval_s=0.5) as job:
    while not os.path.exists(stop):
        with job.step(tokens=4096, samples=8):
            time.sleep(0.02)
"""


def _values(series: dict[str, object]) -> list[tuple[float, float]]:
    return [(float(t), float(v)) for t, v in series["values"]]  # type: ignore[attr-defined]


def test_prometheus_scrapes_the_daemon_and_agrees_with_the_store(tmp_path: Path) -> None:
    _, promtool = binaries()  # fails, with the install command, when they are missing
    metrics_port, prometheus_port = free_port(), free_port()
    home, sock, stop = tmp_path / "home", tmp_path / "api.sock", tmp_path / "stop"
    prometheus = Prometheus(tmp_path / "prometheus", prometheus_port,
                            [f"127.0.0.1:{metrics_port}"])
    daemon = start_daemon(home, sock, "--metrics-address", f"127.0.0.1:{metrics_port}", gpus=2)
    job = subprocess.Popen([sys.executable, "-c", JOB, str(sock), str(stop)], cwd=REPO)
    try:
        prometheus.wait_ready()
        # from the first scrape that shows the job stepping, WINDOW_S seconds of scrapes
        daemon.wait_for(lambda: bool(prometheus.query("powertrain_job_tokens_total > 0")),
                        timeout_s=30)
        time.sleep(WINDOW_S + 1.5)
        at = time.time()
        energy = prometheus.query("powertrain_gpu_energy_joules_total[1m]", at)
        stamps = prometheus.query("powertrain_gpu_last_sample_timestamp_seconds[1m]", at)
        # increase() over whole seconds within the scrapes: its extrapolation to the window's
        # start stays within the series
        span_s = math.floor(at - max(_values(s)[0][0] for s in energy)) - 1
        increase = prometheus.query(
            f'increase(powertrain_gpu_energy_joules_total{{gpu="1"}}[{span_s}s])', at)

        body = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        lint = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                              text=True, timeout=30)
        assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), (
            f"promtool check metrics: {lint.returncode}\n{lint.stdout}{lint.stderr}")

        empty = []
        for panel in dashboard_panels():
            for target in panel["targets"]:
                expr = concrete(target["expr"], rate_interval="10s", range_="20s")
                result = prometheus.query(expr, at)
                values = [float(r["value"][1]) for r in result]
                if not any(math.isfinite(v) for v in values):
                    empty.append(f"{panel['title']}: {target['expr']} -> {result}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    finally:
        stop.touch()
        try:
            job.wait(15)
        finally:
            if job.poll() is None:
                job.kill()
            code = daemon.terminate()  # flushes every buffered sample
            prometheus.stop()
    assert code == 0, daemon.log()

    store = open_store(f"sqlite:///{home / 'powertrain.db'}")
    try:
        gpu_ids = {g.uuid: g.id for g in store.gpus()}
        when = {s["metric"]["uuid"]: _values(s) for s in stamps}
        assert {s["metric"]["uuid"] for s in energy} == set(gpu_ids) == set(when)
        for series in energy:
            uuid = series["metric"]["uuid"]
            values = _values(series)
            # scraped every second; a busy machine may miss a few
            assert len(values) >= WINDOW_S / 2, values
            assert all(b[1] >= a[1] for a, b in pairwise(values))
            # The counter's first and last scraped values in the window, and the times of the
            # readings they count up to (scraped with them): the store's energy between those
            # two readings is the same energy.
            (t_a, e_a), (t_b, e_b) = values[0], values[-1]
            sampled = dict(when[uuid])
            since, until = to_datetime(sampled[t_a]), to_datetime(sampled[t_b])
            stored = store.gpu_energy(gpu_ids[uuid], since, until + timedelta(microseconds=1))
            assert stored.n_samples >= 20, stored
            assert stored.energy_j > 0
            assert abs((e_b - e_a) - stored.energy_j) <= 0.01 * stored.energy_j, (
                uuid, e_b - e_a, stored)
            assert (e_b - e_a) == pytest.approx(stored.energy_j, rel=1e-9)
        # increase() on the idle GPU (steady power: where its readings fall within each scrape
        # matters little) against the store's energy of the same span, the intervals across
        # its ends split in proportion to time. The energy counter moves every 100 ms, so each
        # end may be off by up to that much energy: under 1 % over the span.
        (idle,) = increase
        span = store.segment_energy(
            {gpu_ids[idle["metric"]["uuid"]]: [to_datetime(at - span_s), to_datetime(at)]},
            source="samples",
        )
        (segment,) = next(iter(span.values()))
        stored_j = mj_to_j(segment.energy_mj)
        assert abs(float(idle["value"][1]) - stored_j) <= 0.01 * stored_j, (idle, stored_j)
    finally:
        store.close()
