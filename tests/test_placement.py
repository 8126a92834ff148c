"""Placement: GPU choice, the node power cap, priority order, backfill, starvation, requests."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest

from scheduler.placement import (
    GpuSlot,
    Placement,
    PlacementError,
    Waiting,
    check_request,
    choose_gpus,
    default_node_cap_w,
    job_budget_w,
    plan,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
IDLE_W = 70.0


def node(n: int = 8, busy: Iterable[int] = ()) -> list[GpuSlot]:
    """``n`` H100-like GPUs: 70 W idle, limits 200..700 W."""
    taken = set(busy)
    return [GpuSlot(i, i in taken, IDLE_W, 200.0, 700.0) for i in range(n)]


def job(
    job_id: int,
    gpus: int | tuple[int, ...],
    *,
    watts: float | None = 400.0,
    priority: int = 0,
    age_s: float = 0.0,
) -> Waiting:
    return Waiting(job_id, priority, T0 - timedelta(seconds=age_s), gpus, watts)


def ids(placements: list[Placement]) -> list[int]:
    return [p.job_id for p in placements]


# -- GPU choice ------------------------------------------------------------------------------------


def test_choose_prefers_the_smallest_contiguous_run_that_fits() -> None:
    free = {0, 1, 2, 4, 5, 7}  # runs [0,1,2] [4,5] [7]
    assert choose_gpus(job(1, 2), free) == (4, 5)
    assert choose_gpus(job(1, 1), free) == (7,)
    assert choose_gpus(job(1, 3), free) == (0, 1, 2)


def test_choose_takes_from_the_start_of_a_larger_run_and_the_lowest_run_on_ties() -> None:
    assert choose_gpus(job(1, 2), {0, 1, 2, 3}) == (0, 1)
    assert choose_gpus(job(1, 2), {1, 2, 5, 6}) == (1, 2)


def test_choose_falls_back_to_the_lowest_free_indices() -> None:
    assert choose_gpus(job(1, 3), {0, 2, 3, 6}) == (0, 2, 3)
    assert choose_gpus(job(1, 5), {0, 2, 3, 6}) is None


def test_choose_explicit_ids_must_all_be_free() -> None:
    assert choose_gpus(job(1, (3, 1)), {0, 1, 3}) == (1, 3)
    assert choose_gpus(job(1, (1, 2)), {0, 1, 3}) is None


def test_waiting_accepts_a_list_of_ids_and_reports_its_count() -> None:
    w = Waiting(1, 0, T0, [2, 0], None)  # type: ignore[arg-type]
    assert w.gpus == (2, 0) and w.gpu_ids == (2, 0) and w.gpu_count == 2
    assert job(2, 3).gpu_ids is None and job(2, 3).gpu_count == 3


def test_budget_is_watts_times_gpus_or_their_max_limits() -> None:
    gpus = node(2)
    assert job_budget_w(300.0, gpus) == 600.0
    assert job_budget_w(None, gpus) == 1400.0
    assert default_node_cap_w(node(4)) == 2800.0


# -- the node power cap ----------------------------------------------------------------------------


def test_a_job_fits_when_budgets_plus_idle_power_of_free_gpus_fit_the_cap() -> None:
    gpus = node(4)
    # 2 × 400 W + 2 idle GPUs × 70 W = 940 W
    assert ids(plan([job(1, 2)], gpus, node_cap_w=940, running_budget_w=0, now=T0)) == [1]
    assert plan([job(1, 2)], gpus, node_cap_w=939.9, running_budget_w=0, now=T0) == []


def test_the_cap_counts_running_budgets_and_jobs_placed_earlier_in_the_plan() -> None:
    gpus = node(4, busy=[0])
    # running 500 W; job 1: 400 W on one GPU; job 2: 400 W on one GPU; one GPU stays idle
    cap = 500 + 400 + 400 + IDLE_W
    waiting = [job(1, 1, priority=2), job(2, 1, priority=1), job(3, 1)]
    placed = plan(waiting, gpus, node_cap_w=cap, running_budget_w=500, now=T0)
    assert ids(placed) == [1, 2]
    # job 3 would fit the GPUs but not the power: 500 + 1200 > cap with no idle GPU left
    assert [p.gpu_indices for p in placed] == [(1,), (2,)]


def test_no_budget_means_the_gpus_max_limits() -> None:
    gpus = node(2)
    waiting = [job(1, 1, watts=None)]
    assert plan(waiting, gpus, node_cap_w=700 + IDLE_W, running_budget_w=0, now=T0) != []
    assert plan(waiting, gpus, node_cap_w=700 + IDLE_W - 1, running_budget_w=0, now=T0) == []


def test_a_job_waits_for_the_cap_then_fits_when_a_running_job_ends() -> None:
    cap = 1500.0
    waiting = [job(2, 2, watts=500.0)]
    # job 1 runs on GPUs 0-1 at 2 × 400 W; job 2 would add 1000 W: 800 + 1000 > 1500
    running = node(4, busy=[0, 1])
    assert plan(waiting, running, node_cap_w=cap, running_budget_w=800, now=T0) == []
    # job 1 ended: its GPUs are free and idle; 1000 + 2 × 70 <= 1500
    done = node(4)
    placed = plan(waiting, done, node_cap_w=cap, running_budget_w=0, now=T0 + timedelta(1))
    assert placed == [Placement(2, (0, 1))]


def test_a_job_waits_for_gpus_even_under_the_cap() -> None:
    gpus = node(4, busy=[0, 1, 2])
    assert plan([job(1, 2)], gpus, node_cap_w=1e9, running_budget_w=0, now=T0) == []
    assert plan([job(1, (2,))], gpus, node_cap_w=1e9, running_budget_w=0, now=T0) == []
    assert plan([job(1, (3,))], gpus, node_cap_w=1e9, running_budget_w=0, now=T0) == [
        Placement(1, (3,))
    ]


# -- order, backfill, starvation -------------------------------------------------------------------


def test_priority_then_submission_order() -> None:
    gpus = node(2)
    waiting = [
        job(1, 1, priority=0, age_s=50),
        job(2, 1, priority=5, age_s=1),
        job(3, 1, priority=5, age_s=10),
    ]
    placed = plan(waiting, gpus, node_cap_w=1e9, running_budget_w=0, now=T0)
    assert ids(placed) == [3, 2]  # job 1 found no GPU left


def test_backfill_a_smaller_job_starts_when_a_larger_higher_one_cannot() -> None:
    gpus = node(4, busy=[0, 1])
    waiting = [job(1, 4, priority=9, age_s=60), job(2, 1, age_s=10), job(3, 2, age_s=5)]
    placed = plan(waiting, gpus, node_cap_w=1e9, running_budget_w=800, now=T0)
    assert ids(placed) == [2]  # job 1 needs 4 GPUs; job 2 backfills; job 3 finds one GPU left
    assert placed[0].gpu_indices == (2,)


def test_backfill_under_the_power_cap() -> None:
    gpus = node(4)
    # the big job needs 4 × 600 = 2400 W; cap 2000 W: it waits, the small one starts
    waiting = [job(1, 4, watts=600.0, priority=1, age_s=100), job(2, 1, watts=300.0)]
    placed = plan(waiting, gpus, node_cap_w=2000, running_budget_w=0, now=T0)
    assert ids(placed) == [2]


def test_no_starvation_once_the_head_waited_too_long_nothing_starts_ahead_of_it() -> None:
    gpus = node(4, busy=[0, 1])
    big = job(1, 4, priority=9, age_s=601)
    small = job(2, 1)
    placed = plan([big, small], gpus, node_cap_w=1e9, running_budget_w=800, now=T0)
    assert placed == []  # GPUs 2-3 stay free for the big job until 0-1 drain
    # just under the limit, backfill is still allowed
    young = job(1, 4, priority=9, age_s=599)
    assert ids(plan([young, small], gpus, node_cap_w=1e9, running_budget_w=800, now=T0)) == [2]
    # once the running job ends, the big job starts first
    placed = plan([big, small], node(4), node_cap_w=1e9, running_budget_w=0, now=T0)
    assert placed == [Placement(1, (0, 1, 2, 3))]


def test_starvation_threshold_is_configurable_and_applies_to_the_power_cap_too() -> None:
    gpus = node(4)
    big = job(1, 4, watts=600.0, priority=1, age_s=30)
    small = job(2, 1, watts=300.0)
    cap = 2500.0
    placed = plan([big, small], gpus, node_cap_w=cap, running_budget_w=200, now=T0)
    assert ids(placed) == [2]
    placed = plan([big, small], gpus, node_cap_w=cap, running_budget_w=200, now=T0, starvation_s=20)
    assert placed == []


def test_a_starving_lower_priority_job_blocks_only_those_after_it() -> None:
    gpus = node(4, busy=[0])
    waiting = [
        job(1, 1, priority=5),  # fits, higher priority: starts
        job(2, 3, priority=3, age_s=1000),  # starving, cannot get 3 GPUs: ends the pass
        job(3, 1, priority=1),  # would fit but must not pass job 2
    ]
    placed = plan(waiting, gpus, node_cap_w=1e9, running_budget_w=0, now=T0)
    assert ids(placed) == [1]


def test_a_job_that_could_never_fit_does_not_block_the_queue() -> None:
    gpus = node(2)
    impossible = [job(1, 3, priority=9, age_s=10_000), job(2, (5,), priority=8, age_s=10_000)]
    over_cap = job(3, 2, watts=700.0, priority=7, age_s=10_000)
    placed = plan(
        [*impossible, over_cap, job(4, 1)], gpus, node_cap_w=1000, running_budget_w=0, now=T0
    )
    assert ids(placed) == [4]


def test_several_jobs_keep_free_gpus_contiguous() -> None:
    gpus = node(8, busy=[2, 5])  # free runs [0,1] [3,4] [6,7]
    waiting = [job(1, 2, age_s=3), job(2, 1, age_s=2), job(3, 2, age_s=1)]
    placed = plan(waiting, gpus, node_cap_w=1e9, running_budget_w=0, now=T0)
    assert [p.gpu_indices for p in placed] == [(0, 1), (3,), (6, 7)]


def test_empty_queue() -> None:
    assert plan([], node(2), node_cap_w=1e9, running_budget_w=0, now=T0) == []


# -- requests --------------------------------------------------------------------------------------


def test_check_request_accepts_what_could_run() -> None:
    gpus = node(4)
    check_request(4, 700.0, gpus)
    check_request(1, 200.0, gpus)
    check_request((3, 0), None, gpus)
    check_request([1], 450.5, gpus, node_cap_w=2800.0)


@pytest.mark.parametrize(
    ("request_", "watts", "message"),
    [
        (5, None, "asked for 5 GPUs; this node has 4 (allowed: 1 to 4)"),
        (0, None, "allowed: 1 to 4"),
        ((4,), None, "unknown GPU ids 4 (allowed: 0, 1, 2, 3)"),
        ((), None, "asked for no GPUs"),
        ((1, 1), None, "repeat"),
        (2, 750.0, "750 W per GPU is outside the allowed range 200 W to 700 W of GPUs 0, 1, 2, 3"),
        (1, 150.0, "outside the allowed range 200 W to 700 W"),
    ],
)
def test_check_request_refuses_with_the_allowed_range(
    request_: int | tuple[int, ...], watts: float | None, message: str
) -> None:
    with pytest.raises(PlacementError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_request(request_, watts, node(4))


def test_check_request_range_is_over_the_candidate_gpus() -> None:
    gpus = [GpuSlot(0, False, 50.0, 100.0, 300.0), GpuSlot(1, False, 70.0, 200.0, 700.0)]
    check_request((1,), 600.0, gpus)
    check_request((0,), 150.0, gpus)
    with pytest.raises(PlacementError, match="allowed range 200 W to 300 W of GPUs 0, 1"):
        check_request(1, 600.0, gpus)  # either GPU could be chosen
    with pytest.raises(PlacementError, match="allowed range 100 W to 300 W of GPUs 0"):
        check_request((0,), 600.0, gpus)
    assert issubclass(PlacementError, ValueError)


def test_check_request_against_the_node_cap() -> None:
    gpus = node(4)
    with pytest.raises(
        PlacementError, match=r"exceeds the node cap 1000 W \(allowed: at most 860 W"
    ):
        check_request(2, 500.0, gpus, node_cap_w=1000.0)
    check_request(2, 430.0, gpus, node_cap_w=1000.0)
