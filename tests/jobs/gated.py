"""A stand-in training loop for end-to-end tests: reports its steps through the real client and
waits at a gate, a file the test creates, so a test decides when the job goes on."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from scheduler.client import track


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--tokens-per-step", type=int, default=512)
    parser.add_argument("--gate", type=Path, required=True, help="wait for this file ...")
    parser.add_argument("--gate-at", type=int, default=10, help="... before this step")
    parser.add_argument("--step-s", type=float, default=0.01)
    args = parser.parse_args()
    with track(name="gated") as job:
        for step in range(args.steps):
            if step == args.gate_at:
                print(f"waiting at step {step} for {args.gate}", flush=True)
                while not args.gate.exists():
                    time.sleep(0.05)
            with job.step(tokens=args.tokens_per_step, samples=1):
                time.sleep(args.step_s)
    print(f"done: {job.steps} steps, {job.tokens} tokens", flush=True)


if __name__ == "__main__":
    main()
