"""A run's members through the real daemon's API: ranks joining one job, the joins and reports
that would corrupt a run (refused, with a reason, and nothing written), and how a run ends.

The tests share one real `powertrain daemon` on simulated GPUs (each test's runs have keys of
their own, and its log lines are those written since it began) and talk to it over its Unix
socket. The members are real processes (children of this test that sleep), attached by pid;
the reports are sent from this test process, which runs as root: an admin, so it may report
for a member whose pid is not its own (``Caller.admin`` in ``scheduler.api``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon_proc import DaemonProcess, cli, start_daemon, submit

pytestmark = pytest.mark.slow

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
# What a refused request must leave as it was.
KEPT = ("state", "run_key", "world_size", "gpus", "steps", "samples", "tokens", "members",
        "hold", "hold_step")

Spawn = Callable[[], subprocess.Popen[bytes]]


@dataclass
class Node:
    daemon: DaemonProcess
    socket: Path
    http: httpx.Client
    tag: str  # this test's own: its run keys end with it
    log_from: int  # where this test's part of the daemon's log begins

    def key(self, run_key: str) -> str:
        """``run_key`` made this test's own (the daemon is shared by the module's tests)."""
        return f"{run_key}@{self.tag}"

    def job(self, job_id: int) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        view: dict[str, Any] = response.json()
        return view

    def all_jobs(self) -> list[dict[str, Any]]:
        response = self.http.get("/v1/jobs", params={"all": "true"})
        assert response.status_code == 200, response.text
        views: list[dict[str, Any]] = response.json()
        return views

    def attach(self, proc: subprocess.Popen[bytes] | int, rank: int = 0, *, world: int = 2,
               run_key: str | None = "run:test", generation: int = 0,
               **extra: Any) -> httpx.Response:
        body: dict[str, Any] = {
            "name": "ranks", "pid": proc if isinstance(proc, int) else proc.pid,
            "run_key": None if run_key is None else self.key(run_key), "rank": rank,
            "local_rank": rank, "world_size": world, "generation": generation,
            "gpu_ids": [rank % 4],
        }
        return self.http.post("/v1/jobs/attach", json=body | extra)

    def report(self, job_id: int, member: int | None, steps: int, **extra: Any) -> httpx.Response:
        body = {"steps": steps, "samples": steps * 2, "tokens": steps * 100} | extra
        if member is not None:
            body["member"] = member
        return self.http.post(f"/v1/jobs/{job_id}/progress", json=body)

    def wait_state(self, job_id: int, state: str) -> dict[str, Any]:
        self.daemon.wait_for(lambda: self.job(job_id)["state"] == state, timeout_s=30)
        return self.job(job_id)

    def warnings(self) -> list[str]:
        """The daemon's warnings since this test began."""
        return [line for line in self.daemon.log()[self.log_from:].splitlines()
                if " WARNING " in line]


@pytest.fixture(scope="module")
def daemon() -> Iterator[tuple[DaemonProcess, Path]]:
    folder = Path(tempfile.mkdtemp(prefix="pt-members-"))
    folder.chmod(0o755)
    socket = folder / "api.sock"
    # a short grace period: a cancelled run's ranks that do not stop are signalled soon
    started = start_daemon(folder / "home", socket, POWERTRAIN_CANCEL_GRACE_S="1")
    try:
        yield started, socket
    finally:
        assert started.terminate() == 0, started.log()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def node(daemon: tuple[DaemonProcess, Path]) -> Iterator[Node]:
    process, socket = daemon
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)),
                        base_url="http://powertrain", timeout=30)
    try:
        yield Node(process, socket, http, uuid.uuid4().hex[:8], len(process.log()))
    finally:
        http.close()


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start a sleeping child process (a member to attach); all are killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(SLEEPER)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def join_run(node: Node, spawn: Spawn, run_key: str = "run:test", world: int = 2
             ) -> tuple[int, list[tuple[subprocess.Popen[bytes], int]]]:
    """Every rank of a run joins: the job, and (process, member id) by rank."""
    ranks: list[tuple[subprocess.Popen[bytes], int]] = []
    job_id: int | None = None
    for rank in range(world):
        proc = spawn()
        response = node.attach(proc, rank, world=world, run_key=run_key)
        assert response.status_code == 201, response.text
        view = response.json()
        assert job_id in (None, view["id"]), "every rank of a run joins its one job"
        job_id = view["id"]
        ranks.append((proc, view["member_id"]))
    assert job_id is not None
    return job_id, ranks


def kept(view: dict[str, Any]) -> dict[str, Any]:
    return {key: view[key] for key in KEPT}


