"""Soft budget on a real GPU: pacing holds a real PyTorch job under a budget, touching no setting.

Runs the daemon with ``--dry-run`` (it logs the power limits and clocks it would set and sets
none), trains ``examples/pretrain_gpt.py`` on the GPU once without a budget to measure its
unconstrained power, then again in ``--mode soft`` at a budget below that, and reports the share
of 10 s windows within the budget (+2 %), the settling time and the throughput relative to the
unconstrained run. It never changes a GPU setting: soft mode only paces the training loop.

    .venv/bin/python bench/gpu_soft_check.py --json bench/results/gpu_soft_check.json

``--backend simulated`` runs the same plumbing on simulated GPUs (its numbers are the
simulator's). Without an NVIDIA driver (and without that flag) it prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scheduler.apiclient import DaemonClient, DaemonError  # noqa: E402
from scheduler.store import JobStore  # noqa: E402
from telemetry.store import Store, open_store  # noqa: E402

# A model big enough to load an H100 (~85 M parameters); --small for the simulator's CPU run.
GPU_MODEL = ["--layers", "12", "--dim", "768", "--heads", "12", "--seq-len", "512",
             "--batch-size", "32", "--data-mb", "8", "--log-every", "50"]
CPU_MODEL = ["--layers", "2", "--dim", "64", "--heads", "2", "--seq-len", "64", "--batch-size",
             "8", "--data-mb", "1", "--log-every", "200"]
SETTLE_S = 15.0


def windows_w(store: Store, gpu_id: int, since: float, until: float) -> list[float]:
    rows = [(s.sampled_at.timestamp(), s.energy_mj) for s in store.samples(gpu_id)]
    times = [t for t, _ in rows]
    energy = [e or 0 for _, e in rows]

    def at(t: float) -> float:
        i = min(max(bisect.bisect_left(times, t), 1), len(times) - 1)
        t0, t1 = times[i - 1], times[i]
        return energy[i - 1] + (energy[i] - energy[i - 1]) * (t - t0) / (t1 - t0)

    out = []
    start = since
    while start + 10.0 <= until:
        out.append((at(start + 10.0) - at(start)) / 1000 / 10.0)
        start += 1.0
    return out


def run_job(client: DaemonClient, store_url: str, args: list[str], body: dict[str, Any],
            seconds: float) -> dict[str, Any]:
    argv = [sys.executable, str(REPO / "examples" / "pretrain_gpt.py"), *args,
            "--steps", "10000000", "--max-seconds", str(seconds)]
    job = client.submit({"argv": argv, "cwd": str(REPO), "env": dict(os.environ), "gpus": 1,
                         **body})
    while client.job(job["id"])["state"] in ("queued", "running", "paused"):
        print(f"\r  job {job['id']}: {client.job(job['id'])['tokens']:,} tokens ", end="",
              file=sys.stderr, flush=True)
        time.sleep(1.0)
    print(file=sys.stderr)
    view = client.job(job["id"])
    store = open_store(store_url)
    try:
        jobs = JobStore(store)
        record = jobs.get(job["id"])
        assert record is not None and record.started_at and record.ended_at
        win = windows_w(store, record.gpu_ids[0], record.started_at.timestamp() + SETTLE_S,
                        record.ended_at.timestamp())
        # Throughput after settling (start-up, imports and the first controller ticks excluded).
        rate = jobs.throughput(job["id"], window_s=max(seconds - SETTLE_S - 5.0, 5.0))
        decisions = [f"{d.at:%H:%M:%S} {d.source}: {d.what} ({d.why})"
                     for d in jobs.decisions(job["id"])]
    finally:
        store.close()
    return {"job": view, "windows_w": win, "decisions": decisions,
            "tokens_per_s": rate.tokens_per_s if rate else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["nvml", "simulated"], default="nvml")
    parser.add_argument("--seconds", type=float, default=60.0, help="each run's length")
    parser.add_argument("--share", type=float, default=0.6,
                        help="budget as a share of the unconstrained power")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--daemon-log", type=Path, help="keep a copy of the daemon's log here")
    args = parser.parse_args()

    if args.backend == "nvml":
        from telemetry.backends.nvml import nvml_available

        ok, why = nvml_available()
        if not ok:
            print(f"no NVIDIA driver found: {why}", file=sys.stderr)
            return 2
    model = GPU_MODEL if args.backend == "nvml" else CPU_MODEL
    with tempfile.TemporaryDirectory(prefix="pt-soft-") as home:
        socket = Path(home) / "api.sock"
        store_url = f"sqlite:///{home}/powertrain.db"
        cmd = [sys.executable, "-m", "scheduler", "daemon", "--backend", args.backend,
               "--dry-run", "--home", home, "--socket", str(socket)]
        if args.backend == "simulated":
            cmd += ["--sim-gpus", "1"]
        log = open(Path(home) / "daemon.log", "w")  # noqa: SIM115 (lives as long as the daemon)
        daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            with DaemonClient(socket) as client:
                for _ in range(120):
                    try:
                        client.request("GET", "/v1/health")
                        break
                    except DaemonError:
                        time.sleep(0.5)
                print("unconstrained run", file=sys.stderr)
                free = run_job(client, store_url, model, {"name": "unconstrained"}, args.seconds)
                unconstrained_w = sorted(free["windows_w"])[len(free["windows_w"]) // 2]
                budget_w = round(unconstrained_w * args.share)
                print(f"soft run at {budget_w} W", file=sys.stderr)
                soft = run_job(client, store_url, model,
                               {"name": "soft", "mode": "soft", "watts": budget_w},
                               args.seconds)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            log.close()
            daemon_log = (Path(home) / "daemon.log").read_text()
            if args.daemon_log:
                args.daemon_log.write_text(daemon_log)

    within = [w <= budget_w * 1.02 for w in soft["windows_w"]]
    result = {
        "backend": args.backend,
        "unconstrained_w": unconstrained_w,
        "budget_w": budget_w,
        "settle_s": SETTLE_S,
        "windows": len(within),
        "within_budget_share": sum(within) / len(within) if within else None,
        "max_window_w": max(soft["windows_w"], default=None),
        "mean_window_w": sum(soft["windows_w"]) / len(within) if within else None,
        "throughput_rel": (soft["tokens_per_s"] / free["tokens_per_s"]
                           if soft["tokens_per_s"] and free["tokens_per_s"] else None),
        "decisions": soft["decisions"],
        "dry_run_lines": [line for line in daemon_log.splitlines() if "dry run" in line][:20],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "dry_run_lines"}, indent=2))
    if args.backend == "simulated":
        print("(simulated GPUs: these numbers are the simulator's, not a GPU's)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
