"""Run the real `powertrain daemon` as a subprocess for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


class DaemonProcess:
    """A `powertrain daemon` process on simulated GPUs with its home in a temporary folder."""

    def __init__(
        self, home: Path, *args: str, gpus: int = 4, db: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.home = home
        self.log_path = home / f"daemon-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "scheduler", "daemon", "--backend", "simulated",
               "--sim-gpus", str(gpus), "--home", str(home), *args]
        if db:
            cmd += ["--db", db]
        home.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("POWERTRAIN_")}
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=clean | (env or {})
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