def refused(node: Node, job_ids: list[int], send: Callable[[], httpx.Response], status: int,
            *phrases: str) -> str:
    """``send`` is refused with ``status`` and a detail naming ``phrases``; the jobs, their
    members included, are as they were, and no job was added."""
    before = {job_id: kept(node.job(job_id)) for job_id in job_ids}
    count = len(node.all_jobs())
    response = send()
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for phrase in phrases:
        assert phrase in detail, (phrase, detail)
    assert {job_id: kept(node.job(job_id)) for job_id in job_ids} == before
    assert len(node.all_jobs()) == count
    return detail


def assert_warned(node: Node, *phrases: str) -> None:
    warnings = node.warnings()
    assert any(all(p in line for p in phrases) for line in warnings), (phrases, warnings)


def test_two_ranks_of_a_run_join_one_job(node: Node, spawn: Spawn) -> None:
    job_id, ranks = join_run(node, spawn, run_key="torchrun:3f2a")
    view = node.job(job_id)
    assert view["state"] == "running" and view["attached"]
    assert view["run_key"] == node.key("torchrun:3f2a") and view["world_size"] == 2
    assert sorted(view["gpus"]) == [0, 1]
    members = view["members"]
    assert [(m["id"], m["rank"], m["local_rank"], m["pid"], m["gpus"], m["state"])
            for m in members] == [
        (ranks[0][1], 0, 0, ranks[0][0].pid, [0], "running"),
        (ranks[1][1], 1, 1, ranks[1][0].pid, [1], "running"),
    ]
    assert {m["node"] for m in members} == {view["node"]}
    assert len(node.all_jobs()) == 1
    assert not node.warnings()


def test_a_rank_taken_twice_is_refused(node: Node, spawn: Spawn) -> None:
    job_id, ranks = join_run(node, spawn)
    other = spawn()
    detail = refused(node, [job_id], lambda: node.attach(other, 0), 409,
                     f"rank 0 of job {job_id} is already taken by pid {ranks[0][0].pid}")
    assert_warned(node, f"refused a member from pid {other.pid}", detail)


def test_a_world_size_that_changes_without_an_elastic_restart_is_refused(
    node: Node, spawn: Spawn
) -> None:
    job_id, _ = join_run(node, spawn)
    other = spawn()
    detail = refused(node, [job_id], lambda: node.attach(other, 1, world=3), 409,
                     "rank 1 says the world has 3 processes", f"job {job_id} has 2",
                     "elastic restart")
    assert_warned(node, f"refused a member from pid {other.pid}", detail)

    # An elastic restart (a new generation) may change the world; the old ranks are replaced
    # and a rank of the old generation can no longer join.
    restarted = node.attach(other, 0, world=3, generation=1)
    assert restarted.status_code == 201, restarted.text
    view = node.job(job_id)
    assert view["world_size"] == 3
    old = [m for m in view["members"] if m["generation"] == 0]
    assert [m["state"] for m in old] == ["stopped", "stopped"]
    assert all("replaced by elastic generation 1" in m["end_reason"] for m in old)
    late = spawn()
    detail = refused(node, [job_id], lambda: node.attach(late, 1, world=2), 409,
                     "from elastic generation 0", "at generation 1")
    assert_warned(node, f"refused a member from pid {late.pid}", detail)


def test_a_rank_outside_its_world_is_invalid(node: Node, spawn: Spawn) -> None:
    job_id, _ = join_run(node, spawn)
    other = spawn()
    refused(node, [job_id], lambda: node.attach(other, 2, world=2), 422,
            "rank 2 is not a rank of a world of 2")


def test_a_report_naming_a_member_of_another_job_is_refused(node: Node, spawn: Spawn) -> None:
    job_a, ranks_a = join_run(node, spawn, run_key="run:a")
    job_b, _ = join_run(node, spawn, run_key="run:b")
    assert job_a != job_b
    member_a = ranks_a[0][1]
    refused(node, [job_a, job_b], lambda: node.report(job_b, member_a, 50), 409,
            f"member {member_a} is not a member of job {job_b}")
    refused(node, [job_a, job_b], lambda: node.report(job_b, 10_000, 50), 409,
            f"member 10000 is not a member of job {job_b}")


def test_a_report_from_a_process_that_is_not_a_member_is_refused(
    node: Node, spawn: Spawn
) -> None:
    job_id, _ = join_run(node, spawn)
    # No member named: the reporting process (this test) is not one of the job's.
    refused(node, [job_id], lambda: node.report(job_id, None, 50), 409,
            f"is not a member of job {job_id}", "POST /v1/jobs/attach")


