"""Distributed runs end to end: real torchrun ranks (gloo on the CPU) training with the client,
real daemons on simulated GPUs, and, for two nodes, one real PostgreSQL store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler.store import JobStore
from telemetry.store import open_store
from tests.daemon_proc import REPO, DaemonProcess, cli, free_port, start_daemon, submit

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

DDP = REPO / "tests" / "jobs" / "ddp_train.py"
TOKENS_PER_STEP = 100 + 200 + 300 + 400  # rank r processes (r + 1) * 100 tokens a step


def torchrun(*args: str, nproc: int, env: dict[str, str], nodes: tuple[int, int] | None = None,
             port: int = 0) -> subprocess.Popen[str]:
    """``torchrun`` of tests/jobs/ddp_train.py: standalone, or node ``i`` of ``n`` (c10d)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--max-restarts", "0"]
    if nodes is None:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(nodes[1]), "--node_rank", str(nodes[0]), "--master_addr",
                "127.0.0.1", "--master_port", str(port)]
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("POWERTRAIN_", "TORCHELASTIC_", "CUDA_"))}
    # a session of its own: a failed test kills the ranks with their agent (kill_run)
    return subprocess.Popen([*cmd, str(DDP), *args], env=clean | env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_run(proc: subprocess.Popen[str]) -> None:
    """Kill torchrun and every rank it started (they would outlive it, stepping on)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def finish(proc: subprocess.Popen[str], timeout_s: float = 180) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            kill_run(proc)
    assert proc.returncode == 0, out
    return out


def job_views(sock: Path) -> list[dict[str, Any]]:
    done = cli(sock, "jobs", "--all", "--json")
    assert done.returncode == 0, done.stderr
    views: list[dict[str, Any]] = json.loads(done.stdout)
    return views


def the_job(sock: Path) -> dict[str, Any]:
    (view,) = job_views(sock)
    return view


def wait(condition: Callable[[], bool], what: str, daemons: list[DaemonProcess],
         timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (ValueError, KeyError, AssertionError):  # nothing to look at yet
            pass
        time.sleep(0.2)
    logs = "\n".join(d.log()[-4000:] for d in daemons)
    raise AssertionError(f"timed out waiting for {what}; daemon logs:\n{logs}")


def daemon_gpus(sock: Path) -> list[dict[str, Any]]:
    """The daemon's view of its GPUs (``GET /v1/gpus``): the job on each, power, limit."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                      base_url="http://powertrain") as http:
        rows: list[dict[str, Any]] = http.get("/v1/gpus").json()
    return rows


def check_completed_run(view: dict[str, Any], steps: int, out: Path) -> None:
    assert view["state"] == "completed", view["end_reason"]
    assert view["world_size"] == 4 and view["steps"] == steps
    assert view["tokens"] == steps * TOKENS_PER_STEP, "every rank's tokens, each counted once"
    assert view["samples"] == steps * (1 + 2 + 3 + 4)
    members = view["members"]
    assert sorted(m["rank"] for m in members) == [0, 1, 2, 3]
    assert all(m["state"] == "completed" and m["steps"] == steps for m in members)
    assert sorted(g for m in members for g in m["gpus"]) == [0, 1, 2, 3]
    assert sorted(int(p.read_text()) for p in out.glob("rank*.done")) == [steps] * 4


@pytest.fixture
def node(tmp_path: Path, sock_dir: Path) -> Iterator[tuple[DaemonProcess, Path]]:
    sock = sock_dir / "api.sock"
    daemon = start_daemon(tmp_path / "home", sock)
    try:
        yield daemon, sock
    finally:
        assert daemon.terminate() == 0, daemon.log()


@pytest.mark.distributed
def test_an_attached_torchrun_run_of_four_ranks_is_one_job(
    node: tuple[DaemonProcess, Path], tmp_path: Path
) -> None:
    daemon, sock = node
    out = tmp_path / "out"
    proc = torchrun("--steps", "30", "--out", str(out), nproc=4,
                    env={"POWERTRAIN_SOCKET": str(sock), "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    finish(proc)
    wait(lambda: the_job(sock)["state"] != "running", "the run to end", [daemon])
    view = the_job(sock)
    assert view["attached"] and view["run_key"].startswith("torchrun:")
    check_completed_run(view, 30, out)
    assert view["end_reason"] == "all 4 ranks ended cleanly"
    assert view["gpus"] == [0, 1, 2, 3]


@pytest.mark.distributed
def test_a_submitted_torchrun_run_of_four_ranks_is_one_job(
    node: tuple[DaemonProcess, Path], tmp_path: Path
) -> None:
    daemon, sock = node
    out = tmp_path / "out"
    job_id = submit(sock, "--gpus", "4", "--name", "ddp", "--", sys.executable, "-m",
                    "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                    str(DDP), "--steps", "30", "--out", str(out))
    wait(lambda: the_job(sock)["state"] not in ("queued", "running"), "the job to end", [daemon])
    view = the_job(sock)
    assert view["id"] == job_id and not view["attached"] and view["exit_code"] == 0
    check_completed_run(view, 30, out)
    ranks = cli(sock, "jobs", str(job_id), "--ranks")
    assert ranks.returncode == 0 and "4 members" in ranks.stdout, ranks.stdout + ranks.stderr


@pytest.mark.cluster
def test_a_run_over_two_nodes_on_one_postgresql_store(
    pg_url: str, tmp_path: Path, sock_dir: Path
) -> None:
    """A 4-rank run, 2 + 2 on two nodes (two daemons, one PostgreSQL): one job with one budget;
    its energy is both nodes' GPUs'; its wattage holds on all four; a pause holds every rank at
    one step, resume lets them finish; a node's daemon killed mid-run leaves the run going, and
    its restart adopts its ranks again."""
    socks = {n: sock_dir / f"{n}.sock" for n in "ab"}
    homes = {n: tmp_path / n for n in "ab"}

    def start(n: str) -> DaemonProcess:
        return start_daemon(homes[n], socks[n], "--node", f"node-{n}", "--db", pg_url, gpus=2)

    daemons = {"a": start("a")}
    daemons["b"] = start("b")  # after a: the first one creates the schema
    out, finish_file = tmp_path / "out", tmp_path / "finish-at"
    port = free_port()
    procs = [
        torchrun("--finish-file", str(finish_file), "--out", str(out), "--watts", "250",
                 "--on-exceed", "pause", "--total-steps", "1000000", "--step-sleep", "0.05",
                 nproc=2, nodes=(i, 2), port=port,
                 env={"POWERTRAIN_SOCKET": str(socks[n]), "CUDA_VISIBLE_DEVICES": "0,1"})
        for i, n in enumerate("ab")
    ]
    alive = list(daemons.values())
    try:
        # One job, owned by rank 0's node, with two ranks on each node.
        wait(lambda: len([m for m in the_job(socks["a"])["members"]
                          if m["state"] == "running"]) == 4, "four ranks to join", alive)
        view = the_job(socks["b"])
        job_id = view["id"]
        assert view["node"] == "node-a" and view["world_size"] == 4 and view["watts"] == 250
        assert sorted((m["node"], m["rank"]) for m in view["members"]) == [
            ("node-a", 0), ("node-a", 1), ("node-b", 2), ("node-b", 3)]
        assert sorted(zip(view["gpu_nodes"], view["gpus"], strict=True)) == [
            ("node-a", 0), ("node-a", 1), ("node-b", 0), ("node-b", 1)]

        # The wattage budget holds on all four GPUs, each node holding its own two.
        def held(n: str) -> bool:
            gpus = daemon_gpus(socks[n])
            # the controller trims each limit (to 250 W, then as the GPU's draw asks) so that
            # the 1 s average power stays at or under the budget
            return len(gpus) == 2 and all(
                g["job"] == job_id and g["power_limit_w"] < 300 and g["power_w"] <= 250 * 1.02
                for g in gpus)
        wait(lambda: held("a") and held("b"), "250 W held on every GPU", alive)
        time.sleep(3)

        # kill -9 of node b's daemon: the run goes on (node a's ranks keep stepping, and they
        # step in lockstep with b's); the restarted daemon adopts its ranks again.
        killed_at = time.time()
        daemons["b"].kill()
        alive = [daemons["a"]]
        steps_then = {m["rank"]: m["steps"] for m in the_job(socks["a"])["members"]}
        wait(lambda: all(m["steps"] > steps_then[m["rank"]] + 20
                         for m in the_job(socks["a"])["members"] if m["node"] == "node-a"),
             "the run to go on without node b's daemon", alive)
        daemons["b"] = start("b")
        alive = list(daemons.values())
        assert "recovery: GPU" in daemons["b"].log(), "the journal restored b's GPUs"
        steps_then = {m["rank"]: m["steps"] for m in the_job(socks["a"])["members"]}
        wait(lambda: all(m["steps"] > steps_then[m["rank"]] and m["state"] == "running"
                         for m in the_job(socks["b"])["members"] if m["node"] == "node-b"),
             "node b's ranks reporting to its new daemon", alive)
        wait(lambda: held("b"), "b's GPUs held to 250 W again", alive)

        # An energy budget it cannot meet, set through node b: the owner pauses every rank at
        # one step, and nothing moves until it is resumed.
        assert cli(socks["b"], "budget", str(job_id), "--energy-wh", "1").returncode == 0
        wait(lambda: the_job(socks["a"])["state"] == "paused", "the energy guard's pause", alive)
        marks = {r: out / f"rank{r}.checkpoints" for r in range(4)}
        wait(lambda: all(p.exists() and p.read_text().strip() for p in marks.values()),
             "every rank to checkpoint", alive)
        paused = the_job(socks["a"])
        at = {int(p.read_text().split()[0]) for p in marks.values()}
        assert at == {paused["hold_step"]}, (at, paused["hold_step"])
        time.sleep(2.0)
        still = the_job(socks["a"])
        assert {m["steps"] for m in still["members"] if m["state"] == "running"} == at
        assert cli(socks["b"], "resume", str(job_id)).returncode == 0
        stop_at = paused["hold_step"] + 20
        finish_file.write_text(f"{stop_at}\n")
        for proc in procs:
            finish(proc)
        wait(lambda: the_job(socks["a"])["state"] == "completed", "the run to complete", alive)
        done = the_job(socks["a"])
        assert done["steps"] == stop_at and done["tokens"] == stop_at * TOKENS_PER_STEP
        assert sorted(int(p.read_text()) for p in out.glob("rank*.done")) == [stop_at] * 4
    finally:
        for proc in procs:
            kill_run(proc)  # the ranks too, whether torchrun ended or not
        for daemon in daemons.values():
            if daemon.proc.poll() is None:
                daemon.terminate()

    # Its energy, up to b's daemon's death, is its four GPUs' counters' on both nodes.
    store = open_store(pg_url)
    try:
        job = JobStore(store).get(job_id)
        assert job is not None and job.started_at is not None
        end = datetime.fromtimestamp(killed_at - 1.0, tz=UTC)
        energy = JobStore(store).energy(job_id, until=end).energy_mj
        counted = 0.0
        assert len(job.gpu_ids) == 4
        for gpu_id in job.gpu_ids:
            samples = [s for s in store.samples(gpu_id, since=job.started_at, until=end)
                       if s.energy_mj is not None]
            counted += samples[-1].energy_mj - samples[0].energy_mj  # type: ignore[operator]
        assert energy == pytest.approx(counted, rel=0.01)
    finally:
        store.close()
