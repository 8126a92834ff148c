"""The daemon's side of Ray: ``powertrain ray reserve`` run as a child process, restarted when it
exits. No Ray here: the child imports it, so a daemon without Ray installed logs the child's
one-line error and goes on.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

RESTART_MIN_S = 5.0
RESTART_MAX_S = 120.0
HEALTHY_S = 60.0
"""A child that ran this long before exiting is restarted after ``RESTART_MIN_S`` again."""


class ReserveProcess:
    """Runs ``powertrain ray reserve`` for this node beside the daemon.

    ``check`` (the daemon calls it every few seconds) starts the child, and restarts it after
    it exits, waiting ``RESTART_MIN_S`` and doubling up to ``RESTART_MAX_S`` while it keeps
    failing. Its output goes where the daemon's does.

    Args:
        address: The Ray cluster's address.
        socket_path: The daemon's API socket, which the child reads the headroom from.
        python: The interpreter that runs it (the daemon's own).
    """

    def __init__(self, address: str, socket_path: Path, *, python: str | None = None) -> None:
        self.command = [python or sys.executable, "-m", "scheduler", "ray", "reserve",
                        "--address", address, "--socket", str(socket_path),
                        "--exit-with-parent"]
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._due = 0.0
        self._delay_s = RESTART_MIN_S
        self._failures = 0
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def pid(self) -> int | None:
        """The running child's pid, or ``None``."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def check(self) -> None:
        """Start the child if it is not running and its restart is due (never after ``stop``)."""
        with self._lock:
            if not self._stopped:
                self._check(time.monotonic())

    def _check(self, now: float) -> None:
        if self._proc is not None:
            code = self._proc.poll()
            if code is None:
                return
            ran_s = now - self._started_at
            self._failures = 0 if ran_s >= HEALTHY_S else self._failures + 1
            self._delay_s = min(RESTART_MAX_S, RESTART_MIN_S * 2 ** max(0, self._failures - 1))
            self._due = now + self._delay_s
            self._proc = None
            log.warning("the Ray reservation loop exited with status %d after %.0f s; "
                        "restarting it in %.0f s", code, ran_s, self._delay_s)
        if now < self._due:
            return
        try:
            self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
        except OSError as exc:
            self._due = now + self._delay_s
            log.error("cannot start the Ray reservation loop: %s", exc)
            return
        self._started_at = now
        log.info("Ray reservation loop started (pid %d)", self._proc.pid)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the child (SIGTERM, then SIGKILL); the reservation stays in Ray."""
        with self._lock:
            self._stopped = True
            proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
