"""`powertrain demo`: the daemon on simulated H100s under a synthetic load, then energy per GPU.

The daemon runs as a real subprocess; this process drives the simulated node's load through the
node's state file, the same way a job would, and reads the results back from the store.
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

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from telemetry.backends.simulated import SimulatedBackend
from telemetry.store import open_store

CAPPED_LIMIT_MW = 400_000


@dataclass(frozen=True, slots=True)
class _Pattern:
    label: str
    busy_from: float  # share of the run before the GPU starts working
    period_s: float | None  # busy/idle alternation period (input stalls), None: steady


PATTERNS = (
    _Pattern("training", 0.0, None),
    _Pattern("training, 400 W cap", 0.0, None),
    _Pattern("idle, then training", 1 / 3, None),
    _Pattern("4 s on / 4 s off", 0.0, 8.0),
)


def _busy(pattern: _Pattern, t: float, seconds: float) -> bool:
    if t < pattern.busy_from * seconds:
        return False
    return pattern.period_s is None or (t % pattern.period_s) < pattern.period_s / 2


def run_demo(*, home: Path, seconds: float, gpus: int, console: Console) -> None:
    """Run the demo in ``home`` (wiped first) and print per-GPU energy and mean power."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    node = SimulatedBackend(gpus=gpus, sku="H100-SXM", state_path=home / "simulated-gpus.json")
    patterns = [PATTERNS[i % len(PATTERNS)] for i in range(gpus)]
    for index, pattern in enumerate(patterns):
        if "cap" in pattern.label:
            node.set_power_limit(index, CAPPED_LIMIT_MW)

    env = {k: v for k, v in os.environ.items() if not k.startswith("POWERTRAIN_")}
    log_path = home / "daemon.log"
    cmd = [sys.executable, "-m", "scheduler", "daemon", "--backend", "simulated",
           "--home", str(home)]
    console.print(f"[bold]powertrain demo[/]: daemon on {gpus} simulated H100 SXM GPUs, "
                  f"sampling at 10 Hz for {seconds:.0f} s (log: {log_path})")
    with log_path.open("w") as log:
        daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _drive(node, patterns, seconds, daemon, console)
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(30)
    for index in range(gpus):
        node.set_workload(index, None)
        node.reset_power_limit(index)
    node.close()
    if code != 0:
        raise RuntimeError(f"the daemon exited with status {code}; see {log_path}")
    _summarise(home, patterns, console)


def _drive(
    node: SimulatedBackend,
    patterns: list[_Pattern],
    seconds: float,
    daemon: subprocess.Popen[bytes],
    console: Console,
) -> None:
    state: list[bool | None] = [None] * len(patterns)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task("sampling", total=seconds)
        start = time.monotonic()
        while (t := time.monotonic() - start) < seconds:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited early with status {daemon.returncode}")
            for index, pattern in enumerate(patterns):
                busy = _busy(pattern, t, seconds)
                if busy != state[index]:
                    node.set_workload(index, "training" if busy else None)
                    state[index] = busy
            busy_now = sum(1 for s in state if s)
            progress.update(task, completed=t, description=f"sampling ({busy_now} GPUs busy)")
            time.sleep(0.2)
        progress.update(task, completed=seconds)


def _summarise(home: Path, patterns: list[_Pattern], console: Console) -> None:
    store = open_store(f"sqlite:///{home / 'powertrain.db'}")
    try:
        table = Table("GPU", "Load", "Samples", "Span", "Energy", "Mean power",
                      title="Energy per GPU, from the store", box=box.SIMPLE_HEAD)
        total_j = 0.0
        for gpu in sorted(store.gpus(), key=lambda g: g.index):
            energy = store.gpu_energy(gpu.id)
            samples = store.sample_count(gpu.id)
            joules = energy.energy_mj / 1000
            total_j += joules
            mean_w = joules / energy.duration_s if energy.duration_s else float("nan")
            table.add_row(
                str(gpu.index), patterns[gpu.index].label, f"{samples:,}",
                f"{energy.duration_s:.1f} s", f"{joules / 1000:,.2f} kJ ({joules / 3600:.2f} Wh)",
                f"{mean_w:.0f} W",
            )
        console.print(table)
        console.print(f"Total: {total_j / 1000:,.2f} kJ ({total_j / 3600:.2f} Wh). "
                      f"Store: {home / 'powertrain.db'}")
    finally:
        store.close()
