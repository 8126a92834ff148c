"""Prices and carbon intensities over time: flat, a daily time-of-use table, or a dated series.

Pure functions and small value classes, no I/O beyond parsing text the caller read. A rate is a
step function of time (seconds since the Unix epoch, UTC): ``at(t)`` is its value and
``changes(start, end)`` the times inside a range where it steps, so that callers can split energy
there and price each part at one rate.
"""

from __future__ import annotations

import csv
import io
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from energy.times import parse_time

J_PER_KWH = 3.6e6
"""Joules in one kilowatt-hour."""

DAY_S = 86_400.0


class Rate(Protocol):
    """A value per kWh that may change with time (price, or grams of CO2)."""

    def at(self, t_s: float) -> float:
        """The rate in force at ``t_s`` (s since the epoch), per kWh."""
        ...

    def changes(self, start_s: float, end_s: float) -> list[float]:
        """Times ``start_s < t < end_s`` at which the rate steps, ascending."""
        ...

    def describe(self) -> str:
        """One line for the report: what the rate is."""
        ...


def per_kwh(energy_j: float, rate_per_kwh: float) -> float:
    """Energy in joules times a rate per kWh (a price, or gCO2/kWh)."""
    return energy_j / J_PER_KWH * rate_per_kwh


@dataclass(frozen=True, slots=True)
class FlatRate:
    """One value per kWh at all times."""

    value: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"a rate must be a finite number >= 0 (got {self.value})")

    def at(self, t_s: float) -> float:
        return self.value

    def changes(self, start_s: float, end_s: float) -> list[float]:
        return []

    def describe(self) -> str:
        return f"{self.value:g} per kWh"


@dataclass(frozen=True, slots=True)
class TimeOfUse:
    """A daily schedule (UTC): each entry's value holds from its time of day until the next one.

    Attributes:
        starts_s: Seconds after midnight UTC where each period begins, strictly ascending.
        values: The rate per kWh of each period; before the first start of a day the last
            period of the previous day is in force.
    """

    starts_s: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.starts_s or len(self.starts_s) != len(self.values):
            raise ValueError("a time-of-use table needs at least one period, each with a value")
        if any(b <= a for a, b in zip(self.starts_s, self.starts_s[1:], strict=False)):
            raise ValueError("time-of-use periods must start at strictly increasing times of day")
        if any(not (0 <= s < DAY_S) for s in self.starts_s):
            raise ValueError("time-of-use starts must lie within a day (00:00 to 23:59)")
        if any(not (math.isfinite(v) and v >= 0) for v in self.values):
            raise ValueError("time-of-use values must be finite numbers >= 0")

    def at(self, t_s: float) -> float:
        i = bisect_right(self.starts_s, t_s % DAY_S) - 1
        return self.values[i]  # i == -1: the last period, carried over from the day before

    def changes(self, start_s: float, end_s: float) -> list[float]:
        out: list[float] = []
        day = math.floor(start_s / DAY_S) * DAY_S
        while day < end_s:
            for s in self.starts_s:
                t = day + s
                if start_s < t < end_s:
                    out.append(t)
            day += DAY_S
        return out

    def describe(self) -> str:
        parts = [
            f"{int(s // 3600):02d}:{int(s % 3600 // 60):02d} {v:g}"
            for s, v in zip(self.starts_s, self.values, strict=True)
        ]
        return "time of use per kWh (UTC): " + ", ".join(parts)


@dataclass(frozen=True, slots=True)
class RateSeries:
    """Dated values: each holds from its time until the next; the first also before it, the
    last also after it.

    Attributes:
        times_s: Seconds since the epoch, strictly ascending.
        values: The rate per kWh from each time on.
        label: What the values are, for ``describe``.
    """

    times_s: tuple[float, ...]
    values: tuple[float, ...]
    label: str = "series"

    def __post_init__(self) -> None:
        if not self.times_s or len(self.times_s) != len(self.values):
            raise ValueError("a rate series needs at least one row")
        if any(b <= a for a, b in zip(self.times_s, self.times_s[1:], strict=False)):
            raise ValueError("a rate series must be in strictly increasing time order")
        if any(not (math.isfinite(v) and v >= 0) for v in self.values):
            raise ValueError("rate series values must be finite numbers >= 0")

    def at(self, t_s: float) -> float:
        return self.values[max(0, bisect_right(self.times_s, t_s) - 1)]

    def changes(self, start_s: float, end_s: float) -> list[float]:
        lo = bisect_right(self.times_s, start_s)
        out = []
        for t in self.times_s[lo:]:
            if t >= end_s:
                break
            out.append(t)
        return out

    def describe(self) -> str:
        return f"{self.label} ({len(self.times_s)} rows)"


def _rows(text: str) -> list[tuple[int, list[str]]]:
    """Non-empty, non-comment CSV rows with their line numbers; a header row is skipped."""
    out = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        out.append((number, cells))
    if out and not _is_number(out[0][1][-1]):
        out = out[1:]  # header
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _value(cells: Sequence[str], number: int, what: str) -> float:
    if len(cells) != 2:
        raise ValueError(f"line {number}: expected 2 columns (time, {what}), got {len(cells)}")
    try:
        value = float(cells[1])
    except ValueError:
        raise ValueError(f"line {number}: {what} {cells[1]!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"line {number}: {what} must be a finite number >= 0")
    return value


def parse_time_of_use(text: str) -> TimeOfUse:
    """A time-of-use table from CSV ``start,price_per_kwh`` with ``HH:MM`` starts (UTC).

    Example::

        start,price_per_kwh
        00:00,0.12
        07:00,0.30
        22:00,0.12

    Raises:
        ValueError: With the line number of the first bad row.
    """
    starts: list[float] = []
    values: list[float] = []
    for number, cells in _rows(text):
        value = _value(cells, number, "price per kWh")
        try:
            hours, minutes = (int(x) for x in cells[0].split(":"))
        except ValueError:
            raise ValueError(f"line {number}: start {cells[0]!r} is not HH:MM") from None
        if not (0 <= hours < 24 and 0 <= minutes < 60):
            raise ValueError(f"line {number}: start {cells[0]!r} is not a time of day")
        starts.append(hours * 3600.0 + minutes * 60.0)
        values.append(value)
    if not starts:
        raise ValueError("the time-of-use table has no rows")
    order = sorted(range(len(starts)), key=starts.__getitem__)
    return TimeOfUse(tuple(starts[i] for i in order), tuple(values[i] for i in order))


def parse_series(text: str, *, label: str = "gCO2/kWh series") -> RateSeries:
    """A dated series from CSV ``time,value`` (ISO 8601 times, naive = UTC), in any order.

    Example (carbon intensity)::

        time,g_per_kwh
        2026-01-01T00:00:00Z,320
        2026-01-01T01:00:00Z,290

    Raises:
        ValueError: With the line number of the first bad row, or duplicate times.
    """
    pairs: list[tuple[float, float]] = []
    for number, cells in _rows(text):
        value = _value(cells, number, "value")
        try:
            t = parse_time(cells[0]).timestamp()
        except ValueError:
            raise ValueError(f"line {number}: time {cells[0]!r} is not ISO 8601") from None
        pairs.append((t, value))
    if not pairs:
        raise ValueError("the series has no rows")
    pairs.sort()
    times = tuple(t for t, _ in pairs)
    if len(set(times)) != len(times):
        raise ValueError("the series has two rows at the same time")
    return RateSeries(times, tuple(v for _, v in pairs), label=label)
