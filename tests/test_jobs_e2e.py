"""Jobs end to end: a real daemon on simulated GPUs, real CLI calls, real training processes."""

from __future__ import annotations

import itertools
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.store import JobStore
from telemetry.store import open_store
from tests.daemon_proc import (
    EXAMPLE,
    REPO,
    TINY,
    DaemonProcess,
    cli,
    free_port,
    jobs,
    make_token,
    start_daemon,
    submit,
    wait_until,
)
from tests.users import machine_users

GATED = REPO / "tests" / "jobs" / "gated.py"

pytestmark = pytest.mark.slow

def test_two_example_jobs_train_and_are_accounted(tmp_path: Path, sock_dir: Path) -> None:
    socket = sock_dir / "api.sock"
    daemon = start_daemon(tmp_path, socket)
    try:
        python = sys.executable
        first = submit(socket, "--name", "gpt-a", "--watts", "400", "--", python, str(EXAMPLE),
                       *TINY, "--steps", "40")
        second = submit(socket, "--name", "gpt-b", "--gpus", "2", "--watts", "300", "--", python,
                        str(EXAMPLE), *TINY, "--steps", "40", "--seed", "1")
        wait_until(daemon, lambda: all(j["state"] == "completed" for j in jobs(socket).values()),
                   timeout_s=240)
        listed = jobs(socket)
        for job_id in (first, second):
            view = listed[job_id]
            assert view["exit_code"] == 0
            assert view["tokens"] == 40 * 8 * 64
            assert view["tokens_per_s"] and view["tokens_per_s"] > 0
            assert view["energy_j"] and view["energy_j"] > 0
            assert view["j_per_token"] == pytest.approx(view["energy_j"] / view["tokens"])
        assert listed[first]["watts"] == 400 and len(listed[first]["gpus"]) == 1
        assert listed[second]["watts"] == 300 and len(listed[second]["gpus"]) == 2
        assert not set(listed[first]["gpus"]) & set(listed[second]["gpus"])
        log = cli(socket, "logs", str(first))
        assert "done:" in log.stdout
    finally:
        assert daemon.terminate() == 0, daemon.log()

    store = open_store(f"sqlite:///{tmp_path / 'powertrain.db'}")
    try:
        for job_id in (first, second):
            job = JobStore(store).get(job_id)
            assert job is not None and job.gpus and job.state == "completed"
            assert JobStore(store).throughput(job_id) is not None
            energy = JobStore(store).energy(job_id)
            # The GPUs were busy (an idle H100 draws ~75 W) and held to the job's budget.
            mean_w = energy.energy_mj / 1000 / energy.duration_s / len(job.gpus)
            assert job.watts_per_gpu is not None
            assert 150 < mean_w <= job.watts_per_gpu * 1.02, (job_id, mean_w)
            assert [e.to_state for e in JobStore(store).events(job_id)] == [
                "queued", "running", "completed"
            ]
    finally:
        store.close()


def test_node_cap_holds_the_second_job_until_the_first_ends(
    tmp_path: Path, sock_dir: Path
) -> None:
    socket, gate = sock_dir / "api.sock", tmp_path / "gate"
    # Idle H100s draw ~75 W: 400 W + 3 idle GPUs fits under 750 W, two 400 W jobs do not.
    daemon = start_daemon(tmp_path, socket, "--node-cap-w", "750")
    try:
        # the first job runs until the test opens its gate, however slow this machine is
        first = submit(socket, "--watts", "400", "--", "sh", "-c",
                       f"while [ ! -e {gate} ]; do sleep 0.1; done")
        second = submit(socket, "--watts", "400", "--", "true")
        wait_until(daemon, lambda: jobs(socket)[first]["state"] == "running", timeout_s=30)
        # several control ticks (1 s each) pass with the second job held; however slow the
        # machine, the first job cannot end before the gate opens
        held_since = time.monotonic()
        while time.monotonic() - held_since < 3.0:
            assert jobs(socket)[second]["state"] == "queued"
        gate.touch()
        wait_until(daemon, lambda: jobs(socket)[second]["state"] == "completed", timeout_s=60)
        listed = jobs(socket)
        assert listed[second]["started_at"] >= listed[first]["ended_at"]

        for args, needle in [
            (["--gpus", "5"], "allowed: 1 to 4"),
            (["--watts", "750"], "200 W to 700 W"),
            (["--watts", "150"], "200 W to 700 W"),
            (["--watts", "700", "--gpus", "2"], "cap"),
        ]:
            refused = cli(socket, "submit", *args, "--", "true")
            assert refused.returncode != 0
            assert needle in refused.stderr, (args, refused.stderr)
        assert len(jobs(socket)) == 2
    finally:
        assert daemon.terminate() == 0, daemon.log()


