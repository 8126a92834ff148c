"""A tiny Hugging Face ``Trainer`` run for the framework-callback tests: a 2-layer GPT-2 built from
its config (nothing downloaded) trained on ``tests/jobs/tiny_lm.py``'s data on the CPU, with
powertrain's callback. Under torchrun it is DDP over gloo.

Run from the repository's root as ``python -m tests.jobs.hf_train`` (or ``torchrun ... -m``);
each rank writes what its Trainer did to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from scheduler.callbacks.hf import PowertrainCallback
from tests.jobs.tiny_lm import ACCUMULATE, BATCH, SEQ_LEN, VOCAB, TinyLMData


def tiny_gpt2() -> GPT2LMHeadModel:
    """Two layers of width 16: a real GPT-2, a few milliseconds a step on the CPU."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


def training_args(out: Path, **overrides: Any) -> TrainingArguments:
    """CPU, no logging, no saving but what the daemon asks for, gradient accumulation 2."""
    options: dict[str, Any] = {
        "per_device_train_batch_size": BATCH, "gradient_accumulation_steps": ACCUMULATE,
        "use_cpu": True, "report_to": [], "save_strategy": "no", "logging_strategy": "no",
        "disable_tqdm": True, "dataloader_num_workers": 0, "learning_rate": 1e-3,
        "ddp_find_unused_parameters": False,
    }
    return TrainingArguments(output_dir=str(out), **(options | overrides))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--tokens", default="all", choices=("all", "non_padding"))
    args = parser.parse_args()

    callback = PowertrainCallback(name="hf-ddp", tokens=args.tokens, report_interval_s=0.5)
    trainer = Trainer(model=tiny_gpt2(), args=training_args(args.out, num_train_epochs=args.epochs),
                      train_dataset=TinyLMData(args.samples), callbacks=[callback])
    trainer.train()
    done = {"global_step": trainer.state.global_step, "stopped": callback.stopped,
            "world_size": trainer.args.world_size}
    (args.out / f"rank{trainer.args.process_index}.json").write_text(json.dumps(done))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
