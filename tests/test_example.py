"""examples/pretrain_gpt.py as a real subprocess: it learns, and it reports to a (fake) daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_daemon import FakeDaemon

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "pretrain_gpt.py"
TINY = ["--steps", "30", "--batch-size", "8", "--seq-len", "32", "--layers", "1", "--dim", "32",
        "--heads", "2", "--data-mb", "0.3", "--log-every", "10", "--eval-batches", "2"]


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))  # short: it holds a socket
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(*args: str, env: dict[str, str] | None = None, check: bool = True,
        ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("POWERTRAIN_") and k != "CUDA_VISIBLE_DEVICES"}
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY, *args], env=base | (env or {}),
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def done_line(stdout: str) -> dict[str, float]:
    (line,) = [line for line in stdout.splitlines() if line.startswith("done: ")]
    return {key: float(value) for key, value in
            (field.split("=") for field in line.removeprefix("done: ").split())}


def test_trains_without_powertrain() -> None:
    result = run("--no-powertrain", "--micro-batch", "3")
    done = done_line(result.stdout)
    assert done["steps"] == 30 and done["tokens"] == 30 * 8 * 32
    assert done["seconds"] > 0 and done["tokens_per_s"] > 0
    assert done["loss"] < done["first_loss"] - 0.5, result.stdout
    assert done["val_loss"] < done["first_loss"]
    assert "micro_batch 3" in result.stdout


def test_reports_cumulative_tokens_to_the_daemon(folder: Path) -> None:
    sock = folder / "d.sock"
    with FakeDaemon(sock, micro_batch=4) as daemon:
        result = run("--name", "tiny-gpt", env={"POWERTRAIN_SOCKET": str(sock)})
    assert "micro_batch 4" in result.stdout  # the daemon's directive, known before step 1
    done = done_line(result.stdout)
    (job,) = daemon.jobs.values()
    assert job.attach is not None and job.attach["name"] == "tiny-gpt"
    assert job.attach["total_tokens"] == 30 * 8 * 32
    final = daemon.reports(job.id)[-1]
    assert final["final"] and final["tokens"] == done["tokens"] and final["steps"] == 30


def test_stop_checkpoints_then_resume_finishes(folder: Path) -> None:
    sock, ckpt = folder / "d.sock", folder / "gpt.pt"
    with FakeDaemon(sock) as daemon:
        job_id = daemon.launch()
        daemon.set_directive(job_id, state="stopped", action="stop")
        env = {"POWERTRAIN_SOCKET": str(sock), "POWERTRAIN_JOB_ID": str(job_id)}
        stopped = run("--checkpoint", str(ckpt), env=env, check=False)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert f"job {job_id} stopped" in stopped.stderr
    assert "checkpoint: step 1 saved" in stopped.stdout and ckpt.exists()
    assert daemon.reports(job_id)[-1]["steps"] == 1

    resumed = run("--checkpoint", str(ckpt), "--resume", "--no-powertrain")
    assert "resumed from" in resumed.stdout and "at step 1" in resumed.stdout
    assert done_line(resumed.stdout)["steps"] == 29