def test_bad_input_is_refused_and_nothing_is_stored(tmp_path: Path, sock_dir: Path) -> None:
    socket = sock_dir / "api.sock"
    daemon = start_daemon(tmp_path, socket)
    try:
        for args in (
            ["submit", "--watts", "-5", "--", "true"],
            ["submit", "--watts", "0", "--", "true"],
            ["submit", "--watts", "nan", "--", "true"],
            ["submit", "--watts", "1e12", "--", "true"],
            ["submit", "--energy-wh", "-1", "--", "true"],
            ["submit", "--gpu-ids", "0,9", "--", "true"],
            ["submit", "--gpu-ids", "x", "--", "true"],
            ["submit", "--mode", "turbo", "--", "true"],
            ["submit", "--deadline", "yesterday", "--", "true"],
            ["submit", "--deadline", "2020-01-01T00:00:00Z", "--", "true"],
            ["submit", "--"],
            ["cancel", "999"],
            ["logs", "999"],
            ["budget", "999", "--watts", "300"],
            ["submit", "--name", "two\nlines", "--", "true"],
        ):
            # the real CLI code in this process (an interpreter start per case was most of
            # this test's time), talking to the real daemon over its socket
            done = CliRunner().invoke(app, [args[0], "--socket", str(socket), *args[1:]])
            assert done.exit_code != 0, args
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            assert "Traceback" not in done.output, args
            assert len(lines) == 1 and lines[0].startswith("error:"), (args, done.output)

        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)),
                          base_url="http://powertrain") as http:
            for body in (b"{not json", b"[]", b'{"argv": [], "cwd": "/"}',
                         b'{"argv": ["true"], "cwd": "/", "watts": "NaN"}',
                         b'{"argv": ["true"], "cwd": "relative"}',
                         b'{"argv": ["true"], "cwd": "/", "who": "root"}'):
                answer = http.post("/v1/jobs", content=body,
                                   headers={"content-type": "application/json"})
                assert answer.status_code == 422, (body, answer.text)
                assert isinstance(answer.json()["detail"], str)
            assert http.post("/v1/jobs/999/cancel").status_code == 404
        assert jobs(socket) == {}
    finally:
        assert daemon.terminate() == 0, daemon.log()


# -- ownership, with real users --------------------------------------------------------------------

USERS_GROUP = "pt-users"
ALICE, BOB = "pt-alice", "pt-bob"

RAW_CLIENT = r"""
import http.client, json, socket, sys
class Conn(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.path = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)
path, method, url, body = sys.argv[1:5]
conn = Conn(path)
conn.request(method, url, body=body or None, headers={"content-type": "application/json"})
answer = conn.getresponse()
print(json.dumps({"status": answer.status, "body": json.loads(answer.read() or b"null")}))
"""


@pytest.fixture
def closed_checkout() -> Iterator[tuple[str, Path]]:
    """This checkout and its interpreter seen through a mode-0700 folder, as a checkout in
    root's private home is: other users can neither read it nor run its virtual environment."""
    top = Path(tempfile.mkdtemp(prefix="pt-closed-"))  # mkdtemp: mode 0700
    try:
        (top / "repo").symlink_to(REPO)
        (top / "venv").symlink_to(sys.prefix)  # the venv's own path, so it finds pyvenv.cfg
        python = top / "venv" / Path(sys.executable).relative_to(sys.prefix)
        yield str(python), top / "repo"
    finally:
        shutil.rmtree(top)


def as_user(user: str, socket: Path, method: str, url: str, body: str = "") -> dict[str, Any]:
    done = subprocess.run(
        ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", RAW_CLIENT, str(socket), method,
         url, body],
        capture_output=True, text=True, timeout=30, cwd="/tmp",
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="creating users and running jobs as them needs root")
def test_a_user_cannot_touch_another_users_job_but_root_can(
    tmp_path: Path, sock_dir: Path, closed_checkout: tuple[str, Path]
) -> None:
    """The daemon runs from a checkout its users cannot enter, with no interpreter named for
    the jobs: it finds one they can run, and their jobs start."""
    python, checkout = closed_checkout
    socket = sock_dir / "api.sock"
    with machine_users(ALICE, BOB, group=USERS_GROUP):
        daemon = start_daemon(tmp_path, socket, "--socket-group", USERS_GROUP, python=python,
                              cwd=checkout)
        try:
            assert socket.stat().st_mode & 0o777 == 0o660
            _users_and_root(daemon, socket, lambda user, *request: as_user(user, socket, *request))
        finally:
            assert daemon.terminate() == 0, daemon.log()
    assert "will not start" not in daemon.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="creating users and running jobs as them needs root")