def test_unknown_jobs_and_processes(node: Node, spawn: Spawn) -> None:
    job_id, _ = join_run(node, spawn)
    gone = spawn()
    gone.kill()
    gone.wait(10)
    other = spawn()
    refused(node, [job_id], lambda: node.report(999, None, 1), 404, "no job 999")
    refused(node, [job_id], lambda: node.attach(other, 0, world=1, run_key=None, job_id=999),
            404, "no job 999")
    refused(node, [job_id], lambda: node.attach(gone.pid, 0, world=1, run_key=None), 422,
            f"no process {gone.pid}")
    refused(node, [job_id], lambda: node.attach(other, 0, world=1, gpu_ids=[7]), 422,
            "no GPU [7] on this node")
    refused(node, [job_id], lambda: node.attach(other, 1, world=2, run_key=None), 422,
            "needs a run_key or job_id")


def test_a_run_whose_ranks_all_end_cleanly_completes(node: Node, spawn: Spawn) -> None:
    job_id, ranks = join_run(node, spawn)
    for (_, member), steps in zip(ranks, (12, 10), strict=True):
        response = node.report(job_id, member, steps)
        assert response.status_code == 200, response.text
    view = node.job(job_id)
    # A run's totals: the steps every rank has finished, the sum of samples and tokens.
    assert (view["steps"], view["samples"], view["tokens"]) == (10, 44, 2200)

    for (_, member), steps in zip(ranks, (20, 20), strict=True):
        response = node.report(job_id, member, steps, final=True, outcome="ok")
        assert response.status_code == 200, response.text
    for proc, _ in ranks:
        proc.terminate()
        proc.wait(10)
    view = node.wait_state(job_id, "completed")
    assert [(m["rank"], m["state"], m["steps"]) for m in view["members"]] == [
        (0, "completed", 20), (1, "completed", 20)
    ]
    assert "all 2 ranks ended cleanly" in view["end_reason"]
    assert (view["steps"], view["tokens"]) == (20, 4000)

    # An ended job takes no more members; a report from an ended member changes nothing.
    late = spawn()
    detail = refused(node, [job_id],
                     lambda: node.attach(late, 1, world=2, run_key=None, job_id=job_id), 409,
                     f"job {job_id} is completed: only a running job takes members")
    assert_warned(node, f"refused a member from pid {late.pid}", detail)
    before = kept(node.job(job_id))
    response = node.report(job_id, ranks[0][1], 99)
    assert response.status_code == 200 and response.json()["action"] == "stop", response.text
    assert kept(node.job(job_id)) == before


def test_a_rank_that_dies_without_a_final_report_fails_the_run(
    node: Node, spawn: Spawn
) -> None:
    job_id, ranks = join_run(node, spawn)
    for (_, member), steps in zip(ranks, (5, 5), strict=True):
        assert node.report(job_id, member, steps).status_code == 200
    response = node.report(job_id, ranks[0][1], 8, final=True, outcome="ok")
    assert response.status_code == 200, response.text
    dead = ranks[1][0]
    dead.kill()
    dead.wait(10)
    view = node.wait_state(job_id, "failed")
    why = f"pid {dead.pid} ended without saying it was done"
    assert view["end_reason"] == f"rank 1 on {view['node']} failed: {why}"
    assert [(m["rank"], m["state"]) for m in view["members"]] == [(0, "completed"), (1, "failed")]
    assert view["members"][1]["end_reason"] == why
    assert_warned(node, f"job {job_id}: rank 1 on {view['node']}: {why}")


def test_a_rank_that_reports_an_error_fails_the_run(node: Node, spawn: Spawn) -> None:
    job_id, ranks = join_run(node, spawn)
    response = node.report(job_id, ranks[1][1], 3, final=True, outcome="error")
    assert response.status_code == 200, response.text
    view = node.wait_state(job_id, "failed")
    assert view["end_reason"] == f"rank 1 on {view['node']} failed: ended with an error"
    first, second = view["members"]
    assert (second["rank"], second["state"], second["end_reason"]) == (
        1, "failed", "ended with an error"
    )
    # Rank 0 is still alive but no longer runs in the job: it ends with the job, and is told to
    # stop at its next report.
    assert first["rank"] == 0 and first["state"] != "running"
    assert first["end_reason"].startswith("job failed: rank 1"), first
    directive = node.report(job_id, first["id"], 4).json()
    assert directive["action"] == "stop", directive


