"""`powertrain demo`: the daemon on simulated H100s runs real training jobs under budgets, and the
energy optimiser against the default setting.

The daemon runs as a real subprocess on simulated GPUs. Runs of ``examples/pretrain_gpt.py``
(real PyTorch training on the CPU) are submitted through its API in two phases: two with wattage
budgets, which the daemon holds (power limits where it may set them, else pacing); then two of
the same job side by side, one at the default setting and one under ``--objective energy``,
whose optimiser searches its micro-batch and power limit. Their progress is shown while they
train; then a per-job summary is read back from the store, with what the optimiser saved against
the default (energy per token and throughput, both measured), and the HTML report is written.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from energy.units import j_to_wh, mj_to_j, mw_to_w
from scheduler.apiclient import DaemonClient, DaemonError
from scheduler.store import JobStore, SearchRecord
from telemetry.store import open_store

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pretrain_gpt.py"
SEQ_LEN = 128
BATCH = 16


@dataclass(frozen=True, slots=True)
class DemoJob:
    """One submitted run: name, budget per GPU (W; None: none), GPUs, steps, the optimiser's
    objective (None: the default setting), the loop's own micro-batch (None: the batch)."""

    name: str
    watts: float | None
    gpus: int
    steps: int
    objective: str | None = None
    micro_batch: int | None = None
    model: tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        return self.steps * BATCH * SEQ_LEN


#: The loop's own micro-batch in the optimiser's pair: a conservative split (4 of 16 sequences,
#: so 4 micro-batches a step), as one picks before knowing what fits; the optimiser may go up.
OWN_MICRO_BATCH = 4

SIM_GPUS = 8
"""An HGX-like node."""

#: The optimiser's pair trains a smaller model, so that its steps are short: the search measures
#: each setting for a few seconds, and the job should then run at its choice for longer than it
#: searched.
SMALL = ("--layers", "2", "--dim", "64", "--heads", "2")

#: Two phases, one after the other: the budgets, then the optimiser's pair. The pair's jobs
#: compute on the CPU, which stands for their GPUs; sharing it with other jobs that start and
#: end in the middle of the search would change their step time under the optimiser's probes.
PHASES = (
    (DemoJob("gpt-450w", 450.0, 1, 100), DemoJob("gpt-300w-x2", 300.0, 2, 100)),
    (
        DemoJob("gpt-default", None, 1, 1800, micro_batch=OWN_MICRO_BATCH, model=SMALL),
        DemoJob("gpt-energy", None, 1, 1800, objective="energy", micro_batch=OWN_MICRO_BATCH,
                model=SMALL),
    ),
)


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
        str(SIM_GPUS),
        "--home",
        str(home),
        "--socket",
        str(socket),
    ]
    console.print(
        f"[bold]powertrain demo[/]: daemon on {SIM_GPUS} simulated H100 SXM GPUs "
        f"(store {home / 'powertrain.db'}, log {log_path})"
    )
    phases = [[j if steps is None else replace(j, steps=steps) for j in phase]
              for phase in PHASES]
    jobs = [job for phase in phases for job in phase]
    # A SIGTERM ends the demo as Ctrl-C does: its jobs are cancelled, its daemon stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with log_path.open("w") as log:
        daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            with DaemonClient(socket) as client:
                _wait_ready(client, daemon)
                ids: dict[str, int] = {}
                try:
                    for phase in phases:
                        for job in phase:
                            ids[job.name] = _submit(client, job)
                        _follow(client, daemon, phase, ids, console)
                except BaseException:
                    _cancel(client, ids.values())  # jobs outlive their daemon: not the demo's
                    raise
                views = {v["id"]: v for v in client.jobs(include_ended=True)}
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(30)
    if code != 0:
        raise RuntimeError(f"the daemon exited with status {code}; see {log_path}")
    store = open_store(f"sqlite:///{home / 'powertrain.db'}")
    try:
        store_jobs = JobStore(store)
        figures = _summarise(store_jobs, jobs, ids, views, console)
        energy_id = ids["gpt-energy"]
        searches = store_jobs.searches([energy_id]).get(energy_id, [])
    finally:
        store.close()
    _compare(figures["gpt-default"], figures["gpt-energy"], searches, console)
    from reports.files import write_demo_report

    report = write_demo_report(f"sqlite:///{home / 'powertrain.db'}", home / "report.html")
    console.print(f"HTML report: {report}")
    console.print(f"Explore it: powertrain report --home {home} [--by gpu|user|hour] [--json]")
    return home / "powertrain.db"


