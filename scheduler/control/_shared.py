"""Shared by the controllers and guards: the window tolerance, and a decision from an observation.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.control.commands import Command, Decision, Observation

#: 10 s averages may reach ``budget * (1 + WINDOW_TOLERANCE)`` (the acceptance bar).
WINDOW_TOLERANCE = 0.02


def decision(
    obs: Observation, source: str, what: str, why: str, commands: Sequence[Command]
) -> Decision:
    """A decision at the observation's time, with the power and throughput before it."""
    return Decision(
        at_s=obs.now_s,
        source=source,
        what=what,
        why=why,
        commands=tuple(commands),
        power_before_w=obs.mean_power_w(),
        steps_per_s_before=obs.steps_per_s,
    )
