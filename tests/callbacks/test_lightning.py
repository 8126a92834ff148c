"""The Lightning callback: a tiny language model trained on the CPU by a real Lightning
``Trainer``, reporting to a real daemon on simulated GPUs: what it reports is what the Trainer
trained (under gradient accumulation, and in a 2-rank DDP run whose ranks Lightning starts), and
the daemon's pause, checkpoint and cancel go through ``Trainer.save_checkpoint`` and
``Trainer.should_stop``.

lightning is imported by the test that trains in this process, not at collection: every
pytest-xdist worker collects every module, and the import costs seconds of CPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.callbacks.conftest import (
    STEP_S,
    Node,
    Training,
    check_ddp_run,
    finish,
    ranks,
)
from tests.jobs.tiny_lm import ACCUMULATE, BATCH, SEQ_LEN

pytestmark = pytest.mark.slow


def checkpoints(folder: Path) -> list[int]:
    """The steps of the checkpoints the callback wrote in ``folder``."""
    return sorted(int(p.stem.removeprefix("powertrain-step="))
                  for p in folder.glob("powertrain-step=*.ckpt"))


@pytest.mark.distributed
def test_a_two_rank_ddp_run_started_by_lightning_is_one_job_with_what_every_rank_trained(
    node: Node, tmp_path: Path
) -> None:
    """``strategy="ddp"`` from a plain ``python`` command: Lightning starts rank 1 itself, and
    no launcher names the run; the callback does, and both ranks join one job."""
    out = tmp_path / "out"
    proc = ranks("-m", "tests.jobs.lightning_train", "--out", str(out), "--devices", "2",
                 "--epochs", "2", "--tokens", "non_padding",
                 env={"POWERTRAIN_SOCKET": str(node.socket), "CUDA_VISIBLE_DEVICES": "0,1"})
    finish(proc)
    check_ddp_run(node, "lightning-ddp", "run:lightning@", out)


def test_directives_go_through_lightnings_checkpoints_and_a_fit_that_raises_fails(
    node: Node, tmp_path: Path
) -> None:
    """An energy budget pauses the run after a Lightning checkpoint; after resume a checkpoint
    request saves at the step the daemon named; a cancel saves, sets ``should_stop``, and
    ``fit`` returns. Steps, tokens and samples are the Trainer's. The same callback then starts
    a second job for a second ``fit``, which raises: Lightning calls ``on_exception``, and the
    job ends ``failed`` with the steps done before. (One test: Lightning's import costs seconds
    of CPU in each worker that trains in its own process.)"""
    from lightning.pytorch import Callback

    from scheduler.callbacks.lightning import PowertrainCallback
    from tests.jobs.lightning_train import TinyLM, loader, trainer

    class Slow(Callback):
        """Each batch a little longer: time for the daemon to act, with little CPU."""

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(STEP_S / ACCUMULATE)

    folder = tmp_path / "checkpoints"
    callback = PowertrainCallback(name="lightning-directives", socket_path=node.socket,
                                  gpu_ids=[0], energy_wh=0.001, on_exceed="pause",
                                  report_interval_s=0.2)
    run = trainer(tmp_path, [callback, Slow()], max_steps=100_000)
    training = Training(lambda: run.fit(TinyLM(), loader(16)))
    with training.cancelled_if_failing(node, "lightning-directives"):
        node.wait(lambda: len(checkpoints(folder)) == 1, "the pause's checkpoint")
        (paused_at,) = checkpoints(folder)
        node.wait(lambda: node.job("lightning-directives")["steps"] == paused_at,
                  "the paused step")
        job_id = node.job("lightning-directives")["id"]
        time.sleep(1.0)
        view = node.job("lightning-directives")
        assert view["state"] == "paused" and view["steps"] == paused_at
        assert run.global_step == paused_at

        assert node.act(job_id, "resume")["state"] == "running"
        node.wait(lambda: node.job("lightning-directives")["steps"] > paused_at,
                  "the run to go on")
        step = node.act(job_id, "checkpoint")["hold_step"]
        node.wait(lambda: checkpoints(folder) == [paused_at, step], "the requested checkpoint")
        node.wait(lambda: node.job("lightning-directives")["steps"] > step, "the run to go on")

        node.act(job_id, "cancel")
        training.join()
    assert callback.stopped and run.should_stop
    stopped_at = run.global_step
    assert checkpoints(folder) == [paused_at, step, stopped_at]
    assert callback.last_checkpoint == folder / f"powertrain-step={stopped_at}.ckpt"
    saved = torch.load(callback.last_checkpoint, weights_only=False)
    assert saved["global_step"] == stopped_at, "a full Lightning checkpoint, to resume from"
    node.wait(lambda: node.job("lightning-directives")["state"] == "cancelled", "the job to end")
    view = node.job("lightning-directives")
    assert view["steps"] == stopped_at and view["members"][0]["state"] == "stopped"
    assert view["samples"] == stopped_at * BATCH * ACCUMULATE
    assert view["tokens"] == stopped_at * BATCH * ACCUMULATE * SEQ_LEN  # tokens="all"

    class Failing(TinyLM):
        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            if self.global_step == 3:
                raise RuntimeError("the loss is NaN")
            return super().training_step(batch, batch_idx)

    second = trainer(tmp_path / "second", [callback], max_steps=100)
    Training(lambda: second.fit(Failing(), loader(16))).join(raises=RuntimeError)
    assert callback.job is None and not callback.stopped
    node.wait(lambda: node.job("lightning-directives", count=2)["state"] == "failed",
              "the second job to fail")
    view = node.job("lightning-directives", count=2)
    assert view["steps"] == 3 and view["members"][0]["state"] == "failed"
    assert view["tokens"] == 3 * BATCH * ACCUMULATE * SEQ_LEN
