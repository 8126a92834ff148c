"""The micro-batch lever through the real job service, in virtual time on two simulated H100s.

Two copies of a training job whose loop declares the micro-batches it can train in (1 to 8 at a
global batch of 8, its own 2: a conservative split with much gradient accumulation) run side by
side, one GPU each: one at the default, one submitted with ``--objective energy``. The service
hands the second to the joint search (``scheduler.optimising``): the micro-batch goes to the loop
as a directive, and the simulated GPU's micro-batch term (``energy.gpu_model``) changes its
power and step time. The report must show that the search moved both levers, and the job used
less energy per token over its whole run, search included, than the same job at the default.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.simjob import JobSpec, ObjectiveName, SimNode
from scheduler.jobs import JobState
from tests.test_optimizer_sim import run_report

JOB_S = 400.0
MICRO_BATCHES = (1, 2, 4, 8)
OWN = 2


def test_objective_energy_moves_the_micro_batch_and_the_power_limit(tmp_path: Path) -> None:
    node = SimNode(gpus=2, home=tmp_path)
    objectives: dict[str, ObjectiveName | None] = {"default": None, "energy": "energy"}
    jobs = {
        name: node.add_job(JobSpec(name, gpus=1, submit=True, objective=objective,
                                   total_steps=1_000_000, max_s=JOB_S,
                                   micro_batches=MICRO_BATCHES, micro_batch=OWN))
        for name, objective in objectives.items()
    }
    node.run(JOB_S + 5.0)
    assert all(j.record is not None and j.record.state == JobState.COMPLETED
               for j in jobs.values())
    rows = {row["key"]: row for row in json.loads(run_report(tmp_path, "--json"))}
    default, energy = rows[str(jobs["default"].id)], rows[str(jobs["energy"].id)]
    (search,) = energy["optimizer"]
    assert (search["micro_batch"], search["default_micro_batch"]) != (None, None), search
    assert search["default_micro_batch"] == OWN
    assert search["micro_batch"] > OWN, search  # larger micro-batches amortise more
    assert search["chosen"]["setting"] < search["default_setting"], search
    assert search["energy_change"] < -0.2, search
    # Over the whole job, search included, against the same job at the default.
    assert energy["j_per_token"] < 0.85 * default["j_per_token"], (energy, default)

    # The micro-batch moved as the search went, and the stored decisions say so.
    moved = [d.what for d in jobs["energy"].decisions if "micro-batch" in d.what]
    assert len(moved) >= 3, moved  # up the micro-batches, then the choice (and its checks)

    text = run_report(tmp_path, "--job", str(jobs["energy"].id))
    assert f"micro-batch {search['micro_batch']} (the job's own: {OWN})" in text, text
    assert f"default 700 W micro-batch {OWN}" in text, text
