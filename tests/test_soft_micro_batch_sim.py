"""Soft mode's micro-batch lever through the real job service, in virtual time on simulated A40s.

Without power-limit rights (``--mode soft``), under a wattage budget that binds, two copies of a
job run side by side on one GPU each; one declares the micro-batches its loop allows (2 to 16,
its own 4), the other does not. The load is the A40 speech model of the bundled traces
(``A40/librispeech/deepspeech2/bs8``, its steps shortened to half a second), whose micro-batch
term, fitted from the traces' batch sizes, has a large fixed cost per micro-batch: a larger one
takes less dynamic energy per step, so pacing at it fits more steps in the same watts. The job
that declared them must move to a larger micro-batch and end with more throughput than the other,
both within the budget; and a smaller micro-batch, tried, must be left.
"""

from __future__ import annotations

from dataclasses import replace

from bench.simjob import JobSpec, SimNode
from telemetry.backends.profiles import get_workload

BUDGET_W = 150.0
RUN_S = 400.0
SPEECH = replace(get_workload("A40/librispeech/deepspeech2/bs8"), step_time_s=0.5)


def test_soft_mode_moves_to_a_larger_micro_batch_for_more_throughput_within_the_budget(
) -> None:
    node = SimNode(gpus=2, sku="A40")
    lever = node.add_job(JobSpec("lever", gpus=(0,), mode="soft", budget_w=BUDGET_W,
                                 workload=SPEECH, micro_batches=(2, 4, 8, 16), micro_batch=4))
    plain = node.add_job(JobSpec("plain", gpus=(1,), mode="soft", budget_w=BUDGET_W,
                                 workload=SPEECH))
    node.run(RUN_S)

    moves = [d.what for d in lever.decisions if "micro-batch" in d.what]
    assert "keep micro-batch 8" in moves, moves
    assert not [d for d in plain.decisions if "micro-batch" in d.what]
    assert lever.controller is not None
    assert lever.controller.micro_batch in (8, 16), moves  # type: ignore[attr-defined]

    # The last two minutes: more steps per second at the same budget, both held to it.
    late = {job.spec.name: node.stats(job, limit_w=BUDGET_W, measure_from_s=RUN_S - 120.0)
            for job in (lever, plain)}
    assert late["lever"].steps_per_s > 1.1 * late["plain"].steps_per_s, late
    for stats in late.values():
        assert stats.mean_power_w <= BUDGET_W * 1.02, late
        assert stats.within_share >= 0.95, late
