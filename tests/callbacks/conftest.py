"""What the framework-callback tests share: a real `powertrain daemon` on simulated GPUs (one for
all of them in a pytest worker: each test's jobs have names of their own), its API over the Unix
socket, training runs in a thread of the test or as process groups of their own (torchrun's and
Lightning's ranks), and what the data fed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon_proc import REPO, DaemonProcess, start_daemon
from tests.jobs.tiny_lm import ACCUMULATE, BATCH, TinyLMData

STEP_S = 0.05
"""The pause a slowed run adds after each step: time for the daemon to act, little CPU."""


@dataclass
class Node:
    """The daemon and its API."""

    daemon: DaemonProcess
    socket: Path
    http: httpx.Client

    def jobs(self) -> list[dict[str, Any]]:
        response = self.http.get("/v1/jobs", params={"all": "true"})
        assert response.status_code == 200, response.text
        views: list[dict[str, Any]] = response.json()
        return views

    def job(self, name: str, *, count: int = 1) -> dict[str, Any]:
        """The latest job of this name, of which there are ``count``."""
        views = sorted((v for v in self.jobs() if v["name"] == name), key=lambda v: v["id"])
        assert len(views) == count, views
        return views[-1]

    def act(self, job_id: int, action: str) -> dict[str, Any]:
        """``cancel``, ``resume`` or ``checkpoint`` a job, as its CLI commands do."""
        response = self.http.post(f"/v1/jobs/{job_id}/{action}")
        assert response.status_code == 200, response.text
        view: dict[str, Any] = response.json()
        return view

    def wait(self, condition: Callable[[], bool], what: str, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ValueError, KeyError, AssertionError):  # not there yet
                if condition():
                    return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; daemon log:\n"
                             f"{self.daemon.log()[-4000:]}")


@pytest.fixture(scope="session")
def node() -> Iterator[Node]:
    folder = Path(tempfile.mkdtemp(prefix="pt-cb-"))  # short: a socket path has 107 bytes
    folder.chmod(0o755)
    socket = folder / "api.sock"
    daemon = start_daemon(folder / "home", socket)
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)),
                        base_url="http://powertrain", timeout=30)
    try:
        yield Node(daemon, socket, http)
    finally:
        http.close()
        assert daemon.terminate() == 0, daemon.log()
        shutil.rmtree(folder, ignore_errors=True)


class Training:
    """``fit`` or ``train`` in a thread, so that the test can act on the job meanwhile."""

    def __init__(self, run: Callable[[], object]) -> None:
        self.error: BaseException | None = None
        # a daemon thread: one left waiting by a failed test does not hold the worker's exit
        self._thread = threading.Thread(target=self._run, args=(run,), name="training",
                                        daemon=True)
        self._thread.start()

    def _run(self, run: Callable[[], object]) -> None:
        try:
            run()
        except BaseException as exc:  # SystemExit too: the test says it was raised
            self.error = exc

    @contextlib.contextmanager
    def cancelled_if_failing(self, node: Node, name: str) -> Iterator[None]:
        """On a failure inside the block, cancel the job so that a paused run ends too."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                node.act(node.job(name)["id"], "cancel")
                self._thread.join(30)
            raise

    def join(self, timeout_s: float = 90, *, raises: type[BaseException] | None = None) -> None:
        """Wait for the run to end; fail if it did not, or did not end as expected."""
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "training did not end"
        if raises is None:
            assert self.error is None, f"training raised {self.error!r}"
        else:
            assert isinstance(self.error, raises), f"training raised {self.error!r}"


def ranks(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """A training command from the repository's root, in a session of its own (``finish`` kills
    the whole group: ranks left behind would take the CPU from every later test)."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("POWERTRAIN_", "TORCHELASTIC_", "CUDA_"))}
    return subprocess.Popen([sys.executable, *args], env=clean | {"OMP_NUM_THREADS": "1"} | env,
                            cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout_s: float = 240) -> str:
    """Wait for the command to end cleanly; kill its process group whatever happened."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == 0, out
    return out


def fed(samples: int, epochs: int) -> tuple[int, int]:
    """``(non-padding tokens, samples)`` of whole epochs over ``TinyLMData(samples)``, read from
    the data itself."""
    data = TinyLMData(samples)
    tokens = sum(int(data[i]["attention_mask"].sum()) for i in range(samples))
    return tokens * epochs, samples * epochs


def check_ddp_run(node: Node, name: str, key_prefix: str, out: Path) -> None:
    """Both ranks of a 2-rank run of 2 epochs wrote what they trained to ``out``; the daemon
    has one completed job ``name`` whose steps, tokens and samples are the framework's, and
    whose two members each ran every step on a GPU of their own."""
    done = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {d["world_size"] for d in done} == {2}
    (steps,) = {d["global_step"] for d in done}
    # 16 samples over 2 ranks, BATCH a micro-batch, ACCUMULATE micro-batches a step
    assert steps == 2 * 16 // (2 * BATCH * ACCUMULATE)
    node.wait(lambda: node.job(name)["state"] != "running", "the run to end")
    view = node.job(name)
    assert view["state"] == "completed", view["end_reason"]
    assert view["world_size"] == 2 and view["run_key"].startswith(key_prefix)
    tokens, samples = fed(16, epochs=2)  # every sample once an epoch, on one rank or the other
    assert (view["steps"], view["tokens"], view["samples"]) == (steps, tokens, samples)
    members = sorted(view["members"], key=lambda m: m["rank"])
    assert [(m["rank"], m["gpus"], m["steps"], m["state"]) for m in members] == [
        (0, [0], steps, "completed"), (1, [1], steps, "completed")]
