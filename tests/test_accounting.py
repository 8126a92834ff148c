"""energy.accounting and energy.cost: attribution, grouping, rates and their parsers."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import pairwise

import pytest

from energy.accounting import (
    GpuSegment,
    JobSpan,
    attribute,
    breakpoints,
    group,
    per_unit,
    period_boundaries,
    period_key,
    units_per_wh,
)
from energy.cost import (
    FlatRate,
    RateSeries,
    TimeOfUse,
    parse_series,
    parse_time_of_use,
    per_kwh,
)

DAY0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


def seg(gpu: int, a: float, b: float, j: float) -> GpuSegment:
    return GpuSegment(gpu, a, b, j, 700.0, "counter")


def test_exclusive_shared_and_idle_segments() -> None:
    spans = [JobSpan(1, 0, 10, 30), JobSpan(2, 0, 20, 40)]
    points = breakpoints(0, 50, spans)
    assert points == [0, 10, 20, 30, 40, 50]
    segments = [seg(0, a, b, 100.0) for a, b in pairwise(points)]
    shares = attribute(segments, spans)
    energy = group(shares, lambda s: s.job_id if s.job_id is not None else "idle")
    assert energy[1].energy_j == pytest.approx(100 + 50)
    assert energy[2].energy_j == pytest.approx(50 + 100)
    assert energy["idle"].energy_j == pytest.approx(200) and energy["idle"].idle_j == 200
    assert energy[1].shared_j == pytest.approx(50)
    assert sum(g.energy_j for g in energy.values()) == pytest.approx(500)


def test_weights_split_a_shared_gpu_and_fall_back_to_even() -> None:
    spans = [JobSpan(1, 0, 0, 10), JobSpan(2, 0, 0, 10)]
    segments = [seg(0, 0, 10, 90.0)]
    shares = attribute(segments, spans, lambda g, a, b, jobs: {1: 2.0, 2: 1.0})
    assert {s.job_id: s.energy_j for s in shares} == {1: 60.0, 2: 30.0}
    shares = attribute(segments, spans, lambda g, a, b, jobs: {1: 0.0, 2: float("nan")})
    assert {s.job_id: s.energy_j for s in shares} == {1: 45.0, 2: 45.0}
    assert all(s.sharing == 2 for s in shares)


def test_spans_on_other_gpus_do_not_count() -> None:
    shares = attribute([seg(1, 0, 10, 50.0)], [JobSpan(1, 0, 0, 10)])
    assert [(s.job_id, s.energy_j) for s in shares] == [(None, 50.0)]


def test_cost_and_co2_use_the_rate_in_force_per_share() -> None:
    tou = TimeOfUse((0.0, 7 * 3600.0), (0.10, 0.30))
    a, b = DAY0 + 6 * 3600, DAY0 + 8 * 3600
    points = breakpoints(a, b, [], tou.changes(a, b))
    assert points == [a, DAY0 + 7 * 3600, b]
    segments = [seg(0, points[0], points[1], 3.6e6), seg(0, points[1], points[2], 7.2e6)]
    g = group(attribute(segments, []), lambda s: "all", price=tou, co2=FlatRate(400))["all"]
    assert g.cost == pytest.approx(1 * 0.10 + 2 * 0.30)
    assert g.co2_g == pytest.approx(3 * 400)
    assert per_kwh(3.6e6, 0.25) == pytest.approx(0.25)


def test_time_of_use_wraps_at_midnight() -> None:
    tou = parse_time_of_use("start,price_per_kwh\n07:00,0.30\n22:00,0.12\n")
    assert tou.at(DAY0 + 3 * 3600) == 0.12  # before 07:00: the evening rate carries over
    assert tou.at(DAY0 + 7 * 3600) == 0.30
    assert tou.changes(DAY0, DAY0 + 86_400) == [DAY0 + 7 * 3600, DAY0 + 22 * 3600]
    with pytest.raises(ValueError, match="line 2"):
        parse_time_of_use("start,price\n25:00,0.1\n")
    with pytest.raises(ValueError, match="line 3: price per kWh 'x'"):
        parse_time_of_use("start,price\n00:00,0.1\n01:00,x\n")


def test_carbon_series_steps_and_holds_at_the_ends() -> None:
    series = parse_series("time,g_per_kwh\n2026-01-01T01:00Z,300\n2026-01-01T00:00:00Z,200\n")
    assert isinstance(series, RateSeries)
    assert series.at(DAY0 - 100) == 200 and series.at(DAY0 + 1800) == 200
    assert series.at(DAY0 + 3600) == 300 and series.at(DAY0 + 10 * 3600) == 300
    assert series.changes(DAY0, DAY0 + 7200) == [DAY0 + 3600]
    with pytest.raises(ValueError, match="not ISO 8601"):
        parse_series("time,v\nyesterday,3\n")
    with pytest.raises(ValueError, match="same time"):
        parse_series("2026-01-01T00:00Z,1\n2026-01-01T00:00Z,2\n")


def test_periods_and_per_unit_figures() -> None:
    assert period_boundaries(DAY0 - 10, DAY0 + 86_400 + 10, "day") == [DAY0, DAY0 + 86_400]
    assert period_key(DAY0 + 3700, "hour") == "2026-01-01T01:00Z"
    assert period_key(DAY0 + 3700, "day") == "2026-01-01"
    assert per_unit(100.0, 50) == 2.0 and per_unit(100.0, 0) is None
    assert units_per_wh(3600, 3600.0) == 3600.0 and units_per_wh(None, 1.0) is None
    with pytest.raises(ValueError):
        FlatRate(-1)
