"""Energy from counter deltas: resets, gaps, GPUs without a counter."""

from __future__ import annotations

import pytest

from energy.counters import (
    EnergySample,
    combine_methods,
    integrate,
    interval_energy,
    intervals,
)


def test_counter_delta_is_the_energy() -> None:
    # power readings are deliberately inconsistent with the counter: the counter wins
    samples = [EnergySample(0.0, 1_000, 1.0), EnergySample(0.1, 1_070, 1.0), (0.2, 1_135, 1.0)]
    result = integrate(samples)
    assert result.energy_mj == 135.0
    assert result.method == "counter"
    assert result.n_samples == 3
    assert result.duration_s == pytest.approx(0.2)
    assert result.counter_resets == 0 and result.gaps == 0 and result.unknown_s == 0.0


def test_no_counter_integrates_power_by_trapezoid() -> None:
    # 100 W then 300 W over 2 s, then 300 W for 1 s: 400 J + 300 J
    samples = [(0.0, None, 100_000.0), (2.0, None, 300_000.0), (3.0, None, 300_000.0)]
    result = integrate(samples)
    assert result.energy_mj == pytest.approx(700_000.0)
    assert result.energy_j == pytest.approx(700.0)
    assert result.method == "trapezoid"


def test_counter_reset_uses_trapezoid_for_that_interval_only() -> None:
    samples = [
        (0.0, 5_000, 200_000.0),
        (1.0, 205_000, 200_000.0),  # counter: 200 J
        (2.0, 10, 400_000.0),  # reset (driver reload): trapezoid 300 J
        (3.0, 250_010, 100_000.0),  # counter again: 250 J
    ]
    result = integrate(samples)
    assert result.energy_mj == pytest.approx(200_000 + 300_000 + 250_000)
    assert result.method == "mixed"
    assert result.counter_resets == 1
    parts = intervals(samples)
    assert [p.method for p in parts] == ["counter", "trapezoid", "counter"]
    assert parts[1].counter_reset


def test_long_gap_with_continuous_counter_is_exact_and_not_flagged() -> None:
    samples = [(0.0, 0, 100_000.0), (600.0, 30_000_000, 100_000.0)]
    result = integrate(samples, max_gap_s=5.0)
    assert result.energy_mj == 30_000_000.0
    assert result.method == "counter"
    assert result.gaps == 0


def test_long_gap_without_counter_is_flagged() -> None:
    samples = [(0.0, None, 100_000.0), (1.0, None, 100_000.0), (31.0, None, 100_000.0)]
    result = integrate(samples, max_gap_s=5.0)
    assert result.energy_mj == pytest.approx(3_100_000.0)
    assert result.gaps == 1
    assert [p.gap for p in intervals(samples, max_gap_s=5.0)] == [False, True]


def test_mixed_counter_and_no_counter() -> None:
    # the counter drops out for one reading (read degraded to None)
    samples = [(0.0, 0, 100_000.0), (1.0, None, 100_000.0), (2.0, 200_000, 100_000.0)]
    result = integrate(samples)
    assert result.energy_mj == pytest.approx(200_000.0)
    assert result.method == "trapezoid"


def test_missing_power_on_one_end_holds_the_other() -> None:
    part = interval_energy((0.0, None, None), (2.0, None, 50_000.0))
    assert part.energy_mj == pytest.approx(100_000.0)
    assert part.method == "trapezoid"


def test_a_control_tick_is_its_counter_delta_else_its_end_power() -> None:
    """How the budget loop adds up a job's energy each tick: the start carries the GPU's last
    counter reading and no power, the end this tick's counter and its 1 s average power."""
    # The counter's delta, however long since its last reading (a missed read in between).
    assert interval_energy((0.0, 5_000, None), (3.0, 605_000, 200_000.0)).energy_mj == 600_000.0
    # A counter reset (driver reload): the tick's power, held over the tick.
    reset = interval_energy((0.0, 900_000, None), (1.0, 10, 250_000.0))
    assert (reset.energy_mj, reset.method, reset.counter_reset) == (250_000.0, "trapezoid", True)
    # No counter on the GPU, or none read before: the tick's power too.
    assert interval_energy((0.0, None, None), (0.5, None, 100_000.0)).energy_mj == 50_000.0
    assert interval_energy((0.0, None, None), (0.5, 7, 100_000.0)).energy_mj == 50_000.0


def test_nothing_known_counts_as_unknown_time() -> None:
    samples = [(0.0, None, None), (4.0, None, None), (5.0, None, 1_000.0), (6.0, None, 1_000.0)]
    result = integrate(samples)
    assert result.unknown_s == pytest.approx(4.0)
    assert result.energy_mj == pytest.approx(1_000.0 + 1_000.0)


def test_reset_without_power_is_unknown() -> None:
    part = interval_energy((0.0, 900, None), (1.0, 10, None))
    assert part.energy_mj is None and part.method is None and part.counter_reset


@pytest.mark.parametrize("samples", [[], [(0.0, 10, 1_000.0)]])
def test_fewer_than_two_samples_have_no_energy(
    samples: list[tuple[float, int | None, float | None]],
) -> None:
    result = integrate(samples)
    assert result.energy_mj == 0.0
    assert result.method == "none"
    assert result.duration_s == 0.0
    assert result.n_samples == len(samples)


def test_out_of_order_samples_are_rejected() -> None:
    with pytest.raises(ValueError, match="time order"):
        integrate([(1.0, 10, None), (0.5, 20, None)])


def test_equal_timestamps_are_allowed() -> None:
    assert integrate([(1.0, 10, 5.0), (1.0, 10, 5.0)]).energy_mj == 0.0


def test_combine_methods() -> None:
    assert combine_methods([]) == "none"
    assert combine_methods([None]) == "none"
    assert combine_methods(["counter", None]) == "counter"
    assert combine_methods(["trapezoid", "trapezoid"]) == "trapezoid"
    assert combine_methods(["counter", "trapezoid"]) == "mixed"
    # totals of totals (rollups, segments, several GPUs) use the same rule
    assert combine_methods(["none", "counter"]) == "counter"
    assert combine_methods(["none", None]) == "none"
    assert combine_methods(["mixed"]) == "mixed"
    assert combine_methods(["mixed", "counter"]) == "mixed"
