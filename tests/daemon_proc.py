"""Run the real `powertrain daemon` as a subprocess for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx


class DaemonProcess:
    """A `powertrain daemon` process on simulated GPUs with its home in a temporary folder."""

    def __init__(
        self, home: Path, *args: str, gpus: int = 4, db: str | None = None,
        env: dict[str, str] | None = None, python: str | None = None, cwd: Path | None = None,
    ) -> None:
        """Start it; ``python`` and ``cwd`` run it from another view of the checkout."""
        self.home = home
        self.log_path = home / f"daemon-{time.monotonic_ns()}.log"
        cmd = [python or sys.executable, "-m", "scheduler", "daemon", "--backend", "simulated",
               "--sim-gpus", str(gpus), "--home", str(home), *args]
        if db:
            cmd += ["--db", db]
        home.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("POWERTRAIN_")}
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=clean | (env or {}), cwd=cwd
        )

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Poll until ``condition`` holds; fail with the daemon's log if it never does."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                if condition():
                    return
            except Exception:  # the store may not exist yet
                pass
            time.sleep(0.1)
        raise AssertionError(f"condition not met in {timeout_s} s; daemon log:\n{self.log()}")

    def terminate(self, timeout_s: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout_s)
        self._log.close()
        return code

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()


REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pretrain_gpt.py"
# A small model: a few seconds of real training on the CPU.
TINY = ["--layers", "2", "--dim", "64", "--heads", "2", "--seq-len", "64", "--batch-size", "8",
        "--data-mb", "1", "--log-every", "10", "--eval-batches", "2"]


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scheduler", args[0], "--socket", str(socket), *args[1:]],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )


def powertrain(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``powertrain ARGS`` with no POWERTRAIN_* setting of the caller's, only ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POWERTRAIN_")}
    return subprocess.run([sys.executable, "-m", "scheduler", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60, env=clean | (env or {}))


def make_token(home: Path, user: str, scope: str) -> dict[str, Any]:
    """A token made by ``powertrain token create --json`` (with the token itself)."""
    done = powertrain("token", "create", "--home", str(home), "--user", user, "--scope", scope,
                      "--json")
    assert done.returncode == 0, done.stderr
    made: dict[str, Any] = json.loads(done.stdout)
    return made


def submit(socket: Path, *args: str) -> int:
    done = cli(socket, "submit", *args)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def jobs(socket: Path) -> dict[int, dict[str, Any]]:
    done = cli(socket, "jobs", "--all", "--json")
    assert done.returncode == 0, done.stderr
    return {j["id"]: j for j in json.loads(done.stdout)}


def wait_until(daemon: DaemonProcess, condition: Callable[[], bool], timeout_s: float) -> None:
    daemon.wait_for(condition, timeout_s=timeout_s)


def start_daemon(
    home: Path, socket: Path, *args: str, gpus: int = 4, python: str | None = None,
    cwd: Path | None = None, **env: str,
) -> DaemonProcess:
    daemon = DaemonProcess(home, "--socket", str(socket), *args, gpus=gpus, env=env,
                           python=python, cwd=cwd)

    def answers() -> bool:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)),
                          base_url="http://powertrain") as http:
            return http.get("/v1/health").status_code == 200

    daemon.wait_for(answers, timeout_s=60)  # a stale socket file is not a daemon
    return daemon
