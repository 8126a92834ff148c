"""A real Prometheus server (Debian's ``prometheus`` package) for tests and the dashboard preview:
started on a loopback port with a throwaway TSDB, scraping the targets it is given every second,
and queried through its HTTP API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

INSTALL_HINT = "install it with .ci/prometheus.sh (Debian: apt-get install prometheus)"
REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docs" / "grafana" / "powertrain-dashboard.json"


def binaries() -> tuple[str, str]:
    """The ``prometheus`` and ``promtool`` executables.

    Raises:
        AssertionError: One is missing. CI installs them (.ci/prometheus.sh): their tests fail,
            they never skip.
    """
    server, tool = shutil.which("prometheus"), shutil.which("promtool")
    if server is None or tool is None:
        raise AssertionError(f"prometheus and promtool are needed: {INSTALL_HINT}")
    return server, tool


class Prometheus:
    """One Prometheus server scraping ``targets`` (``HOST:PORT``) every ``interval_s``.

    Args:
        folder: Its configuration, data and log go here.
        port: The loopback port its API listens on.
        targets: What it scrapes (``/metrics`` of each).
        interval_s: Scrape interval, s.
    """

    def __init__(
        self, folder: Path, port: int, targets: list[str], *, interval_s: float = 1.0
    ) -> None:
        server, _ = binaries()
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": f"{interval_s:g}s",
                       "scrape_timeout": f"{interval_s:g}s",
                       "evaluation_interval": f"{interval_s:g}s"},
            "scrape_configs": [{"job_name": "powertrain",
                                "static_configs": [{"targets": targets}]}],
        }))
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = folder / "prometheus.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [server, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.http = httpx.Client(base_url=self.url, timeout=10.0)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until it answers ``/-/ready``; fail with its log if it exits or never does."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            try:
                if self.http.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready in {timeout_s} s:\n{self.log()}")

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (``data.result``); ``at`` in Unix seconds (default now)."""
        params = {"query": expr} | ({} if at is None else {"time": f"{at:.3f}"})
        return self._data("/api/v1/query", params)

    def query_range(
        self, expr: str, start: float, end: float, step_s: float
    ) -> list[dict[str, Any]]:
        """A range query's result: one series per label set, ``values`` as [t, "v"] pairs."""
        return self._data("/api/v1/query_range", {
            "query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}",
        })

    def _data(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        answer = self.http.get(path, params=params)
        body = answer.json()
        if answer.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"{params['query']!r}: {answer.status_code} {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# -- the Grafana dashboard's queries ---------------------------------------------------------------

def dashboard_panels(path: Path = DASHBOARD) -> list[dict[str, Any]]:
    """Every panel of the dashboard (rows' panels too) that has queries."""
    board = json.loads(path.read_text())
    found: list[dict[str, Any]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            if panel.get("targets"):
                found.append(panel)
            walk(panel.get("panels", []))

    walk(board["panels"])
    return found


def concrete(
    expr: str, *, rate_interval: str = "5s", range_: str = "30s", node: str = ".+"
) -> str:
    """A panel's PromQL with Grafana's variables replaced, as Grafana would send it."""
    values = {"__rate_interval": rate_interval, "__range": range_, "node": node}
    return re.sub(r"\$\{?(__rate_interval|__range|node)\}?", lambda m: values[m[1]], expr)
