"""A rank of a Slurm job for tests/test_slurm.py: steps with the training client until a gate
file exists, each step 100 tokens and one sample.

Before it starts, it writes the power limit of each of its GPUs as the daemon shows them
(``GET /v1/gpus``) to ``<out>/rank<r>.limits``: what its prolog left in force. A rank that ended
writes its steps to ``<out>/rank<r>.done``. No torch: the ranks only need to step and report.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import httpx

from scheduler.client import default_socket_path, track


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gate", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--step-s", type=float, default=0.05)
    args = parser.parse_args()
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    args.out.mkdir(parents=True, exist_ok=True)
    visible = [int(i) for i in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if i]
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(default_socket_path())),
                      base_url="http://powertrain") as http:
        gpus = http.get("/v1/gpus").json()
    limits = {g["index"]: g["power_limit_w"] for g in gpus if g["index"] in visible}
    (args.out / f"rank{rank}.limits").write_text(json.dumps(limits))

    with track(name="slurm-test", report_interval_s=0.5) as job:
        while not args.gate.exists():
            with job.step(tokens=100, samples=1):
                time.sleep(args.step_s)
    (args.out / f"rank{rank}.done").write_text(f"{job.steps}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
