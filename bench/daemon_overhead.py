"""Daemon CPU overhead: CPU seconds per wall second of a real `powertrain daemon` process.

Starts the daemon on simulated GPUs with a SQLite store, lets it settle (imports, schema creation
and the first flushes are start-up, not steady state), then measures the process's user + system
CPU time over the window with psutil. Target: under 0.01 CPU s per wall s for 8 GPUs at 10 Hz.

    .venv/bin/python bench/daemon_overhead.py --seconds 60 --json bench/results/daemon_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from sqlalchemy import create_engine, text

TARGET = 0.01


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window")
    parser.add_argument("--settle", type=float, default=5.0, help="start-up excluded, seconds")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="powertrain-bench-") as home:
        env = dict(os.environ, POWERTRAIN_HOME=home)
        cmd = [
            sys.executable, "-m", "scheduler", "daemon", "--backend", "simulated",
            "--sim-gpus", str(args.gpus), "--interval-ms", str(round(1000 / args.hz)),
        ]
        daemon = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        proc = psutil.Process(daemon.pid)
        try:
            time.sleep(args.settle)
            if daemon.poll() is not None:
                stderr = daemon.stderr.read() if daemon.stderr else ""
                raise SystemExit(f"daemon exited early: {stderr}")
            cpu0, wall0 = proc.cpu_times(), time.monotonic()
            deadline = wall0 + args.seconds
            while (left := deadline - time.monotonic()) > 0:
                print(f"\rmeasuring: {left:5.1f} s left", end="", file=sys.stderr, flush=True)
                time.sleep(min(1.0, left))
            cpu1, wall1 = proc.cpu_times(), time.monotonic()
            print(file=sys.stderr)
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, stderr = daemon.communicate(timeout=30)
        if daemon.returncode != 0:
            raise SystemExit(f"daemon exited {daemon.returncode}:\n{stderr}")

        engine = create_engine(f"sqlite:///{home}/powertrain.db")
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT count(*) FROM samples")).scalar_one()
        engine.dispose()

    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    wall_s = wall1 - wall0
    ratio = cpu_s / wall_s
    result = {
        "gpus": args.gpus,
        "hz": args.hz,
        "seconds": round(wall_s, 2),
        "cpu_s_per_wall_s": round(ratio, 5),
        "samples_stored": rows,
        "target": TARGET,
    }
    verdict = "meets" if ratio < TARGET else "MISSES"
    print(
        f"daemon, {args.gpus} simulated GPUs at {args.hz:g} Hz for {wall_s:.1f} s: "
        f"{cpu_s:.3f} CPU s -> {ratio:.4f} CPU s per wall s ({verdict} the < {TARGET} target); "
        f"{rows} samples stored"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