def _cancel(client: DaemonClient, ids: Iterable[int]) -> None:
    """Cancel the demo's jobs that have not ended (the demo was interrupted or failed)."""
    for job_id in ids:
        try:
            if client.job(job_id)["state"] in ("queued", "running", "paused"):
                client.cancel(job_id)
        except DaemonError:
            pass  # the daemon is gone: its jobs' processes end with their checkpoint hook


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
        "50",
    ]
    if job.micro_batch is not None:
        argv += ["--micro-batch", str(job.micro_batch)]
    argv += job.model
    view = client.submit(
        {
            "name": job.name,
            "argv": argv,
            "cwd": str(EXAMPLE.parent),
            # the jobs of a phase share the machine's cores: one thread each, or they fight
            "env": dict(os.environ) | {"OMP_NUM_THREADS": "1"},
            "gpus": job.gpus,
            "watts": job.watts,
            "objective": job.objective,
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
    store_jobs: JobStore,
    jobs: list[DemoJob],
    ids: dict[str, int],
    views: dict[int, dict[str, Any]],
    console: Console,
) -> dict[str, tuple[float | None, float | None]]:
    """Print the per-job table; returns each job's (J per token, tokens/s) over its whole run."""
    table = Table(
        "ID", "Job", "State", "GPUs", "W/GPU", "Energy", "Power", "Tokens/s", "J/token",
        title="Per-job summary, from the store (power: all the job's GPUs together)",
        box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
    )
    figures: dict[str, tuple[float | None, float | None]] = {}
    for job in jobs:
        job_id = ids[job.name]
        record = store_jobs.get(job_id)
        energy = store_jobs.energy(job_id)
        view = views[job_id]
        joules = mj_to_j(energy.energy_mj)
        mean_w = joules / energy.duration_s if energy.duration_s else float("nan")
        rate = store_jobs.throughput(job_id, window_s=1e9)
        tokens_per_s = rate.tokens_per_s if rate is not None else None
        tokens = view["tokens"]
        figures[job.name] = (joules / tokens if tokens else None, tokens_per_s)
        table.add_row(
            str(job_id),
            job.name,
            view["state"],
            ",".join(map(str, record.gpus)) if record else "-",
            f"{job.watts:.0f}" if job.watts is not None else "-",
            f"{j_to_wh(joules):.2f} Wh",
            f"{mean_w:.0f} W",
            "-" if tokens_per_s is None else f"{tokens_per_s:,.0f}",
            f"{joules / tokens:.4f}" if tokens else "-",
        )
    console.print(table)
    return figures


def _compare(
    default: tuple[float | None, float | None],
    energy: tuple[float | None, float | None],
    searches: list[SearchRecord],
    console: Console,
) -> None:
    """What ``--objective energy`` saved against the same job at the default setting: energy per
    token and throughput over each whole job (the search included), as measured."""
    (j_default, rate_default), (j_energy, rate_energy) = default, energy
    if not (j_default and rate_default and j_energy and rate_energy):
        console.print("the optimiser's pair reported no tokens: nothing to compare")
        return
    console.print(
        f"[bold]--objective energy[/] against the same job at the default setting (whole jobs, "
        f"search included, measured): energy per token {j_default:.4f} -> {j_energy:.4f} J "
        f"([bold]{j_energy / j_default - 1:+.0%}[/]), throughput {rate_default:,.0f} -> "
        f"{rate_energy:,.0f} tokens/s ({rate_energy / rate_default - 1:+.0%})"
    )
    if searches:
        last = searches[-1]
        micro = (f"micro-batch {last.micro_batch} (its own: {last.default_micro_batch}), "
                 if last.micro_batch is not None else "")
        console.print(f"  the optimiser chose {micro}power limit {mw_to_w(last.setting):g} W "
                      f"(default {mw_to_w(last.top_setting):g} W): {last.reason}")
