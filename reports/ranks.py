"""The straggler view of a distributed run: which rank is slowest, and how far the ranks spread.

A data-parallel run steps at its slowest rank's pace; every other rank waits for it in each
collective. Each member's step rate comes from its own reports (``job_members.steps_per_s``).
``run_ranks`` gives a report's view of a run: its latest generation's members, with an ended
member's rate as its last known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reports.jobrows import MemberRow


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


#: The fields of ``RunRanks.to_json`` (a report row's ``ranks``), in order.
RANK_FIELDS = ("members", "world_size", "generation", "nodes", "slowest_rank",
               "slowest_steps_per_s", "fastest_rank", "fastest_steps_per_s", "spread")


@dataclass(frozen=True, slots=True)
class RunRanks:
    """A distributed run's ranks as the report shows them: its latest generation's members and
    their straggler view.

    Attributes:
        job_id: The job.
        generation / world_size: The run's latest elastic generation and its world size.
        members: That generation's members, by rank.
        view: The straggler view from each member's step rate (an ended member's last known);
            ``None`` with fewer than two rates.
    """

    job_id: int
    generation: int
    world_size: int
    members: tuple[MemberRow, ...]
    view: Stragglers | None

    @property
    def nodes(self) -> list[str]:
        """The members' nodes, sorted."""
        return sorted({m.host for m in self.members})

    def sentence(self) -> str:
        """One line: how many ranks, and the straggler view."""
        head = f"Job {self.job_id}, {len(self.members)} of {self.world_size} ranks"
        if len(self.nodes) > 1:
            head += f" on {len(self.nodes)} nodes"
        if self.view is None:
            return f"{head}: no step rates yet (fewer than two ranks reported one)."
        return f"{head}: {self.view.sentence()}."

    def to_json(self) -> dict[str, Any]:
        """The fields of ``RANK_FIELDS`` (the straggler's ``None`` without a view)."""
        v = self.view
        return dict(zip(RANK_FIELDS, (
            len(self.members),
            self.world_size,
            self.generation,
            self.nodes,
            None if v is None else v.slowest_rank,
            None if v is None else v.slowest_steps_per_s,
            None if v is None else v.fastest_rank,
            None if v is None else v.fastest_steps_per_s,
            None if v is None else v.spread,
        ), strict=True))


def run_ranks(members: Sequence[MemberRow]) -> RunRanks | None:
    """The ranks of one job's latest generation (``members`` of one job, any generations).

    Returns:
        ``None`` when that generation has fewer than two members (not a distributed run).
    """
    if not members:
        return None
    generation = max(m.generation for m in members)
    latest = tuple(sorted((m for m in members if m.generation == generation),
                          key=lambda m: m.rank))
    if len(latest) < 2:
        return None
    return RunRanks(
        job_id=latest[0].job_id,
        generation=generation,
        world_size=max(m.world_size for m in latest),
        members=latest,
        view=stragglers([(m.rank, m.steps_per_s) for m in latest]),
    )
