"""Ray places jobs by power headroom, end to end: two real daemons on simulated GPUs (node-a: 2
GPUs under a 900 W cap; node-b: 4 GPUs under 1700 W), each with its own Ray node of a local Ray
cluster started with `powertrain ray resources`' flags, each daemon keeping its node's
reservation in Ray (``--ray-address``). Ray's scheduler alone chooses the node.

With the simulated H100s' 75 W idle power, what Ray may place is 900 − 2 × 75 = 750 W on node-a
and 1700 − 4 × 75 = 1400 W on node-b, less what jobs outside Ray hold there.

The cluster is shared by the module's tests (Ray starts slowly) and they run in order; each
leaves no job behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon_proc import REPO, DaemonProcess, cli, free_port, submit

# They share one Ray cluster: `make test-cluster` runs a file's tests on one worker (loadfile).
pytestmark = pytest.mark.ray

CAPS = {"node-a": (2, 900), "node-b": (4, 1700)}  # GPUs, node cap (W)
RESERVE_PREFIX = "powertrain-reserve:"


@dataclass
class RayCluster:
    """Two daemons and the local Ray cluster over them."""

    address: str
    socks: dict[str, Path]
    daemons: dict[str, DaemonProcess]
    ray: Any
    gates: Path

    def reserved(self, node: str) -> tuple[float, int]:
        """The watts and GPUs held back from Ray on ``node`` (its placement groups)."""
        watts, gpus = 0.0, 0
        for info in self.ray.util.placement_group_table().values():
            name = info.get("name") or ""
            if name.startswith(f"{RESERVE_PREFIX}{node}:") and info["state"] == "CREATED":
                bundle = info["bundles"][0] if 0 in info["bundles"] else info["bundles"]["0"]
                watts += bundle.get("watts", 0.0)
                gpus += int(bundle.get("GPU", 0))
        return watts, gpus

    def wait(self, condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(AssertionError, KeyError, ValueError):
                if condition():
                    return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; {self.logs()}")

    def logs(self) -> str:
        """The end of each daemon's log (its reservation loop's lines too)."""
        return "daemon logs:\n" + "\n".join(
            f"--- {n}:\n{d.log()[-4000:]}" for n, d in self.daemons.items())

    def gate(self, name: str) -> list[str]:
        """A command that runs until ``release(name)``."""
        path = self.gates / name
        return [sys.executable, "-c",
                f"import os, time\nwhile not os.path.exists({str(path)!r}): time.sleep(0.1)"]

    def release(self, name: str) -> None:
        (self.gates / name).touch()

    def jobs(self, node: str) -> dict[int, dict[str, Any]]:
        """Every job of ``node``'s daemon, by id (``GET /v1/jobs?all=true``)."""
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socks[node])),
                          base_url="http://powertrain") as http:
            views: list[dict[str, Any]] = http.get("/v1/jobs", params={"all": "true"}).json()
        return {v["id"]: v for v in views}

    def running(self, node: str) -> list[dict[str, Any]]:
        return [j for j in self.jobs(node).values() if j["state"] in ("queued", "running")]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("POWERTRAIN_", "RAY_")) and k != "CUDA_VISIBLE_DEVICES"}


def ray_submit(cluster: RayCluster, *args: str) -> subprocess.Popen[str]:
    """``powertrain ray submit --address ... ARGS`` in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "scheduler", "ray", "submit", "--address", cluster.address,
         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=_clean_env() | {"RAY_USAGE_STATS_ENABLED": "0"})


def finished(
    cluster: RayCluster, proc: subprocess.Popen[str], timeout_s: float = 60
) -> tuple[str, str]:
    """The output of a ``ray_submit`` once it has ended."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"powertrain ray submit did not end:\n{out}\n{err}\n"
                             f"{cluster.logs()}") from None
    return out, err


