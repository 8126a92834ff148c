"""The straggler view of a distributed run: which rank is slowest, and how far the ranks spread.

A data-parallel run steps at its slowest rank's pace; every other rank waits for it in each
collective. Each member's step rate comes from its own reports (``job_members.steps_per_s``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Stragglers:
    """The slowest and fastest ranks of a run, by their recent step rates.

    Attributes:
        slowest_rank / slowest_steps_per_s: The slowest rank and its rate.
        fastest_rank / fastest_steps_per_s: The fastest rank and its rate.
        spread: ``(fastest - slowest) / fastest``: 0 when all keep pace, 0.2 when the slowest
            steps 20 % slower than the fastest.
        ranks: How many ranks had a rate.
    """

    slowest_rank: int
    slowest_steps_per_s: float
    fastest_rank: int
    fastest_steps_per_s: float
    spread: float
    ranks: int

    def sentence(self) -> str:
        """One line for a table's caption or a report."""
        return (
            f"slowest rank {self.slowest_rank} at {self.slowest_steps_per_s:.2f} steps/s, "
            f"fastest rank {self.fastest_rank} at {self.fastest_steps_per_s:.2f} steps/s: "
            f"spread {self.spread:.0%} over {self.ranks} ranks"
        )


def stragglers(rates: Sequence[tuple[int, float | None]]) -> Stragglers | None:
    """The straggler view from ``(rank, steps per second)`` pairs (``None``: no rate yet).

    Returns:
        ``None`` with fewer than two ranks that have a rate.
    """
    known = sorted(((rate, rank) for rank, rate in rates if rate is not None))
    if len(known) < 2:
        return None
    (slow, slow_rank), (fast, fast_rank) = known[0], known[-1]
    return Stragglers(
        slowest_rank=slow_rank,
        slowest_steps_per_s=slow,
        fastest_rank=fast_rank,
        fastest_steps_per_s=fast,
        spread=(fast - slow) / fast if fast > 0 else 0.0,
        ranks=len(known),
    )
