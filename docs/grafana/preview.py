"""Draw the Grafana dashboard's panels from a real Prometheus: docs/metrics-screenshot.png.

Grafana cannot be installed here, so this is not a Grafana screenshot: it runs a daemon on four
simulated H100s with ``--metrics-address``, two training clients under wattage and energy budgets
(one job in ``hw`` mode on GPU 0, one in ``clock`` mode on GPUs 1 and 2; GPU 3 idles), and a real
Prometheus (Debian's package) scraping it every second; then it asks that Prometheus every query of
docs/grafana/powertrain-dashboard.json over the run, as Grafana would, and draws each panel's
answer with matplotlib in the dashboard's layout.

    .venv/bin/python docs/grafana/preview.py [--seconds 90] [--out docs/metrics-screenshot.png]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.daemon_proc import free_port, start_daemon  # noqa: E402
from tests.prometheus_proc import (  # noqa: E402
    DASHBOARD,
    Prometheus,
    concrete,
    dashboard_panels,
)

JOB = """
import os, sys, time
from scheduler.client import track
sock, stop, name, gpus, watts, mode = sys.argv[1:7]
with track(name=name, gpu_ids=[int(g) for g in gpus.split(",")], watts=float(watts), mode=mode,
           energy_wh=40, total_tokens=10**9, socket_path=sock) as job:
    while not os.path.exists(stop):
        with job.step(tokens=8192, samples=16):
            time.sleep(0.03)
"""

UNITS = {"watt": "W", "joule": "J", "hertz": "Hz", "celsius": "°C", "s": "s",
         "percentunit": "", "short": ""}


def _legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="how long the jobs run")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "metrics-screenshot.png")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="powertrain-preview-") as tmp_name:
        tmp = Path(tmp_name)
        metrics_port = free_port()
        prometheus = Prometheus(tmp / "prometheus", free_port(), [f"127.0.0.1:{metrics_port}"])
        daemon = start_daemon(tmp / "home", tmp / "api.sock", "--metrics-address",
                              f"127.0.0.1:{metrics_port}", gpus=4)
        stop = tmp / "stop"
        jobs = [
            subprocess.Popen([sys.executable, "-c", JOB, str(tmp / "api.sock"), str(stop), *spec],
                             cwd=REPO)
            for spec in (("pretrain-a", "0", "450", "hw"), ("pretrain-b", "1,2", "300", "clock"))
        ]
        try:
            prometheus.wait_ready()
            start = time.time()
            time.sleep(args.seconds)
            end = time.time()
            answers = _ask(prometheus, start, end)
        finally:
            stop.touch()
            for job in jobs:
                try:
                    job.wait(15)
                except subprocess.TimeoutExpired:
                    job.kill()
            daemon.terminate()
            prometheus.stop()
    _draw(answers, start, args.out)
    print(f"wrote {args.out}")
    return 0


def _ask(prometheus: Prometheus, start: float, end: float) -> list[dict[str, Any]]:
    """Each panel with its queries' answers over [start, end] (instant ones at ``end``)."""
    out = []
    step = max(1.0, (end - start) / 300)
    for panel in dashboard_panels():
        results = []
        for target in panel["targets"]:
            expr = concrete(target["expr"], range_=f"{math.floor(end - start)}s")
            if panel["type"] == "row":
                continue
            if panel["type"] in ("stat", "table"):
                results.append((target, prometheus.query(expr, end)))
            else:
                results.append((target, prometheus.query_range(expr, start, end, step)))
        out.append({"panel": panel, "results": results})
    return out


def _draw(answers: list[dict[str, Any]], start: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p["panel"]["gridPos"]["y"] + p["panel"]["gridPos"]["h"] for p in answers)
    fig = plt.figure(figsize=(18, rows * 0.42), dpi=90)
    fig.patch.set_facecolor("#111217")
    grid = fig.add_gridspec(rows, 24, hspace=1.6, wspace=1.2, top=0.97, bottom=0.02)
    for item in answers:
        panel, pos = item["panel"], item["panel"]["gridPos"]
        ax = fig.add_subplot(grid[pos["y"]:pos["y"] + pos["h"] - 1, pos["x"]:pos["x"] + pos["w"]])
        ax.set_facecolor("#181b1f")
        for side in ax.spines.values():
            side.set_color("#2c3235")
        ax.tick_params(colors="#ccccdc", labelsize=7)
        unit = UNITS.get(panel["fieldConfig"]["defaults"].get("unit", ""), "")
        ax.set_title(panel["title"] + (f" ({unit})" if unit else ""), color="#ccccdc",
                     fontsize=9, loc="left")
        if panel["type"] == "timeseries":
            for target, result in item["results"]:
                for series in result:
                    t = [float(v[0]) - start for v in series["values"]]
                    y = [float(v[1]) for v in series["values"]]
                    ax.plot(t, y, linewidth=1.2,
                            label=_legend(target.get("legendFormat", ""), series["metric"]))
            ax.set_xlabel("s", color="#8e8e8e", fontsize=7)
            ax.grid(color="#2c3235", linewidth=0.5)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="upper left", ncol=2, facecolor="#181b1f",
                          labelcolor="#ccccdc", framealpha=0.6)
        elif panel["type"] == "stat":
            ax.set_xticks([])
            ax.set_yticks([])
            lines = [f"{_legend(target.get('legendFormat', ''), s['metric'])}: "
                     f"{float(s['value'][1]):,.0f}"
                     for target, result in item["results"] for s in result]
            ax.text(0.5, 0.5, "\n".join(lines), color="#73bf69", fontsize=12, ha="center",
                    va="center", transform=ax.transAxes)
        elif panel["type"] == "table":
            ax.set_xticks([])
            ax.set_yticks([])
            keys = ["job_id", "name", "user", "state", "gpus", "mode", "mode_effective", "owner"]
            cells = [[s["metric"].get(k, "") for k in keys]
                     for _, result in item["results"] for s in result]
            if cells:
                table = ax.table(cellText=cells, colLabels=keys, loc="center")
                table.set_fontsize(8)
                for cell in table.get_celld().values():
                    cell.set_facecolor("#181b1f")
                    cell.set_edgecolor("#2c3235")
                    cell.get_text().set_color("#ccccdc")
    fig.suptitle(f"powertrain dashboard ({DASHBOARD.name}): every panel's PromQL answered by a "
                 "real Prometheus scraping a daemon on 4 simulated H100s; drawn with matplotlib, "
                 "not Grafana", color="#ccccdc", fontsize=11, y=0.99)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor=fig.get_facecolor(), bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