def _ray_start(args: list[str], sock: Path, resources: dict[str, Any]) -> subprocess.Popen[str]:
    """``ray start ARGS`` with a node's resources and its daemon's socket, in a process group of
    its own (every Ray process of the node stays in it)."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", *args, "--num-cpus", "1", "--num-gpus", str(resources["num_gpus"]),
           "--resources", json.dumps(resources["resources"]),
           "--object-store-memory", str(100 * 2**20),
           "--dashboard-agent-listen-port", str(free_port())]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, start_new_session=True,
                            env=_clean_env() | {"POWERTRAIN_SOCKET": str(sock),
                                                "RAY_USAGE_STATS_ENABLED": "0"})


def _started(proc: subprocess.Popen[str]) -> None:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"ray start failed:\n{out}"


def _wait_port(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.2)
    raise AssertionError(f"Ray's head did not listen on port {port} in {timeout_s} s")


def _stop_groups(pgids: list[int]) -> None:
    """End every process of the Ray nodes' groups: SIGTERM, then SIGKILL what is left."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    left = list(pgids)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [g for g in left if _alive(g)]
    for pgid in left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _daemons(base: Path, socks: dict[str, Path], address: str) -> dict[str, DaemonProcess]:
    """Both nodes' daemons, started together."""
    daemons = {
        node: DaemonProcess(base / node, "--socket", str(socks[node]), "--node", node,
                            "--node-cap-w", str(cap), "--ray-address", address, gpus=gpus)
        for node, (gpus, cap) in CAPS.items()
    }
    for node, daemon in daemons.items():
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socks[node])),
                          base_url="http://powertrain") as http:
            daemon.wait_for(lambda http=http: http.get("/v1/health").status_code == 200, 60)
    return daemons


