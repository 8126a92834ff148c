"""How a node's reservation in Ray changes: which chunks to add and remove. Pure, no Ray.

Ray cannot change a node's resources in place, so the node advertises its whole capacity and
holds back what Ray may not use with placement groups of its own (``scheduler.cluster.ray.
reserve``), each one bundle of ``watts`` (and GPUs) pinned to the node: the chunks. A placement
group cannot be resized either, so the reservation grows by adding a chunk of the difference and
shrinks by removing the newest chunks, adding back what it removed beyond the difference. The
new chunk is created before the old ones are removed: what Ray may use never dips below what it
should be while the reservation changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SHRINK_SLACK_W = 5.0
"""A reservation this much larger than needed is left as it is (idle power read from a GPU wobbles;
the reservation grows at once, and shrinks only by more than this)."""


@dataclass(frozen=True, slots=True)
class Amount:
    """Resources held back from Ray on one node: whole watts and GPUs."""

    watts: float = 0.0
    gpus: int = 0

    def __add__(self, other: Amount) -> Amount:
        return Amount(self.watts + other.watts, self.gpus + other.gpus)

    def __sub__(self, other: Amount) -> Amount:
        return Amount(self.watts - other.watts, self.gpus - other.gpus)

    @property
    def empty(self) -> bool:
        return self.watts <= 0 and self.gpus <= 0

    def within(self, other: Amount) -> bool:
        """Every part is at most ``other``'s."""
        return self.watts <= other.watts and self.gpus <= other.gpus


@dataclass(frozen=True, slots=True)
class Chunk:
    """One placement group of the reservation: its name and what it holds."""

    name: str
    amount: Amount


@dataclass(frozen=True, slots=True)
class Change:
    """Add ``add`` (a new chunk; ``None``: nothing), then remove the chunks named in ``remove``."""

    add: Amount | None
    remove: tuple[str, ...]


def wanted(
    *, capacity_w: float, capacity_gpus: int, headroom_w: float, held_gpus: int
) -> Amount:
    """What the reservation should hold on a Ray node that advertises ``capacity_w`` watts and
    ``capacity_gpus`` GPUs: all but the headroom, in whole watts (rounded up), and the GPUs that
    jobs outside Ray hold."""
    watts = max(0.0, capacity_w - headroom_w)
    return Amount(float(math.ceil(watts - 1e-6)), max(0, min(capacity_gpus, held_gpus)))


def plan(
    chunks: Sequence[Chunk], want: Amount, *, slack_w: float = SHRINK_SLACK_W
) -> Change | None:
    """The change that takes ``chunks`` (oldest first) to ``want``; ``None`` when none is needed.

    The reservation stays as it is while it holds ``want``'s GPUs exactly and between ``want``'s
    watts and ``slack_w`` more. Otherwise: a chunk whose removal lands exactly on ``want`` goes
    alone; else the newest chunks go until what stays is within ``want``, and a new chunk makes
    up the rest.
    """
    held = sum((c.amount for c in chunks), Amount())
    if held.gpus == want.gpus and want.watts <= held.watts <= want.watts + slack_w:
        return None
    if want.within(held):
        for chunk in reversed(chunks):
            if held - chunk.amount == want:
                return Change(None, (chunk.name,))
    keep = list(chunks)
    removed: list[str] = []
    kept = held
    while keep and not kept.within(want):
        chunk = keep.pop()
        removed.append(chunk.name)
        kept = kept - chunk.amount
    rest = want - kept
    add = Amount(max(0.0, rest.watts), max(0, rest.gpus))
    return Change(None if add.empty else add, tuple(removed))
