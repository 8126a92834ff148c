"""`powertrain demo`: the daemon on simulated H100s runs two real training jobs under budgets.

The daemon runs as a real subprocess on simulated GPUs; two runs of ``examples/pretrain_gpt.py``
(real PyTorch training on the CPU) are submitted through its API with different wattage budgets,
which the daemon holds (power limits where it may set them, else pacing); their progress is shown
while they train, then a per-job summary is read back from the store and the HTML report is
written.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from energy.units import j_to_wh, mj_to_j
from scheduler.apiclient import DaemonClient, DaemonError
from scheduler.store import JobStore
from telemetry.store import open_store

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pretrain_gpt.py"
SEQ_LEN = 128
BATCH = 16


@dataclass(frozen=True, slots=True)
class DemoJob:
    """One submitted run: name, budget per GPU (W), GPUs, steps."""

    name: str
    watts: float
    gpus: int
    steps: int

    @property
    def tokens(self) -> int:
        return self.steps * BATCH * SEQ_LEN


JOBS = (DemoJob("gpt-450w", 450.0, 1, 150), DemoJob("gpt-300w-x2", 300.0, 2, 150))


def run_demo(*, home: Path, steps: int | None, console: Console) -> Path:
    """Run the demo in ``home`` (wiped first); returns the store's path."""
    home = home.resolve()
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    socket = home / "powertrain.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POWERTRAIN_")}
    log_path = home / "daemon.log"
    cmd = [
        sys.executable,
        "-m",
        "scheduler",
        "daemon",
        "--backend",
        "simulated",
        "--sim-gpus",
        "4",
        "--home",
        str(home),
        "--socket",
        str(socket),
    ]
    console.print(
        f"[bold]powertrain demo[/]: daemon on 4 simulated H100 SXM GPUs "
        f"(store {home / 'powertrain.db'}, log {log_path})"
    )
    jobs = [DemoJob(j.name, j.watts, j.gpus, steps or j.steps) for j in JOBS]
    with log_path.open("w") as log:
        daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            with DaemonClient(socket) as client:
                _wait_ready(client, daemon)
                ids = {job.name: _submit(client, job) for job in jobs}
                _follow(client, daemon, jobs, ids, console)
                views = {v["id"]: v for v in client.jobs(include_ended=True)}
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(30)
    if code != 0:
        raise RuntimeError(f"the daemon exited with status {code}; see {log_path}")
    _summarise(home, jobs, ids, views, console)
    from reports.files import write_demo_report

    report = write_demo_report(f"sqlite:///{home / 'powertrain.db'}", home / "report.html")
    console.print(f"HTML report: {report}")
    console.print(f"Explore it: powertrain report --home {home} [--by gpu|user|hour] [--json]")
    return home / "powertrain.db"


def _wait_ready(client: DaemonClient, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited early with status {daemon.returncode}")
        try:
            client.request("GET", "/v1/health")
            return
        except DaemonError:
            time.sleep(0.2)
    raise RuntimeError("the daemon did not answer within 60 s")


def _submit(client: DaemonClient, job: DemoJob) -> int:
    argv = [
        sys.executable,
        str(EXAMPLE),
        "--steps",
        str(job.steps),
        "--name",
        job.name,
        "--log-every",
        "25",
    ]
    view = client.submit(
        {
            "name": job.name,
            "argv": argv,
            "cwd": str(EXAMPLE.parent),
            "env": dict(os.environ),
            "gpus": job.gpus,
            "watts": job.watts,
        }
    )
    return int(view["id"])


def _follow(
    client: DaemonClient,
    daemon: subprocess.Popen[bytes],
    jobs: list[DemoJob],
    ids: dict[str, int],
    console: Console,
) -> None:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        tasks: dict[int, TaskID] = {
            ids[j.name]: progress.add_task(j.name, total=j.tokens) for j in jobs
        }
        while True:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited early with status {daemon.returncode}")
            views = {v["id"]: v for v in client.jobs(include_ended=True)}
            for job in jobs:
                view = views[ids[job.name]]
                progress.update(
                    tasks[view["id"]], completed=view["tokens"], description=_describe(job, view)
                )
            if all(views[i]["state"] not in ("queued", "running", "paused") for i in ids.values()):
                return
            time.sleep(0.5)


def _describe(job: DemoJob, view: dict[str, Any]) -> str:
    power = "-" if view["power_w"] is None else f"{view['power_w']:.0f} W"
    rate = "-" if view["tokens_per_s"] is None else f"{view['tokens_per_s']:,.0f} tok/s"
    return (
        f"{job.name:<12} {view['state']:<9} GPUs {','.join(map(str, view['gpus'])) or '-':<4}"
        f" {power:>7} {rate:>12}"
    )


def _summarise(
    home: Path,
    jobs: list[DemoJob],
    ids: dict[str, int],
    views: dict[int, dict[str, Any]],
    console: Console,
) -> None:
    store = open_store(f"sqlite:///{home / 'powertrain.db'}")
    try:
        store_jobs = JobStore(store)
        table = Table(
            "ID", "Job", "State", "GPUs", "W/GPU", "Energy", "Power", "Tokens/s", "J/token",
            title="Per-job summary, from the store (power: all the job's GPUs together)",
            box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
        )
        for job in jobs:
            job_id = ids[job.name]
            record = store_jobs.get(job_id)
            energy = store_jobs.energy(job_id)
            view = views[job_id]
            joules = mj_to_j(energy.energy_mj)
            mean_w = joules / energy.duration_s if energy.duration_s else float("nan")
            rate = store_jobs.throughput(job_id, window_s=1e9)
            tokens = view["tokens"]
            table.add_row(
                str(job_id),
                job.name,
                view["state"],
                ",".join(map(str, record.gpus)) if record else "-",
                f"{job.watts:.0f}",
                f"{j_to_wh(joules):.2f} Wh",
                f"{mean_w:.0f} W",
                "-" if rate is None or rate.tokens_per_s is None else f"{rate.tokens_per_s:,.0f}",
                f"{joules / tokens:.4f}" if tokens else "-",
            )
        console.print(table)
    finally:
        store.close()
