"""The Hugging Face callback: a tiny GPT-2 trained on the CPU by a real ``transformers.Trainer``,
reporting to a real daemon on simulated GPUs: what it reports is what the Trainer trained (under
gradient accumulation, and in a 2-rank DDP run under torchrun), and the daemon's pause,
checkpoint and cancel go through the Trainer's own checkpoints.

transformers is imported by the test that trains in this process, not at collection: every
pytest-xdist worker collects every module, and the import costs seconds of CPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.callbacks.conftest import (
    STEP_S,
    Node,
    Training,
    check_ddp_run,
    finish,
    ranks,
)
from tests.jobs.tiny_lm import ACCUMULATE, BATCH, SEQ_LEN, TinyLMData

pytestmark = pytest.mark.slow


def checkpoints(out: Path) -> list[int]:
    """The steps of the Trainer's finished checkpoints under ``out``."""
    return sorted(int(p.parent.name.removeprefix("checkpoint-"))
                  for p in out.glob("checkpoint-*/trainer_state.json"))


@pytest.mark.distributed
def test_a_two_rank_ddp_run_under_torchrun_is_one_job_with_what_every_rank_trained(
    node: Node, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = ranks("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "--max-restarts", "0", "-m", "tests.jobs.hf_train", "--out", str(out),
                 "--epochs", "2", "--tokens", "non_padding",
                 env={"POWERTRAIN_SOCKET": str(node.socket), "CUDA_VISIBLE_DEVICES": "0,1"})
    finish(proc)
    check_ddp_run(node, "hf-ddp", "torchrun:", out)


def test_pause_checkpoint_and_cancel_go_through_the_trainers_checkpoints(
    node: Node, tmp_path: Path
) -> None:
    """An energy budget pauses the run: the Trainer's checkpoint is on disk while it waits; after
    resume a checkpoint request saves at the step the daemon named; a cancel saves and ends the
    Trainer's loop, ``train()`` returns. Steps, tokens and samples are the Trainer's."""
    from transformers import Trainer, TrainerCallback

    from scheduler.callbacks.hf import PowertrainCallback
    from tests.jobs.hf_train import tiny_gpt2, training_args

    class Slow(TrainerCallback):
        """Each step a little longer: time for the daemon to act, with little CPU."""

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(STEP_S)

    out = tmp_path / "out"
    callback = PowertrainCallback(name="hf-directives", socket_path=node.socket, gpu_ids=[0],
                                  energy_wh=0.001, on_exceed="pause", report_interval_s=0.2)
    trainer = Trainer(model=tiny_gpt2(), args=training_args(out, max_steps=100_000),
                      train_dataset=TinyLMData(16), callbacks=[callback, Slow()])
    training = Training(trainer.train)
    with training.cancelled_if_failing(node, "hf-directives"):
        node.wait(lambda: len(checkpoints(out)) == 1, "the pause's checkpoint")
        (paused_at,) = checkpoints(out)
        node.wait(lambda: node.job("hf-directives")["steps"] == paused_at, "the paused step")
        job_id = node.job("hf-directives")["id"]
        time.sleep(1.0)
        view = node.job("hf-directives")
        assert view["state"] == "paused" and view["steps"] == paused_at
        assert trainer.state.global_step == paused_at, "saved first, then waited"

        assert node.act(job_id, "resume")["state"] == "running"
        node.wait(lambda: node.job("hf-directives")["steps"] > paused_at, "the run to go on")
        step = node.act(job_id, "checkpoint")["hold_step"]
        node.wait(lambda: checkpoints(out) == [paused_at, step], "the requested checkpoint")
        node.wait(lambda: node.job("hf-directives")["steps"] > step, "the run to go on")

        node.act(job_id, "cancel")
        training.join()
    assert callback.stopped
    stopped_at = trainer.state.global_step
    assert checkpoints(out) == [paused_at, step, stopped_at]
    node.wait(lambda: node.job("hf-directives")["state"] == "cancelled", "the job to end")
    view = node.job("hf-directives")
    assert view["steps"] == stopped_at and view["members"][0]["state"] == "stopped"
    assert view["samples"] == stopped_at * BATCH * ACCUMULATE
    assert view["tokens"] == stopped_at * BATCH * ACCUMULATE * SEQ_LEN  # tokens="all"
