"""The energy optimiser's part of the report, from a stored search: finished, or cut short by
the job's end (``EnergyOptimizer.so_far``)."""

from __future__ import annotations

from datetime import UTC, datetime

from energy.optimizer import UNFINISHED
from reports.jobrows import ProbeRow, SearchRow
from reports.optimizer import summarise_search, summary_lines


def _search(reason: str) -> SearchRow:
    return SearchRow(
        job_id=7, number=1, at=datetime(2026, 1, 1, tzinfo=UTC), objective="energy",
        knob="power_limit", setting=300_000, top_setting=700_000, feasible=True, reason=reason,
        revisions=0, profiling_steps=120, profiling_time_s=60.0, profiling_energy_j=20_000.0,
        probes=(ProbeRow(700_000, 40, 4.0, 2_600.0), ProbeRow(300_000, 40, 6.0, 1_800.0)),
    )


def test_a_search_the_job_ended_in_shows_its_best_so_far_as_such() -> None:
    cut = summarise_search(_search(f"{UNFINISHED}; the best of 2 settings probed so far"), 100.0)
    assert not cut.finished and cut.to_json()["finished"] is False
    head, figures = summary_lines([cut])
    assert head == ("Job 7, energy optimiser (energy): power limit 300 W (best so far: the job "
                    "ended before the search did), from 2 settings probed in 60 s.")
    assert figures.startswith("  300 W: 0.45 J/token at 667 tokens/s; default 700 W:")


def test_a_finished_search_says_nothing_of_the_kind() -> None:
    done = summarise_search(_search("walked down to the minimum"), None)
    assert done.finished and done.to_json()["finished"] is True
    assert "best so far" not in summary_lines([done])[0]
