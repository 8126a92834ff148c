"""A small DDP training run for the distributed tests: real torch.distributed (gloo, CPU), every
rank reporting through the client what it processed itself.

Rank r processes ``(r + 1) * 100`` tokens per step, so the job's summed tokens tell whether every
rank was counted once. Each time the client calls the checkpoint hook, the rank appends the step
it is at to ``<out>/rank<r>.checkpoints``; a rank that ended writes ``<out>/rank<r>.done``.

The run ends after ``--steps`` steps, or, with ``--finish-file``, at the step written in that file
(rank 0 reads it and every rank learns it in the same collective, so all end at one step).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from scheduler.client import track


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10**9)
    parser.add_argument("--finish-file", type=Path, default=None)
    parser.add_argument("--step-sleep", type=float, default=0.05)
    parser.add_argument("--total-steps", type=int, default=None)
    parser.add_argument("--watts", type=float, default=None)
    parser.add_argument("--on-exceed", default="warn")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = DistributedDataParallel(torch.nn.Linear(16, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    args.out.mkdir(parents=True, exist_ok=True)
    marks = args.out / f"rank{rank}.checkpoints"

    job = track(name="ddp-test", total_steps=args.total_steps, watts=args.watts,
                on_exceed=args.on_exceed, report_interval_s=0.5,
                checkpoint=lambda: marks.open("a").write(f"{job.steps}\n"))
    with job:
        finish = torch.tensor([args.steps])
        while job.steps < int(finish.item()):
            with job.step(tokens=(rank + 1) * 100, samples=rank + 1):
                loss = model(torch.randn(8, 16)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                time.sleep(args.step_sleep)
            if args.finish_file is not None:
                wanted = args.steps
                if rank == 0 and args.finish_file.exists():
                    wanted = int(args.finish_file.read_text().strip() or args.steps)
                finish = torch.tensor([wanted])
                dist.broadcast(finish, src=0)
    (args.out / f"rank{rank}.done").write_text(f"{job.steps}\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