def test_the_same_ownership_rules_hold_over_tcp_with_each_users_token(
    tmp_path: Path, sock_dir: Path, closed_checkout: tuple[str, Path]
) -> None:
    """Alice's and Bob's tokens act as Alice and Bob (their jobs run as them), root's admin
    token as root; the refusals are the socket's."""
    python, checkout = closed_checkout
    socket, port = sock_dir / "api.sock", free_port()
    with machine_users(ALICE, BOB, group=USERS_GROUP):
        daemon = start_daemon(tmp_path, socket, "--listen", f"127.0.0.1:{port}", python=python,
                              cwd=checkout)
        try:
            tokens = {user: make_token(tmp_path, user, scope)["token"]
                      for user, scope in ((ALICE, "submit"), (BOB, "submit"), ("root", "admin"))}

            def over_tcp(user: str, method: str, url: str, body: str = "") -> dict[str, Any]:
                answer = httpx.request(
                    method, f"http://127.0.0.1:{port}{url}", content=body or None, timeout=10,
                    headers={"Authorization": f"Bearer {tokens[user]}",
                             "content-type": "application/json"},
                )
                return {"status": answer.status_code, "body": answer.json()}

            _users_and_root(daemon, socket, over_tcp)
        finally:
            assert daemon.terminate() == 0, daemon.log()


Speak = Callable[..., dict[str, Any]]
"""``speak(user, method, url, body="")``: one request as ``user``; its status and JSON body."""


def _users_and_root(daemon: DaemonProcess, socket: Path, speak: Speak) -> None:
    body = json.dumps({"argv": ["sleep", "60"], "cwd": "/tmp", "watts": 300})
    made = speak(ALICE, "POST", "/v1/jobs", body)
    assert made["status"] == 201 and made["body"]["user"] == ALICE
    job_id = made["body"]["id"]
    wait_until(daemon, lambda: jobs(socket)[job_id]["state"] == "running", timeout_s=30)
    pid = jobs(socket)[job_id]["pid"]
    assert pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name == ALICE

    seen = speak(BOB, "GET", "/v1/jobs")
    assert [j["id"] for j in seen["body"]] == [job_id]  # everyone sees every job
    for method, url, change in (("POST", f"/v1/jobs/{job_id}/cancel", ""),
                                ("PATCH", f"/v1/jobs/{job_id}", '{"watts": 250}')):
        refused = speak(BOB, method, url, change)
        assert refused["status"] == 403 and ALICE in refused["body"]["detail"]
    assert jobs(socket)[job_id]["watts"] == 300

    changed = speak(ALICE, "PATCH", f"/v1/jobs/{job_id}", '{"watts": 250}')
    assert changed["status"] == 200 and changed["body"]["watts"] == 250
    by_root = speak("root", "POST", f"/v1/jobs/{job_id}/cancel")
    assert by_root["status"] == 200, by_root
    wait_until(daemon, lambda: jobs(socket)[job_id]["state"] == "cancelled", timeout_s=30)


def test_a_daemon_restart_readopts_a_running_job(tmp_path: Path, sock_dir: Path) -> None:
    """kill -9 of the daemon while a job runs: the job goes on, the next daemon re-adopts it,
    and its client's cumulative reports lose nothing. The job waits at a gate the test opens
    once the new daemon is up, so it is certainly running across the restart."""
    socket, gate = sock_dir / "api.sock", tmp_path / "gate"
    daemon = start_daemon(tmp_path, socket)
    job_id = submit(socket, "--", sys.executable, str(GATED), "--steps", "200",
                    "--gate", str(gate), "--gate-at", "10")
    wait_until(daemon, lambda: jobs(socket)[job_id]["steps"] >= 10, timeout_s=60)
    pid = jobs(socket)[job_id]["pid"]
    daemon.kill()
    killed_at = time.time()
    time.sleep(1.0)  # a real gap for the samples to show
    os.kill(pid, 0)  # the job outlived its daemon

    restarted = start_daemon(tmp_path, socket)
    restarted_at = time.time()
    os.kill(pid, 0)  # still there when the new daemon took over
    try:
        gate.touch()
        wait_until(restarted, lambda: jobs(socket)[job_id]["state"] != "running", timeout_s=120)
        view = jobs(socket)[job_id]
        assert view["state"] == "completed" and view["exit_code"] == 0
        assert view["tokens"] == 200 * 512  # the client reconnected and lost nothing
    finally:
        assert restarted.terminate() == 0, restarted.log()

    store = open_store(f"sqlite:///{tmp_path / 'powertrain.db'}")
    try:
        job = JobStore(store).get(job_id)
        assert job is not None
        assert [e.to_state for e in JobStore(store).events(job_id)] == [
            "queued", "running", "completed"
        ]
        gpu_id = job.gpu_ids[0]
        assert job.started_at is not None and job.ended_at is not None
        times = [s.sampled_at.timestamp()
                 for s in store.samples(gpu_id, since=job.started_at, until=job.ended_at)]
        gaps = sorted(b - a for a, b in itertools.pairwise(times))
        downtime = restarted_at - killed_at
        assert gaps[-1] <= downtime + 1.5  # the only hole is the restart itself
        assert gaps[-2] <= 1.0
        energy = JobStore(store).energy(job_id)
        assert energy.method == "counter"  # the counter bridges the restart exactly
    finally:
        store.close()


