"""The energy optimiser through the real job service, in virtual time on two simulated H100s.

Two copies of a training job run side by side, one GPU each: one at the default setting, one
submitted with ``--objective energy`` (``SubmitRequest.objective``), which the budget loop hands to
the energy optimiser. Both run the profiles' generic ``training`` workload (a full training load:
about 655 W unconstrained, 0.5 s steps at the top clock), stretched by the slowdown the service
reads from the simulated GPU. ``powertrain report`` (run in process on the store) must show the
second using less energy per token over the whole job, its search included, and say by how much
and at what throughput. The clock is virtual and the simulator's noise seeded: nothing here
depends on how busy the machine is.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from bench.simjob import JobSpec, ObjectiveName, SimNode
from scheduler.jobs import JobState
from scheduler.report_command import report

# The search walks 11 power limits (700 W down to 200 W) and settles within about 170 s at
# 0.5 s steps; twice that leaves the job most of its time at the chosen setting.
JOB_S = 300.0

app = typer.Typer()
app.command("report")(report)


@app.command("other")
def _other() -> None:  # a second command keeps "report" a subcommand, as in the real CLI
    """Unused."""


def run_report(home: Path, *args: str) -> str:
    done = CliRunner().invoke(app, ["report", "--home", str(home), *args],
                              env={"COLUMNS": "200"})  # the summary lines unwrapped
    assert done.exit_code == 0, done.output
    return done.stdout


def test_objective_energy_lowers_energy_per_token_and_the_report_says_by_how_much(
    tmp_path: Path,
) -> None:
    node = SimNode(gpus=2, home=tmp_path)
    objectives: dict[str, ObjectiveName | None] = {"default": None, "energy": "energy"}
    jobs = {
        name: node.add_job(JobSpec(name, gpus=1, submit=True, objective=objective,
                                   total_steps=1_000_000, max_s=JOB_S))
        for name, objective in objectives.items()
    }
    node.run(JOB_S + 5.0)
    records = {name: job.record for name, job in jobs.items()}
    assert all(r is not None and r.state == JobState.COMPLETED for r in records.values()), records
    assert jobs["default"].gpus != jobs["energy"].gpus  # one GPU each

    rows = {row["key"]: row for row in json.loads(run_report(tmp_path, "--json"))}
    default, energy = rows[str(jobs["default"].id)], rows[str(jobs["energy"].id)]
    # Over the whole job, search included, against the same job at the default setting.
    assert energy["j_per_token"] < 0.9 * default["j_per_token"], (energy, default)
    assert default["optimizer"] == []
    (search,) = energy["optimizer"]
    assert (search["objective"], search["knob"]) == ("energy", "power_limit")
    assert search["default"]["setting"] == search["default_setting"] == 700_000
    assert search["probes"] >= 6
    # An H100 under a full training load draws about 655 W; the least energy per step lies near
    # 200-250 W (the simulator's model), where a step takes about twice as long.
    chosen = search["chosen"]
    assert chosen["setting"] <= 350_000, search
    assert search["energy_change"] < -0.25, search
    assert -0.7 < search["throughput_change"] < 0, search
    assert chosen["j_per_token"] < search["default"]["j_per_token"]
    assert chosen["tokens_per_s"] > 0 and chosen["power_w"] < 400

    text = run_report(tmp_path, "--job", str(jobs["energy"].id))
    shown = chosen["setting"] // 1000
    assert f"energy optimiser (energy): power limit {shown} W" in text, text
    assert "J/token at" in text and "default 700 W" in text
    assert f"energy per token {100 * search['energy_change']:+.0f} %" in text
    assert f"throughput {100 * search['throughput_change']:+.0f} %" in text
