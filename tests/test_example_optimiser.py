"""The real example under the real daemon: ``--objective energy`` moves its micro-batch and power
limit and ends with less energy per token than the same job at the default.

A daemon on simulated H100s runs two copies of ``examples/pretrain_gpt.py`` (real PyTorch on the
CPU, a small model, its own micro-batch 2 of a batch of 16, one thread each) side by side, one
submitted with ``--objective energy``. The loop declares the splits of its batch; the daemon's
optimiser searches the micro-batch and the power limit while it trains. What is asserted is what
the user is told: the report names the micro-batch and the power limit it chose, and the job's
energy per token over its whole run, search included, is below the default's. Minutes of real
training: ``make test-cluster`` runs it (marker ``long``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_proc import REPO, DaemonProcess, jobs, powertrain, start_daemon, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.long]

pytest.importorskip("torch")

EXAMPLE = REPO / "examples" / "pretrain_gpt.py"
OWN = 2
STEPS = 1500


@pytest.fixture
def node() -> Iterator[tuple[DaemonProcess, Path, Path]]:
    home = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))  # short: it holds a socket
    socket = home / "d.sock"
    daemon = start_daemon(home, socket, gpus=2)
    try:
        yield daemon, home, socket
    finally:
        daemon.terminate()
        shutil.rmtree(home, ignore_errors=True)


def submit(socket: Path, name: str, *options: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POWERTRAIN_")}
    command = [sys.executable, str(EXAMPLE), "--steps", str(STEPS), "--name", name,
               "--micro-batch", str(OWN), "--layers", "2", "--dim", "64", "--heads", "2",
               "--data-mb", "2", "--eval-batches", "0", "--log-every", "500"]
    done = subprocess.run(
        [sys.executable, "-m", "scheduler", "submit", "--socket", str(socket), "--name", name,
         *options, "--", *command],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        env=env | {"OMP_NUM_THREADS": "1"},  # two jobs, one core each
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def test_objective_energy_moves_the_micro_batch_and_the_limit_of_a_real_job(
    node: tuple[DaemonProcess, Path, Path],
) -> None:
    daemon, home, socket = node
    default = submit(socket, "default")
    energy = submit(socket, "energy", "--objective", "energy")
    try:
        wait_until(daemon, lambda: all(jobs(socket)[i]["state"] not in
                                       ("queued", "running", "paused")
                                       for i in (default, energy)), timeout_s=900)
    finally:
        for job_id in (default, energy):
            if jobs(socket)[job_id]["state"] in ("queued", "running", "paused"):
                powertrain("cancel", "--socket", str(socket), str(job_id))
    assert {jobs(socket)[i]["state"] for i in (default, energy)} == {"completed"}

    done = powertrain("report", "--home", str(home), "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["key"]: row for row in json.loads(done.stdout)}
    plain, tuned = rows[str(default)], rows[str(energy)]
    (search,) = tuned["optimizer"]
    assert search["default_micro_batch"] == OWN
    # Both levers moved: a larger micro-batch than the loop's own, a limit below the top.
    assert search["micro_batch"] > OWN, search
    assert search["chosen"]["setting"] < search["default_setting"] == 700_000, search
    assert tuned["j_per_token"] < plain["j_per_token"], (tuned, plain)
    assert plain["optimizer"] == []

    text = powertrain("report", "--home", str(home), "--job", str(energy),
                      env={"COLUMNS": "250"}).stdout
    chosen_w = search["chosen"]["setting"] // 1000
    assert (f"power limit {chosen_w} W, micro-batch {search['micro_batch']} (the job's own: "
            f"{OWN})") in text, text