def _resources(sock: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "scheduler", "ray", "resources", "--socket", str(sock), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_clean_env())


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    try:
        import ray
    except ImportError:
        message = "ray is not installed: `make test-cluster` installs the ray extra"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {message}", pytrace=False)
        pytest.skip(message)
    base = Path(tempfile.mkdtemp(prefix="pt-ray-"))
    base.chmod(0o755)
    port = free_port()
    address = f"127.0.0.1:{port}"
    socks = {n: base / f"{n}.sock" for n in CAPS}
    gates = base / "gates"
    gates.mkdir()
    daemons: dict[str, DaemonProcess] = {}
    groups: list[int] = []
    connected = False
    try:
        daemons = _daemons(base, socks, address)
        asked = {node: _resources(socks[node]) for node in CAPS}
        flags = {}
        for node, proc in asked.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            flags[node] = json.loads(out)
        temp = base / "ray"
        head = _ray_start(
            ["--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
             "--include-dashboard", "false", "--dashboard-port", str(free_port()),
             "--ray-client-server-port", str(free_port()), "--temp-dir", str(temp),
             "--disable-usage-stats"], socks["node-a"], flags["node-a"])
        groups.append(head.pid)
        _wait_port(port)  # node-b joins while the head starts its other parts
        other = _ray_start(
            ["--address", address, "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp)],
            socks["node-b"], flags["node-b"])
        groups.append(other.pid)
        _started(head)
        _started(other)
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        connected = True
        found = RayCluster(address, socks, daemons, ray, gates)
        # Nothing runs yet: each node reserves all but its headroom (capacity: 700 W a GPU).
        found.wait(lambda: found.reserved("node-a") == (2 * 700 - 750, 0)
                   and found.reserved("node-b") == (4 * 700 - 1400, 0),
                   "the daemons to reserve all but their headroom in Ray", timeout_s=60)
        yield found
    finally:
        if connected:
            ray.shutdown()
        for daemon in daemons.values():
            daemon.proc.send_signal(signal.SIGTERM)
        for daemon in daemons.values():
            daemon.terminate()
        _stop_groups(groups)
        shutil.rmtree(base, ignore_errors=True)


def test_a_job_asking_more_watts_than_one_node_has_lands_on_the_other(
    cluster: RayCluster,
) -> None:
    """2 GPUs × 500 W = 1000 W: more than node-a's 750 W; Ray places it on node-b, where it
    runs as a job of node-b's daemon with the GPUs Ray gave it (the Python function)."""
    from scheduler.cluster.ray import submit as ray_submit_fn

    events: list[dict[str, Any]] = []
    job = ray_submit_fn([sys.executable, "-c", "print('hello from', __import__('os').environ"
                         "['CUDA_VISIBLE_DEVICES'])"], gpus=2, watts=500,
                        name="over-a", on_event=events.append)
    assert job.node == "node-b" and job.state == "completed" and job.returncode == 0
    assert [e["event"] for e in events][:3] == ["asking", "submitted", "started"]
    view = cluster.jobs("node-b")[job.job_id]
    assert view["name"] == "over-a" and view["watts"] == 500 and len(view["gpus"]) == 2
    output = "".join(e["data"] for e in events if e["event"] == "output")
    assert output == f"hello from {','.join(str(g) for g in view['gpus'])}\n"
    assert job.gpus == tuple(view["gpus"])


def test_a_job_asking_more_than_either_node_has_waits_until_watts_are_freed(
    cluster: RayCluster,
) -> None:
    """A Ray job holds 1000 W of node-b; one asking 900 W then fits neither node (750 W, 400 W)
    and waits, with no job anywhere, until the first ends; then it runs on node-b."""
    first = ray_submit(cluster, "--gpus", "2", "--watts", "500", "--json", "--",
                       *cluster.gate("first"))
    second: subprocess.Popen[str] | None = None
    try:
        cluster.wait(lambda: [j["state"] for j in cluster.running("node-b")] == ["running"],
                     "the first job to run on node-b")
        second = ray_submit(cluster, "--gpus", "2", "--watts", "450", "--json", "--",
                            sys.executable, "-c", "print('second')")
        time.sleep(4)  # long enough for Ray to have placed it, had it fit
        assert second.poll() is None
        assert cluster.running("node-a") == [] and len(cluster.running("node-b")) == 1
        cluster.release("first")
        out, err = finished(cluster, first)
        assert first.returncode == 0 and json.loads(out)["node"] == "node-b", err
        out, err = finished(cluster, second)
        assert second.returncode == 0, err
        result = json.loads(out)
        assert result["node"] == "node-b" and result["state"] == "completed"
        assert "job" in err and "on node-b" in err
    finally:
        cluster.release("first")
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_jobs_outside_ray_and_their_budgets_change_what_ray_may_place(
    cluster: RayCluster,
) -> None:
    """A plain `powertrain submit` on node-b (2 GPUs × 450 W) leaves Ray 1700 − 900 − 150 =
    650 W there: a 700 W Ray job that fits either node when it is idle lands on node-a; an 800 W
    one fits neither and waits until `powertrain budget` lowers the outside job to 300 W (Ray
    then has 950 W on node-b) and runs there; raising the budget back takes the watts back, and
    the job's end gives them to Ray again."""
    from scheduler.cluster.ray import submit as ray_submit_fn

    sock = cluster.socks["node-b"]
    outside = submit(sock, "--gpus", "2", "--watts", "450", "--name", "outside", "--",
                     *cluster.gate("outside"))
    pool = ThreadPoolExecutor(1)
    try:
        cluster.wait(lambda: cluster.reserved("node-b") == (2800 - 650, 2),
                     "node-b to reserve the outside job's watts and GPUs")
        elsewhere = ray_submit_fn(["true"], gpus=1, watts=700)
        assert elsewhere.node == "node-a" and elsewhere.returncode == 0

        waiting = pool.submit(ray_submit_fn, ["true"], gpus=2, watts=400, name="waiting")
        time.sleep(4)  # long enough for Ray to have placed it, had it fit
        assert not waiting.done()
        assert [j["name"] for j in cluster.running("node-b")] == ["outside"]
        assert cluster.running("node-a") == []
        lowered = cli(sock, "budget", str(outside), "--watts", "300")
        assert lowered.returncode == 0, lowered.stderr
        try:
            placed = waiting.result(timeout=60)
        except TimeoutError:
            raise AssertionError(f"the waiting job never ran; {cluster.logs()}") from None
        assert placed.node == "node-b" and placed.returncode == 0
        cluster.wait(lambda: cluster.reserved("node-b") == (2800 - 950, 2),
                     "node-b to give Ray the watts the budget freed")

        raised = cli(sock, "budget", str(outside), "--watts", "450")
        assert raised.returncode == 0, raised.stderr
        cluster.wait(lambda: cluster.reserved("node-b") == (2800 - 650, 2),
                     "node-b to take back the watts of the raised budget")
    finally:
        cluster.release("outside")
        pool.shutdown(wait=False, cancel_futures=True)
    cluster.wait(lambda: cluster.reserved("node-b") == (2800 - 1400, 0),
                 "node-b's reservation to drop once the outside job ended")
