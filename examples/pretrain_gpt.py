"""Pretrain a small GPT from scratch on the Python standard library's own sources, under powertrain.

A byte-level decoder (vocabulary 256, so there is no tokenizer to fit): token and position
embeddings, pre-LN transformer blocks with causal self-attention, a tied output head, AdamW with
warm-up and cosine decay. The corpus is the ``.py`` files of the running interpreter's standard
library, so nothing is downloaded. CUDA with bf16 autocast when available, else the CPU.

The training loop reports to the powertrain daemon through ``scheduler.client`` (``--no-powertrain``
runs without it): each optimizer step is one client step of ``batch_size * seq_len`` tokens; the
daemon's micro-batch directive changes the gradient-accumulation split (the global batch stays);
a pause or stop saves ``--checkpoint`` first.

    python examples/pretrain_gpt.py                      # ~1M parameters, a few hundred steps
    python examples/pretrain_gpt.py --checkpoint ckpt.pt --resume --max-seconds 60

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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per forward/backward (default: the global batch); "
                             "the daemon's micro-batch directive overrides it")
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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    corpus = load_corpus(int(args.data_mb * 1e6))
    split = int(len(corpus) * 0.95)
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).to(device)
    train, val = data[:split], data[split:]

    model = GPT(args.layers, args.dim, args.heads, args.seq_len).to(device)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=cuda,
    )
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = args.batch_size * args.seq_len
    start_step = 0
    if args.resume and args.checkpoint.exists():
        state = torch.load(args.checkpoint, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        print(f"resumed from {args.checkpoint} at step {start_step}")
    print(f"model: {n_params / 1e6:.2f}M parameters, {args.layers} layers, dim {args.dim}; "
          f"corpus {len(corpus) / 1e6:.1f} MB of stdlib sources; device {device}; "
          f"batch {args.batch_size} x {args.seq_len} tokens", flush=True)

    done = {"step": start_step}  # completed steps, what a checkpoint records

    def save_checkpoint() -> None:
        if args.checkpoint is None:
            return
        tmp = args.checkpoint.with_name(args.checkpoint.name + ".tmp")
        # plain values only, so torch.load(weights_only=True) reads it back
        plain_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": done["step"], "args": plain_args}, tmp)
        os.replace(tmp, args.checkpoint)  # a crash never leaves half a checkpoint
        print(f"checkpoint: step {done['step']} saved to {args.checkpoint}", flush=True)

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                else contextlib.nullcontext())
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
            total_tokens=args.steps * tokens_per_step,
            checkpoint=save_checkpoint if args.checkpoint is not None else None,
            enabled=not args.no_powertrain,
            initial_steps=start_step,
            initial_samples=start_step * args.batch_size,
            initial_tokens=start_step * tokens_per_step,
        ) as job:
            for step in range(start_step, args.steps):
                elapsed_s = time.perf_counter() - t_start
                if args.max_seconds is not None and elapsed_s > args.max_seconds:
                    print(f"--max-seconds {args.max_seconds:g} reached at step {step}")
                    break
                with job.step(tokens=tokens_per_step, samples=args.batch_size):
                    micro = min(job.micro_batch or args.micro_batch or args.batch_size,
                                args.batch_size)
                    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
                    x, y = get_batch(train, args.batch_size, args.seq_len, generator)
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum = torch.zeros((), device=device)
                    for i in range(0, args.batch_size, micro):
                        xb, yb = x[i:i + micro], y[i:i + micro]
                        with autocast:
                            logits = model(xb)
                        loss = F.cross_entropy(logits.float().view(-1, VOCAB), yb.reshape(-1))
                        # weight by the chunk's share, so any split gives the same gradient
                        weighted = loss * (xb.shape[0] / args.batch_size)
                        weighted.backward()
                        loss_sum += weighted.detach()
                    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    last_loss = loss_sum.item()
                    done["step"] = step + 1
                if first_loss is None:
                    first_loss = last_loss
                window_losses.append(last_loss)
                tokens_window += tokens_per_step
                if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                    now = time.perf_counter()
                    logged_loss = sum(window_losses) / len(window_losses)
                    print(f"step {step + 1}/{args.steps}  loss {logged_loss:.3f}"
                          f"  tokens/s {tokens_window / (now - t_window):,.0f}"
                          f"  micro_batch {micro}", flush=True)
                    window_losses, t_window, tokens_window = [], now, 0
    except JobStopped as stopped:
        print(f"stopped by powertrain after step {done['step']}: {stopped.code}", flush=True)
        raise
    seconds = time.perf_counter() - t_start
    save_checkpoint()

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
    tokens = steps_run * tokens_per_step
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
