"""energy.units: each helper gives exactly what the inline expression it replaced gave."""

from __future__ import annotations

import random

from energy.units import (
    US_PER_S,
    g_to_kg,
    j_to_kj,
    j_to_kwh,
    j_to_mj,
    j_to_wh,
    mhz_to_hz,
    mj_to_j,
    ms_to_s,
    mw_to_w,
    pct_to_ratio,
    s_to_us,
    us_to_s,
    w_to_mw,
    wh_to_j,
)


def _values() -> list[float]:
    rng = random.Random(7)
    ints = [0, 1, 999, 1_000, 1_001, 75_000, 699_999, 2**40 + 5, 1_767_225_600_123_456]
    floats = [0.0, 0.1, 0.3, 299.9995, 612.3456789, 1e-9, 1e9]
    return [*ints, *floats, *(rng.uniform(0, 1e6) for _ in range(500))]


def test_helpers_are_bit_for_bit_the_inline_expressions() -> None:
    for x in _values():
        assert mw_to_w(x) == x / 1000 == x / 1000.0
        assert mj_to_j(x) == x / 1000
        assert j_to_kj(x) == x / 1e3
        assert g_to_kg(x) == x / 1000
        assert ms_to_s(x) == x / 1000
        assert j_to_wh(x) == x / 3600 == x / 3600.0
        assert j_to_kwh(x) == x / 3.6e6
        assert us_to_s(x) == x / 1e6
        assert w_to_mw(x) == x * 1000 == x * 1000.0
        assert j_to_mj(x) == x * 1000.0
        assert wh_to_j(x) == x * 3600
        assert s_to_us(x) == x * 1e6
        assert mhz_to_hz(x) == x * 1e6
        assert pct_to_ratio(x) == x / 100
        # callers round: round(w_to_mw(w)) is the int round(w * 1000) was
        assert round(w_to_mw(x)) == round(x * 1000)
        assert round(s_to_us(x)) == round(x * 1e6)


def test_round_trips_and_the_integer_constant() -> None:
    assert mw_to_w(w_to_mw(300.0)) == 300.0 and j_to_wh(wh_to_j(2.5)) == 2.5
    assert us_to_s(s_to_us(1.5)) == 1.5 and mj_to_j(j_to_mj(7.0)) == 7.0
    assert isinstance(US_PER_S, int) and 60 * US_PER_S == 60_000_000
    assert j_to_kwh(3.6e6) == 1.0 and j_to_wh(3600) == 1.0