def test_ranks_json_and_checkpoint_of_a_running_run(node: Node, spawn: Spawn) -> None:
    job_id, ranks = join_run(node, spawn)
    for (_, member), steps in zip(ranks, (12, 10), strict=True):
        assert node.report(job_id, member, steps).status_code == 200

    done = cli(node.socket, "jobs", str(job_id), "--ranks", "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["job"] == job_id
    members = shown["members"]
    for member in members:
        assert {"node", "rank", "local_rank", "pid", "gpus", "steps", "state"} <= member.keys()
    view = node.job(job_id)
    assert [(m["node"], m["rank"], m["local_rank"], m["pid"], m["gpus"], m["steps"], m["state"])
            for m in members] == [
        (view["node"], 0, 0, ranks[0][0].pid, [0], 12, "running"),
        (view["node"], 1, 1, ranks[1][0].pid, [1], 10, "running"),
    ]

    done = cli(node.socket, "checkpoint", str(job_id))
    assert done.returncode == 0, done.stderr
    view = node.job(job_id)
    assert view["hold"] == "checkpoint" and view["hold_step"] > 12
    step = view["hold_step"]
    assert done.stdout.strip() == f"job {job_id}: every rank checkpoints at step {step}"
    # Every rank is told to checkpoint at that one step.
    for _, member in ranks:
        directive = node.report(job_id, member, 13).json()
        assert (directive["action"], directive["at_step"]) == ("checkpoint", view["hold_step"])


def test_checkpoint_of_a_job_without_members_or_not_running_is_an_error(
    node: Node, spawn: Spawn
) -> None:
    def one_error(job_id: int, *phrases: str) -> None:
        done = cli(node.socket, "checkpoint", str(job_id))
        assert done.returncode != 0, done.stdout
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        for phrase in phrases:
            assert phrase in lines[0], (phrase, lines[0])

    # A submitted job whose process does not use the client: running, but no members.
    plain = submit(node.socket, "--name", "plain", "--", *SLEEPER)
    node.wait_state(plain, "running")
    one_error(plain, f"job {plain} has no process that uses the client")
    assert node.job(plain)["hold"] is None

    # A run that has ended.
    job_id, ranks = join_run(node, spawn, world=1)
    assert node.report(job_id, ranks[0][1], 4, final=True, outcome="ok").status_code == 200
    node.wait_state(job_id, "completed")
    one_error(job_id, f"job {job_id} is completed, not running")

    one_error(999, "no job 999")

    done = cli(node.socket, "cancel", str(plain))
    assert done.returncode == 0, done.stderr
    node.wait_state(plain, "cancelled")


def test_a_single_attached_process_that_ends_cleanly_completes(node: Node, spawn: Spawn) -> None:
    """Not a run: one process attaches, says it ended cleanly, exits: the job is completed (it
    used to end ``failed``, "the attached process ended")."""
    proc = spawn()
    response = node.attach(proc, run_key=None, world=1)
    assert response.status_code == 201, response.text
    view = response.json()
    assert view["run_key"] is None and [m["rank"] for m in view["members"]] == [0]
    assert node.report(view["id"], view["member_id"], 5, final=True,
                       outcome="ok").status_code == 200
    proc.kill()
    proc.wait(10)
    done = node.wait_state(view["id"], "completed")
    assert done["end_reason"] == "its process ended cleanly"
    assert done["steps"] == 5 and done["members"][0]["state"] == "completed"


def test_cancelling_a_run_whose_ranks_do_not_obey_ends_it_cancelled(
    node: Node, spawn: Spawn
) -> None:
    """Ranks that never reach the held step (these never report; one ignores SIGTERM) get
    SIGTERM once the step's lead and the grace period have passed, then SIGKILL; the run ends
    ``cancelled``, not ``failed``, though its ranks had to be killed."""
    job_id, ranks = join_run(node, spawn, run_key="run:cancel")
    stubborn = subprocess.Popen([sys.executable, "-c", STUBBORN])
    try:
        response = node.attach(stubborn, 0, world=1, run_key="run:stubborn")
        assert response.status_code == 201, response.text
        stubborn_job = response.json()["id"]
        for job in (job_id, stubborn_job):
            done = cli(node.socket, "cancel", str(job))
            assert done.returncode == 0, done.stderr
        assert node.wait_state(job_id, "cancelled")["end_reason"] == "cancelled by root"
        assert node.wait_state(stubborn_job, "cancelled")["members"][0]["state"] == "failed"
        assert all(proc.wait(10) is not None for proc, _ in ranks)
        assert stubborn.wait(10) == -9, "SIGTERM was ignored: SIGKILL followed"
        assert_warned(node, f"job {stubborn_job}", "had not stopped: SIGKILL")
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
