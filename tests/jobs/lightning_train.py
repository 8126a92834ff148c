"""A tiny Lightning run for the framework-callback tests: a small real language model (embedding,
one hidden layer, output layer) trained on ``tests/jobs/tiny_lm.py``'s data on the CPU, with
powertrain's callback. With ``--devices 2`` it is DDP (gloo), its ranks started by Lightning.

Run from the repository's root as ``python -m tests.jobs.lightning_train``; each rank writes what
its Trainer did to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.nn import functional
from torch.utils.data import DataLoader

from scheduler.callbacks.lightning import PowertrainCallback
from tests.jobs.tiny_lm import ACCUMULATE, BATCH, VOCAB, TinyLMData


class TinyLM(pl.LightningModule):
    """Next-token prediction, one small hidden layer: a few milliseconds a step on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Linear(16, 16),
                                       torch.nn.GELU(), torch.nn.Linear(16, VOCAB))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["input_ids"][:, :-1])
        return functional.cross_entropy(logits.reshape(-1, VOCAB),
                                        batch["labels"][:, 1:].reshape(-1), ignore_index=-100)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def loader(samples: int = 16) -> DataLoader[Any]:
    return DataLoader(TinyLMData(samples), batch_size=BATCH, shuffle=True)


def trainer(root: Path, callbacks: list[pl.Callback], **overrides: Any) -> pl.Trainer:
    """CPU, no logger, no progress bar, no checkpoints but the daemon's, accumulation 2."""
    options: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "accumulate_grad_batches": ACCUMULATE,
        "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "default_root_dir": str(root),
    }
    return pl.Trainer(callbacks=callbacks, **(options | overrides))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--tokens", default="all", choices=("all", "non_padding"))
    args = parser.parse_args()

    callback = PowertrainCallback(name="lightning-ddp", tokens=args.tokens,
                                  report_interval_s=0.5)
    strategy = "ddp" if args.devices > 1 else "auto"
    run = trainer(args.out, [callback], devices=args.devices, strategy=strategy,
                  max_epochs=args.epochs)
    run.fit(TinyLM(), loader(args.samples))
    done = {"global_step": run.global_step, "stopped": callback.stopped,
            "world_size": run.world_size}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{run.global_rank}.json").write_text(json.dumps(done))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
