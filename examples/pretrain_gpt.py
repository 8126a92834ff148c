"""Pretrain a small GPT from scratch on the Python standard library's own sources, under powertrain.

A byte-level decoder (vocabulary 256, so there is no tokenizer to fit): token and position
embeddings, pre-LN transformer blocks with causal self-attention, a tied output head, AdamW with
warm-up and cosine decay. The corpus is the ``.py`` files of the running interpreter's standard
library, so nothing is downloaded. CUDA with bf16 autocast when available, else the CPU.

The training loop reports to the powertrain daemon through ``scheduler.client`` (``--no-powertrain``
runs without it): each optimizer step is one client step of ``batch_size * seq_len`` tokens; the
daemon's micro-batch directive changes the gradient-accumulation split (the global batch stays);
a pause or stop saves ``--checkpoint`` first. The loop declares the micro-batches it can train in
(the divisors of its batch; its own is ``--micro-batch``), so the energy optimiser
(``--objective``) searches the micro-batch with the power limit; an out-of-memory at one withdraws
it and every larger one, and the step is run again at the largest that is left.

    python examples/pretrain_gpt.py                      # ~1M parameters, a few hundred steps
    python examples/pretrain_gpt.py --checkpoint ckpt.pt --resume --max-seconds 60
    torchrun --standalone --nproc_per_node 4 examples/pretrain_gpt.py --batch-size 64

Under torchrun (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel: NCCL on
``cuda:LOCAL_RANK``, else gloo on the CPU. ``--batch-size`` stays the global batch, so each rank
takes ``batch_size // world_size`` sequences per step (it must divide) from its own shard of the
corpus, and the micro-batch (flag or directive) splits that per-rank batch. Every rank reports
its own tokens and samples to powertrain; the daemon sums them into one job. Only rank 0 prints
and writes the checkpoint; every rank reads it on ``--resume``. See docs/distributed.md.

Prints the loss and tokens/s every ``--log-every`` steps and ends with one ``done:`` line of
``key=value`` fields: steps, tokens, seconds, tokens_per_s, first_loss, loss, val_loss.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import sysconfig
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scheduler.client import JobStopped, track

VOCAB = 256


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention, then a GELU MLP, each on a residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim, bias=False)
        self.out = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(dim, dim=2)
        shape = (batch, seq, self.heads, dim // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, seq, dim))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Byte-level GPT with a tied output head."""

    def __init__(self, layers: int, dim: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        for name, param in self.named_parameters():
            if param.dim() == 2:
                # GPT-2 init: residual projections shrink with depth so the stream stays O(1)
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) \
                    else 0.02
                nn.init.normal_(param, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.T  # tied head


def load_corpus(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the standard library's ``.py`` sources, in a fixed file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        # installed packages are not the standard library (and can be large)
        subfolders[:] = sorted(d for d in subfolders
                               if d not in {"site-packages", "dist-packages", "__pycache__"})
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    files.sort()
    random.Random(0).shuffle(files)  # a spread of modules, the same on every run
    chunks: list[bytes] = []
    size = 0
    for path in files:
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            chunks.append(data)
            size += len(data)
        if size >= max_bytes:
            break
    if size < 10_000:
        raise SystemExit(f"error: found only {size} bytes of Python sources under {root}")
    return b"\n".join(chunks)[:max_bytes]


def get_batch(data: torch.Tensor, batch: int, seq_len: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``seq_len + 1`` bytes: inputs and next-byte targets."""
    starts = torch.randint(len(data) - seq_len - 1, (batch, 1), generator=generator)
    windows = data[(starts + torch.arange(seq_len + 1)).to(data.device)].long()
    return windows[:, :-1], windows[:, 1:]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch; the defaults are a single process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """Whether this is one rank of several (DDP on)."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Whether this rank prints, evaluates and writes the checkpoint."""
        return self.rank == 0


def dist_from_env(env: Mapping[str, str]) -> Dist:
    """The rank, local rank and world size torchrun sets; a single process without them."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    if not all(env.get(name, "").strip() for name in names):
        return Dist()
    try:
        rank, local_rank, world_size = (int(env[name]) for name in names)
    except ValueError:
        raise SystemExit(f"error: RANK, LOCAL_RANK and WORLD_SIZE must be integers, not "
                         f"{[env[name] for name in names]}") from None
    return Dist(rank, local_rank, world_size) if world_size > 1 else Dist()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per forward/backward (default: the global batch, or "
                             "under torchrun the rank's share of it); the daemon's micro-batch "
                             "directive overrides it")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop (and checkpoint) after this much wall time")
    parser.add_argument("--data-mb", type=float, default=8.0, help="corpus size to read, MB")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8,
                        help="held-out batches for the final val_loss (0: skip)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="model+optimizer state: saved on pause/stop and at the end")
    parser.add_argument("--resume", action="store_true", help="start from --checkpoint if present")
    parser.add_argument("--name", default="pretrain-gpt", help="job name for the daemon")
    parser.add_argument("--no-powertrain", action="store_true", help="run without the client")
    args = parser.parse_args(argv)
    if args.dim % args.heads:
        parser.error("--dim must be a multiple of --heads")
    if args.micro_batch is not None and args.micro_batch < 1:
        parser.error("--micro-batch must be positive")
    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint")
    world_size = dist_from_env(os.environ).world_size
    if args.batch_size < 1 or args.batch_size % world_size:
        parser.error(f"--batch-size {args.batch_size} is the global batch: it must be a positive "
                     f"multiple of the world size {world_size} (each rank takes an equal share)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist = dist_from_env(os.environ)
    cuda = torch.cuda.is_available()
    if not dist.enabled:
        return train(args, dist, torch.device("cuda" if cuda else "cpu"))
    # torchrun: MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE come from the environment (env://)
    if cuda:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
        torch_dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch_dist.init_process_group("gloo")
    try:
        return train(args, dist, device)
    finally:
        torch_dist.destroy_process_group()


def train(args: argparse.Namespace, dist: Dist, device: torch.device) -> int:
    """The training run on ``device``; one rank of ``dist`` (its process group is up if enabled)."""

    def say(message: str) -> None:  # rank 0 speaks for the run
        if dist.main:
            print(message, flush=True)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    cuda = device.type == "cuda"

    corpus = load_corpus(int(args.data_mb * 1e6))
    split = int(len(corpus) * 0.95)
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).to(device)
    train_data, val = data[:split], data[split:]
    # each rank draws its batches from its own contiguous shard (the whole split on one process)
    shard = len(train_data) // dist.world_size
    train_data = train_data[dist.rank * shard:(dist.rank + 1) * shard]
    if len(train_data) <= args.seq_len + 1:
        raise SystemExit(f"error: a training shard of {len(train_data)} bytes is too small for "
                         f"--seq-len {args.seq_len}; raise --data-mb")

    model = GPT(args.layers, args.dim, args.heads, args.seq_len).to(device)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=cuda,
    )
    n_params = sum(p.numel() for p in model.parameters())
    local_batch = args.batch_size // dist.world_size  # sequences this rank takes per step
    tokens_per_step = args.batch_size * args.seq_len  # the global batch, all ranks
    local_tokens = local_batch * args.seq_len  # what this rank processes (and reports) per step
    start_step = 0
    if args.resume and args.checkpoint.exists():  # every rank reads the same checkpoint
        state = torch.load(args.checkpoint, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        say(f"resumed from {args.checkpoint} at step {start_step}")
    # the micro-batches this rank can split its batch into, and its own split
    own_micro = min(args.micro_batch or local_batch, local_batch)
    micro_batches = [m for m in range(1, local_batch + 1) if local_batch % m == 0]
    if own_micro not in micro_batches:  # an uneven split: the loop keeps it, the lever is off
        say(f"--micro-batch {own_micro} does not divide the batch of {local_batch}: the "
            "daemon will not change it")
        micro_batches = []
    # DDP averages gradients over ranks in backward; the optimizer holds the same parameters
    ddp = (DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
           if dist.enabled else None)
    net: nn.Module = model if ddp is None else ddp
    ranks = (f" ({local_batch} per rank on {dist.world_size} ranks)" if dist.enabled else "")
    say(f"model: {n_params / 1e6:.2f}M parameters, {args.layers} layers, dim {args.dim}; "
        f"corpus {len(corpus) / 1e6:.1f} MB of stdlib sources; device {device}; "
        f"batch {args.batch_size} x {args.seq_len} tokens{ranks}")

    done = {"step": start_step}  # completed steps, what a checkpoint records

    def save_checkpoint() -> None:
        # Every rank calls this at the same step (the end of training, or a pause or stop, which
        # powertrain has all ranks obey at one step boundary): rank 0 writes, the rest wait.
        if args.checkpoint is None:
            return
        if dist.main:
            tmp = args.checkpoint.with_name(args.checkpoint.name + ".tmp")
            # plain values only, so torch.load(weights_only=True) reads it back
            plain_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            # the bare model's state, so a single process can resume from a DDP checkpoint
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": done["step"], "args": plain_args}, tmp)
            os.replace(tmp, args.checkpoint)  # a crash never leaves half a checkpoint
            print(f"checkpoint: step {done['step']} saved to {args.checkpoint}", flush=True)
        if dist.enabled:
            torch_dist.barrier()  # no rank goes on (or exits) before the file is complete

    def out_of_time(elapsed_s: float) -> bool:
        # Rank 0's clock decides for all, so every rank stops at the same step.
        if args.max_seconds is None:
            return False
        stop: bool = elapsed_s > args.max_seconds
        if dist.enabled:
            flag = torch.tensor([int(stop)], device=device)
            torch_dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        return stop

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                else contextlib.nullcontext())

    def accumulate(x: torch.Tensor, y: torch.Tensor, micro: int) -> torch.Tensor:
        """The step's gradients over micro-batches of ``micro`` sequences; returns its loss."""
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for i in range(0, local_batch, micro):
            xb, yb = x[i:i + micro], y[i:i + micro]
            # DDP all-reduces gradients once, on the step's last micro-batch
            last_micro = i + micro >= local_batch
            sync = (ddp.no_sync() if ddp is not None and not last_micro
                    else contextlib.nullcontext())
            with sync:
                with autocast:
                    logits = net(xb)
                loss = F.cross_entropy(logits.float().view(-1, VOCAB), yb.reshape(-1))
                # weight by the chunk's share, so any split gives the same gradient
                weighted = loss * (xb.shape[0] / local_batch)
                weighted.backward()
            loss_sum += weighted.detach()
        return loss_sum
    first_loss: float | None = None
    window_losses: list[float] = []
    last_loss = logged_loss = float("nan")
    t_start = time.perf_counter()
    t_window, tokens_window = t_start, 0
    model.train()
    try:
        with track(
            name=args.name,
            total_steps=args.steps,
            total_tokens=args.steps * tokens_per_step,  # the job's plan: all ranks together
            checkpoint=save_checkpoint if args.checkpoint is not None else None,
            enabled=not args.no_powertrain,
            initial_steps=start_step,
            initial_samples=start_step * local_batch,  # this rank's own totals so far
            initial_tokens=start_step * local_tokens,
            micro_batches=micro_batches or None,
            micro_batch=own_micro if micro_batches else None,
        ) as job:
            # every rank runs the same steps: same start (one checkpoint), same end, same clock
            for step in range(start_step, args.steps):
                if out_of_time(time.perf_counter() - t_start):
                    say(f"--max-seconds {args.max_seconds:g} reached at step {step}")
                    break
                with job.step(tokens=local_tokens, samples=local_batch):
                    # a micro-batch splits this rank's share; ranks may split differently (the
                    # gradients are all-reduced once a step whatever the split)
                    micro = min(job.micro_batch or own_micro, local_batch)
                    seed = (args.seed * 1_000_003 + step) * dist.world_size + dist.rank
                    generator = torch.Generator().manual_seed(seed)
                    x, y = get_batch(train_data, local_batch, args.seq_len, generator)
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
                    while True:
                        try:
                            loss_sum = accumulate(x, y, micro)
                            break
                        except torch.OutOfMemoryError:
                            if not micro_batches:
                                raise
                            micro = job.out_of_memory()  # the step again, smaller
                            if cuda:
                                torch.cuda.empty_cache()
                    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    if dist.enabled:  # the global batch's loss, for the log
                        torch_dist.all_reduce(loss_sum)
                        loss_sum /= dist.world_size
                    last_loss = loss_sum.item()
                    done["step"] = step + 1
                if first_loss is None:
                    first_loss = last_loss
                window_losses.append(last_loss)
                tokens_window += tokens_per_step
                if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                    now = time.perf_counter()
                    logged_loss = sum(window_losses) / len(window_losses)
                    say(f"step {step + 1}/{args.steps}  loss {logged_loss:.3f}"
                        f"  tokens/s {tokens_window / (now - t_window):,.0f}"
                        f"  micro_batch {micro}")
                    window_losses, t_window, tokens_window = [], now, 0
    except JobStopped as stopped:
        say(f"stopped by powertrain after step {done['step']}: {stopped.code}")
        raise
    seconds = time.perf_counter() - t_start
    save_checkpoint()
    if not dist.main:
        return 0

    val_loss = float("nan")
    if args.eval_batches > 0:
        model.eval()
        generator = torch.Generator().manual_seed(12345)
        with torch.no_grad(), autocast:
            losses = []
            for _ in range(args.eval_batches):
                x, y = get_batch(val, args.batch_size, args.seq_len, generator)
                losses.append(F.cross_entropy(model(x).float().view(-1, VOCAB),
                                              y.reshape(-1)).item())
        val_loss = sum(losses) / len(losses)
    steps_run = done["step"] - start_step
    tokens = steps_run * tokens_per_step  # global: all ranks
    # the last window's mean is a steadier "final loss" than one noisy step
    final_loss = (sum(window_losses) / len(window_losses) if window_losses
                  else logged_loss if not math.isnan(logged_loss) else last_loss)
    print(f"done: steps={steps_run} tokens={tokens} seconds={seconds:.2f} "
          f"tokens_per_s={tokens / seconds if seconds > 0 else 0.0:.0f} "
          f"first_loss={first_loss if first_loss is not None else float('nan'):.4f} "
          f"loss={final_loss:.4f} val_loss={val_loss:.4f}", flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
