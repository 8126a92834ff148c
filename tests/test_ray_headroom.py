"""Ray's side of a node without Ray: the headroom the daemon computes, how the reservation
changes, the job's claim on Ray's watts, and that nothing but ``scheduler.cluster.ray`` needs Ray.
The Ray cluster itself is tests/test_ray.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from scheduler.cluster.ray.headroom import (
    RAY_WATTS_ENV,
    RAY_WORKER_ENV,
    HeldPower,
    RayClaim,
    claim_env,
    headroom,
    ray_claim,
)
from scheduler.cluster.ray.ledger import Amount, Change, Chunk, plan, wanted
from tests.daemon_proc import REPO, cli, start_daemon, submit

MAX = {i: 700.0 for i in range(4)}
IDLE = {i: 75.0 for i in range(4)}


def test_an_empty_node_leaves_ray_its_cap_less_the_gpus_idle_power() -> None:
    room = headroom(cap_w=1000, max_limits_w=MAX, idle_w=IDLE, jobs=[])
    assert room.capacity_w == 2800 and room.gpus == 4
    assert room.headroom_w == 1000 - 4 * 75 and room.held_w == 0 and room.held_gpus == 0


def test_a_job_outside_ray_takes_its_budget_and_its_gpus_from_ray() -> None:
    room = headroom(cap_w=1000, max_limits_w=MAX, idle_w=IDLE,
                    jobs=[HeldPower((0, 1), 2 * 200.0)])
    assert room.held_w == 400 and room.held_gpus == 2
    assert room.idle_w == 150  # its own GPUs no longer count idle
    assert room.headroom_w == 1000 - 400 - 150


def test_a_ray_job_counts_only_past_the_watts_ray_holds_for_it() -> None:
    ray_job = HeldPower((2,), 300.0, ray_w=300.0)
    room = headroom(cap_w=1000, max_limits_w=MAX, idle_w=IDLE, jobs=[ray_job])
    assert room.held_w == 0 and room.held_gpus == 0 and room.headroom_w == 700
    raised = HeldPower((2,), 450.0, ray_w=300.0)  # `powertrain budget` raised it
    room = headroom(cap_w=1000, max_limits_w=MAX, idle_w=IDLE, jobs=[raised])
    assert room.held_w == 150 and room.held_gpus == 0 and room.headroom_w == 550


def test_the_headroom_stays_within_zero_and_the_capacity() -> None:
    full = headroom(cap_w=500, max_limits_w=MAX, idle_w=IDLE, jobs=[HeldPower((0,), 700.0)])
    assert full.headroom_w == 0
    huge = headroom(cap_w=1e5, max_limits_w=MAX, idle_w=IDLE, jobs=[])
    assert huge.headroom_w == huge.capacity_w == 2800


def test_the_daemon_writes_the_ray_worker_of_a_claim_and_nothing_else_does() -> None:
    env = {"A": "1", RAY_WATTS_ENV: "600.0", RAY_WORKER_ENV: "1:2.0"}
    claimed = claim_env(env, 4242, 1700000000.25)
    assert claimed == {"A": "1", RAY_WATTS_ENV: "600.0", RAY_WORKER_ENV: "4242:1700000000.25"}
    assert ray_claim(claimed) == RayClaim(600.0, 4242, 1700000000.25)
    # over TCP there is no caller process: no claim
    assert claim_env(env, None, None) == {"A": "1"}
    assert claim_env({RAY_WATTS_ENV: "nan"}, 1, 1.0) == {}
    assert claim_env({RAY_WORKER_ENV: "1:1.0"}, 1, 1.0) == {}
    assert ray_claim({RAY_WATTS_ENV: "600", RAY_WORKER_ENV: "x:y"}) is None
    assert ray_claim({RAY_WATTS_ENV: "600"}) is None


def test_the_reservation_is_all_but_the_headroom_in_whole_watts() -> None:
    assert wanted(capacity_w=2800, capacity_gpus=4, headroom_w=474.5, held_gpus=1) == Amount(
        2326.0, 1)
    assert wanted(capacity_w=800, capacity_gpus=2, headroom_w=900, held_gpus=3) == Amount(0, 2)


def test_the_reservation_grows_by_a_chunk_and_shrinks_from_the_newest() -> None:
    assert plan([], Amount()) is None
    assert plan([], Amount(500, 1)) == Change(Amount(500, 1), ())
    chunks = [Chunk("a", Amount(500, 1)), Chunk("b", Amount(300, 0))]
    assert plan(chunks, Amount(1000, 1)) == Change(Amount(200, 0), ())
    assert plan(chunks, Amount(797, 1)) is None  # within the slack: left as it is
    assert plan(chunks, Amount(803, 1)) == Change(Amount(3, 0), ())  # but never too small
    assert plan(chunks, Amount(500, 1)) == Change(None, ("b",))  # exactly one chunk less
    assert plan(chunks, Amount(300, 0)) == Change(None, ("a",))
    # otherwise the newest go and a new chunk makes up the rest (added before they go)
    assert plan(chunks, Amount(600, 0)) == Change(Amount(600, 0), ("b", "a"))
    assert plan(chunks, Amount(400, 1)) == Change(Amount(400, 1), ("b", "a"))
    assert plan(chunks, Amount(800, 2)) == Change(Amount(0, 1), ())
    assert plan(chunks, Amount()) == Change(None, ("b", "a"))


def test_nothing_but_the_ray_integration_needs_ray() -> None:
    """The daemon, the service and the CLI import and start with Ray unimportable."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import scheduler.daemon, scheduler.service, scheduler.cli, scheduler.cluster.ray\n"
            "from scheduler.cluster.ray import submit\n"
            "try:\n"
            "    submit(['true'], watts=100)\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "RayJobError Ray is not installed here: pip install 'powertrain[ray]'")


