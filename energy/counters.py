"""Energy over a series of GPU samples, from the hardware energy counter where it can be trusted.

Pure functions, no I/O. Each interval between two consecutive samples gets its energy from the
counter delta when both ends carry a counter reading and the delta is not negative (exact, however
long the interval); a negative delta means the counter restarted (driver reload), and such an
interval, like one on a GPU without a counter, is integrated from power with the trapezoid rule.
A trapezoid interval longer than ``max_gap_s`` is an estimate across missing samples and is
flagged as a gap.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from energy.units import mj_to_j

IntervalMethod = Literal["counter", "trapezoid"]
"""How one interval's energy was found."""

EnergyMethod = Literal["counter", "trapezoid", "mixed", "none"]
"""How a total was found: one method for every interval, both (``mixed``), or no interval at all."""

DEFAULT_MAX_GAP_S = 5.0
"""Longest interval, in seconds, that trapezoid integration bridges without flagging a gap."""


class EnergySample(NamedTuple):
    """One sample for energy purposes; a plain ``(t_s, energy_mj, power_mw)`` tuple works too.

    Attributes:
        t_s: Time in seconds (any fixed origin, e.g. the Unix epoch).
        energy_mj: Energy counter in millijoules since the driver loaded, or ``None``.
        power_mw: Power in milliwatts at ``t_s``, or ``None``.
    """

    t_s: float
    energy_mj: int | None
    power_mw: float | None


@dataclass(frozen=True, slots=True)
class IntervalEnergy:
    """The energy of the interval between two consecutive samples.

    Attributes:
        start_s / end_s: The two samples' times in seconds.
        energy_mj: Energy in millijoules, or ``None`` when neither counter nor power could give it.
        method: ``counter`` or ``trapezoid``; ``None`` when ``energy_mj`` is ``None``.
        counter_reset: The counter went backwards across this interval.
        gap: A trapezoid estimate over an interval longer than ``max_gap_s``.
    """

    start_s: float
    end_s: float
    energy_mj: float | None
    method: IntervalMethod | None
    counter_reset: bool = False
    gap: bool = False


@dataclass(frozen=True, slots=True)
class EnergyResult:
    """Energy over a series of samples.

    Attributes:
        energy_mj: Total energy in millijoules over the intervals whose energy is known.
        method: ``counter``, ``trapezoid``, ``mixed`` (both were used) or ``none`` (no interval).
        duration_s: Time from the first to the last sample, in seconds.
        n_samples: How many samples the series held.
        counter_resets: Intervals across which the counter went backwards.
        gaps: Trapezoid intervals longer than ``max_gap_s`` (estimates over missing samples).
        unknown_s: Seconds of intervals with neither counter nor power (not in ``energy_mj``).
    """

    energy_mj: float
    method: EnergyMethod
    duration_s: float
    n_samples: int
    counter_resets: int = 0
    gaps: int = 0
    unknown_s: float = 0.0

    @property
    def energy_j(self) -> float:
        """Total energy in joules."""
        return mj_to_j(self.energy_mj)


def interval_energy(
    prev: EnergySample | tuple[float, int | None, float | None],
    cur: EnergySample | tuple[float, int | None, float | None],
    *,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
) -> IntervalEnergy:
    """The energy between two consecutive samples.

    Args:
        prev: The earlier sample ``(t_s, energy_mj, power_mw)``.
        cur: The later sample.
        max_gap_s: Trapezoid intervals longer than this many seconds are flagged as gaps.

    Returns:
        The interval's energy in millijoules and how it was found. Where only one end has a
        power reading, that power is held over the interval (still reported as ``trapezoid``).

    Raises:
        ValueError: ``cur`` is earlier than ``prev``.
    """
    t0, e0, p0 = prev
    t1, e1, p1 = cur
    dt_s = t1 - t0
    if dt_s < 0:
        raise ValueError(f"samples must be in time order (got {t1} s after {t0} s)")
    reset = False
    if e0 is not None and e1 is not None:
        delta_mj = e1 - e0
        if delta_mj >= 0:
            return IntervalEnergy(t0, t1, float(delta_mj), "counter")
        reset = True
    if p0 is None and p1 is None:
        return IntervalEnergy(t0, t1, None, None, counter_reset=reset)
    if p0 is None:
        p0 = p1
    elif p1 is None:
        p1 = p0
    assert p0 is not None and p1 is not None
    # mW * s = mJ
    energy_mj = (p0 + p1) / 2.0 * dt_s
    return IntervalEnergy(t0, t1, energy_mj, "trapezoid", counter_reset=reset, gap=dt_s > max_gap_s)


def intervals(
    samples: Iterable[EnergySample | tuple[float, int | None, float | None]],
    *,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
) -> list[IntervalEnergy]:
    """The energy of every interval between consecutive samples.

    Args:
        samples: Samples ``(t_s, energy_mj, power_mw)`` in time order.
        max_gap_s: Trapezoid intervals longer than this many seconds are flagged as gaps.

    Returns:
        One ``IntervalEnergy`` per consecutive pair (empty for fewer than two samples).

    Raises:
        ValueError: The samples are not in time order.
    """
    out: list[IntervalEnergy] = []
    prev: EnergySample | tuple[float, int | None, float | None] | None = None
    for cur in samples:
        if prev is not None:
            out.append(interval_energy(prev, cur, max_gap_s=max_gap_s))
        prev = cur
    return out


def combine_methods(methods: Iterable[str | None]) -> EnergyMethod:
    """The method of a total made of parts found by ``methods``.

    The one rule for every total, whatever its parts: intervals (``counter``, ``trapezoid``),
    stored rollups or segments, or other totals (which may already be ``mixed``). One method for
    every part gives that method; different methods, or a ``mixed`` part, give ``mixed``; no part
    gives ``none``. ``None`` and ``none`` entries are parts without energy and are ignored.
    """
    seen = {m for m in methods if m is not None and m != "none"}
    if not seen:
        return "none"
    if len(seen) > 1 or "mixed" in seen:
        return "mixed"
    return "counter" if "counter" in seen else "trapezoid"


def summarise(parts: Sequence[IntervalEnergy], *, n_samples: int) -> EnergyResult:
    """Add up interval energies.

    Args:
        parts: Intervals in time order.
        n_samples: How many samples the intervals came from.

    Returns:
        The total energy in millijoules with its method, resets, flagged gaps and unknown time.
    """
    total_mj = 0.0
    unknown_s = 0.0
    for part in parts:
        if part.energy_mj is None:
            unknown_s += part.end_s - part.start_s
        else:
            total_mj += part.energy_mj
    duration_s = parts[-1].end_s - parts[0].start_s if parts else 0.0
    return EnergyResult(
        energy_mj=total_mj,
        method=combine_methods(p.method for p in parts),
        duration_s=duration_s,
        n_samples=n_samples,
        counter_resets=sum(p.counter_reset for p in parts),
        gaps=sum(p.gap for p in parts),
        unknown_s=unknown_s,
    )


def integrate(
    samples: Sequence[EnergySample | tuple[float, int | None, float | None]],
    *,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
) -> EnergyResult:
    """Energy over a series of samples: counter deltas where possible, trapezoid otherwise.

    Args:
        samples: Samples ``(t_s, energy_mj, power_mw)`` in time order.
        max_gap_s: Trapezoid intervals longer than this many seconds are flagged as gaps.

    Returns:
        The total energy in millijoules and how it was found.

    Raises:
        ValueError: The samples are not in time order.
    """
    return summarise(intervals(samples, max_gap_s=max_gap_s), n_samples=len(samples))
