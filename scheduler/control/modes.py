"""Mode choice: ``choose_mode`` resolves a job's mode, ``make_controller`` makes its controller.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.control.clock import ClockController
from scheduler.control.commands import PowerController
from scheduler.control.hw import HwController
from scheduler.control.soft import SoftController
from scheduler.jobs import Mode

__all__ = ["ModeChoice", "choose_mode", "make_controller"]


@dataclass(frozen=True, slots=True)
class ModeChoice:
    """The enforcement mode a job runs in (``hw``, ``clock`` or ``soft``, never ``auto``), and
    why."""

    mode: Mode
    reason: str


def choose_mode(
    requested: Mode | str, *, hw_permitted: bool, clocks_permitted: bool = True
) -> ModeChoice:
    """Resolve ``auto`` (and refuse nothing): the daemon probes permission once at start.

    Args:
        requested: The job's mode.
        hw_permitted: Whether setting power limits worked when probed (root / CAP_SYS_ADMIN).
        clocks_permitted: Whether locking clocks worked when probed.

    Raises:
        ValueError: ``hw`` or ``clock`` requested where the daemon may not set them, or an
            unknown mode.
    """
    if requested == Mode.AUTO:
        if hw_permitted:
            return ModeChoice(Mode.HW, "auto: the daemon may set power limits, so hw")
        return ModeChoice(
            Mode.SOFT,
            "auto: the daemon may not set power limits on these GPUs "
            "(permission denied when probed), so soft (pacing)",
        )
    if requested == Mode.HW:
        if not hw_permitted:
            raise ValueError(
                "hw mode needs permission to set power limits (root or "
                "CAP_SYS_ADMIN); use --mode soft or auto"
            )
        return ModeChoice(Mode.HW, "hw requested")
    if requested == Mode.CLOCK:
        if not clocks_permitted:
            raise ValueError(
                "clock mode needs permission to lock clocks (root or "
                "CAP_SYS_ADMIN); use --mode soft or auto"
            )
        return ModeChoice(Mode.CLOCK, "clock requested")
    if requested == Mode.SOFT:
        return ModeChoice(Mode.SOFT, "soft requested")
    raise ValueError(f"unknown mode {requested!r}: choose hw, clock, soft or auto")


def make_controller(mode: Mode | str) -> PowerController:
    """A fresh controller for a resolved mode (see ``choose_mode``)."""
    if mode == Mode.HW:
        return HwController()
    if mode == Mode.CLOCK:
        return ClockController()
    if mode == Mode.SOFT:
        return SoftController()
    raise ValueError(f"unknown mode {mode!r}: choose hw, clock or soft")