@pytest.mark.slow
def test_a_daemon_says_its_headroom_for_ray(tmp_path: Path, sock_dir: Path) -> None:
    """``GET /v1/node`` (and `powertrain ray resources`): the cap, and what jobs outside Ray
    hold; a job whose claim on Ray's watts comes from no live Ray worker counts outside Ray."""
    sock = sock_dir / "api.sock"
    daemon = start_daemon(tmp_path / "home", sock, "--node", "n1", "--node-cap-w", "1500",
                          gpus=2)
    try:
        done = resources(sock, "--json")
        assert done.returncode == 0, done.stderr
        flags = json.loads(done.stdout)
        assert flags["num_gpus"] == 2 and flags["node"] == "n1"
        assert flags["resources"] == {"watts": 1400, "powertrain-node:n1": 1}
        assert flags["env"] == {"POWERTRAIN_SOCKET": str(sock)}
        plain = resources(sock)
        assert plain.stdout.strip() == (
            """--num-gpus 2 --resources '{"watts": 1400, "powertrain-node:n1": 1}'""")

        def ray_view() -> dict[str, float]:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                              base_url="http://powertrain") as http:
                view: dict[str, float] = http.get("/v1/node").json()["ray"]
            return view

        idle = ray_view()["idle_w"]
        assert ray_view()["headroom_w"] == min(1400, 1500 - idle)
        job = submit(sock, "--gpus", "1", "--watts", "400", "--", sys.executable, "-c",
                     "import time; time.sleep(60)")
        daemon.wait_for(lambda: ray_view()["held_w"] == 400)
        view = ray_view()
        assert view["held_gpus"] == 1 and view["headroom_w"] == 1500 - 400 - idle / 2
        # a claim on Ray's watts from a process that is no Ray worker waiting on the job: the
        # submitting CLI has ended, so the job counts outside Ray
        done = subprocess.run(
            [sys.executable, "-m", "scheduler", "submit", "--socket", str(sock), "--watts", "300",
             "--", sys.executable, "-c", "import time; time.sleep(60)"],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env={**_env(), RAY_WATTS_ENV: "300.0"})
        assert done.returncode == 0, done.stderr
        daemon.wait_for(lambda: ray_view()["held_w"] == 700)
        for job_id in (job, int(done.stdout)):
            assert cli(sock, "cancel", str(job_id)).returncode == 0
        daemon.wait_for(lambda: ray_view()["held_w"] == 0)
    finally:
        assert daemon.terminate() == 0, daemon.log()


def resources(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``powertrain ray resources --socket SOCK ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "scheduler", "ray", "resources", "--socket", str(sock), *args],
        capture_output=True, text=True, cwd=REPO, timeout=60, env=_env())


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("POWERTRAIN_")}


@pytest.mark.parametrize("pairs", [["NOEQUALS"], ["=x"]])
def test_ray_submit_refuses_a_malformed_env(pairs: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "scheduler", "ray", "submit", "--watts", "100",
         *[a for p in pairs for a in ("--env", p)], "--", "true"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=_env())
    assert done.returncode == 2 and done.stderr.startswith("error: --env: expected NAME=VALUE")
