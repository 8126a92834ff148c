"""What the framework callbacks share, without a framework or a daemon: how a batch's tokens and
samples are counted, and the options a callback refuses."""

from __future__ import annotations

import logging

import pytest
import torch

from scheduler.callbacks import BatchCounter, TrackedRun


def padded(lengths: list[int], width: int = 6) -> dict[str, torch.Tensor]:
    mask = torch.stack([(torch.arange(width) < n).long() for n in lengths])
    return {"input_ids": torch.ones_like(mask), "attention_mask": mask}


def test_micro_batches_add_up_until_the_step_is_taken() -> None:
    counter = BatchCounter()
    counter.add(padded([6, 2]))
    counter.add(padded([3, 3, 1]))
    assert counter.take() == (5 * 6, 5)  # all tokens, padding included
    assert counter.take() == (0, 0), "counting starts over"


def test_non_padding_tokens_are_the_attention_masks_sum() -> None:
    counter = BatchCounter("non_padding")
    counter.add(padded([6, 2]))
    counter.add(padded([3, 3, 1]))
    counter.add({"input_ids": torch.ones(2, 4, dtype=torch.long)})  # no mask: all count
    assert counter.take() == (6 + 2 + 3 + 3 + 1 + 8, 7)


def test_tensor_tuple_and_other_keys_batches() -> None:
    counter = BatchCounter(input_keys=("tokens", "input_ids"))
    counter.add(torch.zeros(4, 16, dtype=torch.long))  # a tensor is its own main input
    counter.add((torch.zeros(2, 16), torch.zeros(2)))  # (inputs, targets)
    counter.add([{"tokens": torch.zeros(3, 5)}])
    assert counter.take() == (64 + 32 + 15, 4 + 2 + 3)


def test_functions_count_what_the_defaults_cannot(caplog: pytest.LogCaptureFixture) -> None:
    counter = BatchCounter(lambda b: b["n"] * 10, lambda b: b["n"])
    with caplog.at_level(logging.WARNING):
        counter.add({"n": 3})
    assert counter.take() == (30, 3) and not caplog.records

    blind = BatchCounter()
    with caplog.at_level(logging.WARNING):
        blind.add({"pixels": torch.zeros(2, 3)})
        blind.add({"pixels": torch.zeros(2, 3)})
    assert blind.take() == (0, 0)
    (warning,) = caplog.records  # once, not every batch
    assert "found no input_ids in a batch of type dict" in warning.getMessage()


def test_refused_options() -> None:
    with pytest.raises(ValueError, match="tokens must be one of"):
        BatchCounter("padding")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_keys"):
        BatchCounter(input_keys=())
    with pytest.raises(TypeError, match="checkpoints through its framework"):
        TrackedRun({"checkpoint": print})


def test_a_run_that_was_never_started_reports_and_closes_as_a_no_op() -> None:
    run = TrackedRun({"enabled": False})
    assert run.report(10, 1, 0.1) is False and run.job is None
    run.close()


def test_a_run_starts_a_job_with_the_frameworks_steps_unless_told_otherwise() -> None:
    run = TrackedRun({"enabled": False, "total_steps": 90})  # counts, contacts no daemon
    saved: list[int] = []
    job = run.start(lambda: saved.append(1), total_steps=50, initial_steps=20)
    assert (job.total_steps, job.steps) == (90, 20), "the option wins, the resumed steps count"
    assert run.report(64, 4, 0.01) is False
    assert (job.steps, job.tokens, job.samples) == (21, 64, 4)
    run.close()
    assert run.job is None
    assert run.report(64, 4, 0.01) is False, "a closed run reports nothing"
