"""examples/pretrain_gpt.py as a real subprocess: it learns, and it reports to a (fake) daemon."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def torchrun(*args: str, nproc: int = 2, env: dict[str, str] | None = None, check: bool = True,
             ) -> subprocess.CompletedProcess[str]:
    """The script under real torchrun (``--standalone``, gloo on the CPU), ``nproc`` ranks."""
    launcher = ("POWERTRAIN_", "TORCHELASTIC_", "MASTER_")
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(launcher) and k not in
            {"CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE"}}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), str(SCRIPT), *TINY, *args]
    # a session of its own, killed whole if it overruns: the ranks would outlive torchrun
    with subprocess.Popen(command, env=base | {"OMP_NUM_THREADS": "1"} | (env or {}),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
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
    # the loop declares the splits of its batch of 8 it can train in, its own the whole batch
    assert (final["micro_batches"], final["micro_batch_default"]) == ([1, 2, 4, 8], 8)


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


def rank_finals(daemon: FakeDaemon) -> dict[tuple[int, object], dict[str, Any]]:
    """Each reporting process's last progress body, keyed by (job, member): the ranks of a run
    may join one job (then their reports name their member) or attach one job each."""
    finals: dict[tuple[int, object], dict[str, Any]] = {}
    for job in daemon.jobs.values():
        for body in daemon.reports(job.id):
            finals[job.id, body.get("member")] = body
    return finals


def test_ddp_under_torchrun_learns_and_each_rank_reports_its_own_share(folder: Path) -> None:
    sock = folder / "d.sock"
    with FakeDaemon(sock, micro_batch=2) as daemon:
        result = torchrun("--name", "tiny-ddp", env={"POWERTRAIN_SOCKET": str(sock)})
    assert "micro_batch 2" in result.stdout  # the directive splits each rank's batch of 4
    done = done_line(result.stdout)  # exactly one done line: rank 0's
    assert done["steps"] == 30 and done["tokens"] == 30 * 8 * 32  # --batch-size is global
    assert done["loss"] < done["first_loss"] - 0.5, result.stdout
    assert done["val_loss"] < done["first_loss"]
    lines = result.stdout.splitlines()
    assert sum(line.startswith("model: ") for line in lines) == 1
    assert "(4 per rank on 2 ranks)" in result.stdout
    assert [line.split()[1] for line in lines if line.startswith("step ")] == \
        ["10/30", "20/30", "30/30"]
    attaches = [body for path, body, _pid in daemon.requests if path == "/v1/jobs/attach"]
    assert len(attaches) == 2 and all(body["name"] == "tiny-ddp" for body in attaches)
    assert len({body["pid"] for body in attaches}) == 2  # one per rank process
    finals = rank_finals(daemon)
    assert len(finals) == 2, finals
    for final in finals.values():
        # each rank processed half the global batch: half the global tokens per step
        assert final["final"] and final["steps"] == 30
        assert final["tokens"] == 30 * 4 * 32 == done["tokens"] // 2
        assert final["samples"] == 30 * 4


def test_ddp_refuses_a_batch_the_world_size_does_not_divide() -> None:
    result = torchrun("--no-powertrain", "--batch-size", "7", check=False)
    assert result.returncode != 0
    assert "--batch-size 7 is the global batch" in result.stderr
    assert "multiple of the world size 2" in result.stderr
    assert "done: " not in result.stdout


@pytest.mark.distributed
def test_ddp_stop_checkpoints_once_then_every_rank_resumes(folder: Path) -> None:
    sock, ckpt = folder / "d.sock", folder / "gpt.pt"
    with FakeDaemon(sock) as daemon:
        job_id = daemon.launch()
        daemon.set_directive(job_id, state="stopped", action="stop")
        env = {"POWERTRAIN_SOCKET": str(sock), "POWERTRAIN_JOB_ID": str(job_id)}
        stopped = torchrun("--checkpoint", str(ckpt), env=env, check=False)
    assert stopped.returncode != 0, stopped.stdout + stopped.stderr
    # both ranks obeyed at the same step; rank 0 alone wrote (and printed) the checkpoint
    assert stopped.stdout.count("checkpoint: step 1 saved") == 1 and ckpt.exists()
    assert [final["steps"] for final in rank_finals(daemon).values()] == [1, 1]

    resumed = torchrun("--checkpoint", str(ckpt), "--resume", "--no-powertrain")
    assert resumed.stdout.count("resumed from") == 1 and "at step 1" in resumed.stdout
    assert done_line(resumed.stdout)["steps"] == 29