def test_a_job_started_elsewhere_attaches_and_is_tracked(tmp_path: Path, sock_dir: Path) -> None:
    socket = sock_dir / "api.sock"
    daemon = start_daemon(tmp_path, socket)
    try:
        env = dict(os.environ, POWERTRAIN_SOCKET=str(socket), CUDA_VISIBLE_DEVICES="2")
        env.pop("POWERTRAIN_JOB_ID", None)
        run = subprocess.run(
            [sys.executable, str(EXAMPLE), *TINY, "--steps", "40", "--name", "notebook"],
            env=env, capture_output=True, text=True, timeout=240, cwd=REPO,
        )
        assert run.returncode == 0, run.stderr
        listed = list(jobs(socket).values())
        assert len(listed) == 1
        view = listed[0]
        assert view["attached"] and view["name"] == "notebook" and view["gpus"] == [2]
        assert view["tokens"] == 40 * 8 * 64
        # The process is gone, so the daemon ends the job on its next control tick.
        wait_until(daemon, lambda: jobs(socket)[view["id"]]["state"] != "running", timeout_s=30)
        assert jobs(socket)[view["id"]]["energy_j"] > 0
    finally:
        assert daemon.terminate() == 0, daemon.log()


def test_an_energy_budget_pauses_a_job_and_resume_lets_it_finish(
    tmp_path: Path, sock_dir: Path
) -> None:
    """36 J of budget is spent within a second: the daemon pauses the job, whose client stops
    stepping; `powertrain resume` lets it run to its end with nothing lost."""
    socket, open_gate = sock_dir / "api.sock", tmp_path / "open"
    open_gate.touch()
    daemon = start_daemon(tmp_path, socket)
    try:
        job_id = submit(socket, "--energy-wh", "0.01", "--on-exceed", "pause", "--",
                        sys.executable, str(GATED), "--steps", "300", "--gate", str(open_gate))
        wait_until(daemon, lambda: jobs(socket)[job_id]["state"] == "paused", timeout_s=60)
        # The client learns of the pause in the answer to its next report (each 1 s) and steps
        # until then; once it has obeyed, it steps no more: its count holds across reports.

        def obeyed() -> bool:
            before = jobs(socket)[job_id]["steps"]
            time.sleep(1.5)
            return bool(jobs(socket)[job_id]["steps"] == before)

        wait_until(daemon, obeyed, timeout_s=30)
        held = jobs(socket)[job_id]["steps"]
        held_since = time.monotonic()
        while time.monotonic() - held_since < 3.0:
            assert jobs(socket)[job_id]["steps"] == held
        assert held < 300
        resumed = cli(socket, "resume", str(job_id))
        assert resumed.returncode == 0, resumed.stderr
        wait_until(daemon, lambda: jobs(socket)[job_id]["state"] == "completed", timeout_s=120)
        view = jobs(socket)[job_id]
        assert view["steps"] == 300 and view["tokens"] == 300 * 512
    finally:
        assert daemon.terminate() == 0, daemon.log()
    store = open_store(f"sqlite:///{tmp_path / 'powertrain.db'}")
    try:
        states = [e.to_state for e in JobStore(store).events(job_id)]
        assert states == ["queued", "running", "paused", "running", "completed"]
        energy = [d.what for d in JobStore(store).decisions(job_id) if d.source == "energy"]
        assert energy == ["pause", "resume"]
    finally:
        store.close()
