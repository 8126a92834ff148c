"""Unit conversions between the units powertrain stores and the units it shows or budgets in.

Telemetry keeps NVML's units (mW, mJ) and the database keeps integer microseconds; the edges and
budget arithmetic work in W, J, Wh and seconds (docs/architecture.md, "Units and names"). Each
helper is one multiplication or division, written exactly as the inline expression it replaces
(``x / 1000``, ``x * 1000``, ``x / 3600``, ...), so results are bit for bit the same; rounding to
an integer stays with the caller (``round(w_to_mw(w))`` is ``round(w * 1000)``).

Pure functions, no I/O.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "US_PER_S",
    "g_to_kg",
    "j_to_kj",
    "j_to_kwh",
    "j_to_mj",
    "j_to_wh",
    "mhz_to_hz",
    "mj_to_j",
    "ms_to_s",
    "mw_to_w",
    "pct_to_ratio",
    "s_to_us",
    "us_to_s",
    "w_to_mw",
    "wh_to_j",
]


US_PER_S: Final = 1_000_000
"""Microseconds per second, for integer microsecond arithmetic (``level_s * US_PER_S``), where a
float from ``s_to_us`` would not do."""


def mw_to_w(mw: float) -> float:
    """Milliwatts to watts."""
    return mw / 1000


def w_to_mw(w: float) -> float:
    """Watts to milliwatts (not rounded: NVML takes integer mW, so callers round)."""
    return w * 1000


def mj_to_j(mj: float) -> float:
    """Millijoules to joules."""
    return mj / 1000


def j_to_mj(j: float) -> float:
    """Joules to millijoules."""
    return j * 1000


def j_to_kj(j: float) -> float:
    """Joules to kilojoules."""
    return j / 1000


def j_to_wh(j: float) -> float:
    """Joules to watt-hours (1 Wh = 3600 J)."""
    return j / 3600


def wh_to_j(wh: float) -> float:
    """Watt-hours to joules (1 Wh = 3600 J)."""
    return wh * 3600


def j_to_kwh(j: float) -> float:
    """Joules to kilowatt-hours (1 kWh = 3.6 MJ)."""
    return j / 3.6e6


def us_to_s(us: float) -> float:
    """Microseconds (the store's timestamps and durations) to seconds."""
    return us / 1e6


def s_to_us(s: float) -> float:
    """Seconds to microseconds (not rounded: the store keeps integers, so callers round)."""
    return s * 1e6


def ms_to_s(ms: float) -> float:
    """Milliseconds to seconds."""
    return ms / 1000


def g_to_kg(g: float) -> float:
    """Grams (of CO2) to kilograms."""
    return g / 1000


def mhz_to_hz(mhz: float) -> float:
    """Megahertz (NVML's clocks) to hertz (Prometheus's base unit)."""
    return mhz * 1e6


def pct_to_ratio(pct: float) -> float:
    """Percent (NVML's utilisation) to a ratio in [0, 1] (Prometheus's base unit)."""
    return pct / 100
