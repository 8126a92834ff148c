"""The node cap at run time: ``NodeCapGuard`` tightens the lowest-priority jobs first.

While the node is over its cap it lowers the effective per-GPU budgets of the lowest-priority
jobs first, and gives them back when headroom returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.control._shared import WINDOW_TOLERANCE

__all__ = ["JobPower", "NodeCapDecision", "NodeCapGuard"]


@dataclass(frozen=True, slots=True)
class JobPower:
    """One running job as the node-cap guard sees it.

    Attributes:
        job_id: The job.
        priority: Higher runs first; the lowest is tightened first.
        gpus: How many GPUs it holds.
        power_w: Its measured power, all its GPUs together (1 s averages), W.
        budget_w: Its own wattage budget per GPU, W; None: unconstrained.
        floor_w: The lowest per-GPU budget its mode can hold (the card's minimum limit), W.
    """

    job_id: int
    priority: int
    gpus: int
    power_w: float
    budget_w: float | None
    floor_w: float


@dataclass(frozen=True, slots=True)
class NodeCapDecision:
    """What the node-cap guard changed at one tick.

    Attributes:
        at_s: Tick time, s.
        node_power_w: Measured node power (1 s averages of every GPU), W.
        budgets_w: Effective per-GPU budget of every job it tracks, W (None: unconstrained).
        changed: Jobs whose effective budget changed, in the order changed.
        sentence: What it did, in words.
    """

    at_s: float
    node_power_w: float
    budgets_w: dict[int, float | None]
    changed: tuple[int, ...]
    sentence: str


@dataclass(slots=True)
class _CapHold:
    budget_w: float  # effective per-GPU budget the guard imposes
    since_s: float  # when it last changed
    uncapped_w: float  # the job's per-GPU power when first tightened
    defiant: bool = False


class NodeCapGuard:
    """Holds a node's power cap at run time: tightens the lowest-priority jobs first.

    It reads node power as the sum of every GPU's 1 s average: a cap breach shows within a
    tick, before a 10 s window has filled with it (the acceptance bar is on 10 s windows, so
    reacting to the 1 s reading leaves the controllers time to settle). Jobs already tightened
    count at their effective budget while they settle, so one breach is answered once, not
    every tick (no wind-up). A job that stays over its effective budget for ``obey_grace_s``
    (an attached job without control, a client that ignores pacing) counts at what it draws,
    and the next job down is tightened instead. Headroom is given back, highest priority first,
    only after the node has stayed ``relax_margin`` under the cap for ``relax_after_s``, and only
    as much as the headroom, so relaxing never overshoots into another breach.

    Args:
        cap_w: The node cap, W.
        margin: Tighten to ``cap * (1 - margin)``.
        relax_margin: Relax only while the node is this share under the cap.
        relax_after_s: ...for this long, s.
        obey_grace_s: Time a tightened job gets to come down, s.
    """

    def __init__(
        self,
        cap_w: float,
        *,
        margin: float = 0.03,
        relax_margin: float = 0.08,
        relax_after_s: float = 10.0,
        obey_grace_s: float = 15.0,
    ) -> None:
        if not cap_w > 0:
            raise ValueError(f"a node cap must be positive, got {cap_w} W")
        self._cap_w = float(cap_w)
        self._margin = margin
        self._relax_margin = relax_margin
        self._relax_after_s = relax_after_s
        self._grace_s = obey_grace_s
        self._holds: dict[int, _CapHold] = {}
        self._headroom_since: float | None = None

    @property
    def cap_w(self) -> float:
        """The node cap, W."""
        return self._cap_w

    def effective_budget_w(self, job: JobPower) -> float | None:
        """The per-GPU budget the job's controller should hold now, W (None: unconstrained)."""
        hold = self._holds.get(job.job_id)
        if hold is None:
            return job.budget_w
        return hold.budget_w if job.budget_w is None else min(hold.budget_w, job.budget_w)

    def tick(
        self, now_s: float, node_power_w: float, jobs: Sequence[JobPower]
    ) -> NodeCapDecision | None:
        """One control tick; returns what changed, or None.

        Args:
            now_s: Tick time, s.
            node_power_w: Every GPU's 1 s average power summed (free GPUs and unknown loads
                included), W.
            jobs: The running jobs.
        """
        running = {j.job_id for j in jobs}
        for gone in [i for i in self._holds if i not in running]:
            del self._holds[gone]
        notes: list[str] = []
        expected: dict[int, float] = {}
        for j in jobs:
            hold = self._holds.get(j.job_id)
            eff = self.effective_budget_w(j)
            if hold is None or eff is None:
                expected[j.job_id] = j.power_w
                continue
            over = j.power_w > eff * j.gpus * (1.0 + 2 * WINDOW_TOLERANCE)
            if over and now_s - hold.since_s >= self._grace_s:
                if not hold.defiant:
                    notes.append(
                        f"job {j.job_id} does not come down to its {eff:.0f} W per GPU "
                        f"(draws {j.power_w / j.gpus:.0f} W per GPU)"
                    )
                hold.defiant = True
            elif not over:
                hold.defiant = False
            expected[j.job_id] = j.power_w if hold.defiant else min(j.power_w, eff * j.gpus)
        other_w = node_power_w - sum(j.power_w for j in jobs)
        expected_node = other_w + sum(expected.values())
        setpoint = self._cap_w * (1.0 - self._margin)
        changed: list[int] = []
        if expected_node > setpoint:
            self._headroom_since = None
            excess = expected_node - setpoint
            for j in sorted(jobs, key=lambda j: (j.priority, -j.job_id)):
                hold = self._holds.get(j.job_id)
                if excess <= 0 or (hold is not None and hold.defiant):
                    continue
                give = expected[j.job_id] - j.floor_w * j.gpus
                cut = min(give, excess)
                if cut <= 0.5:
                    continue
                new_w = (expected[j.job_id] - cut) / j.gpus
                if hold is None and j.budget_w is not None and new_w >= j.budget_w:
                    excess -= cut  # its own budget takes it lower (it is still settling)
                    continue
                before = self.effective_budget_w(j)
                uncapped = hold.uncapped_w if hold else j.power_w / j.gpus
                self._holds[j.job_id] = _CapHold(new_w, now_s, uncapped)
                excess -= cut
                changed.append(j.job_id)
                was = "unconstrained" if before is None else f"{before:.0f} W per GPU"
                notes.append(
                    f"job {j.job_id} (priority {j.priority}) held to {new_w:.0f} W per "
                    f"GPU (was {was})"
                )
            head = (
                f"node at {node_power_w:.0f} W (expected {expected_node:.0f} W) over the "
                f"{self._cap_w:.0f} W cap less {self._margin:.0%}"
            )
            if excess > 0.5:
                notes.append(f"{excess:.0f} W cannot be taken from the jobs on this node")
        elif node_power_w <= self._cap_w * (1.0 - self._relax_margin) and self._holds:
            if self._headroom_since is None:
                self._headroom_since = now_s
            head = (
                f"node at {node_power_w:.0f} W, under the {self._cap_w:.0f} W cap for "
                f"{now_s - self._headroom_since:.0f} s"
            )
            if now_s - self._headroom_since >= self._relax_after_s:
                headroom = setpoint - node_power_w
                by_rank = sorted(jobs, key=lambda j: (-j.priority, j.job_id))
                for j in by_rank:
                    hold = self._holds.get(j.job_id)
                    if hold is None or headroom <= 0.5:
                        continue
                    new_w = hold.budget_w + headroom / j.gpus
                    ceiling = j.budget_w if j.budget_w is not None else hold.uncapped_w
                    changed.append(j.job_id)
                    if new_w >= ceiling:
                        headroom -= (ceiling - hold.budget_w) * j.gpus
                        del self._holds[j.job_id]
                        own = (
                            "unconstrained"
                            if j.budget_w is None
                            else f"its own {j.budget_w:.0f} W per GPU"
                        )
                        notes.append(f"job {j.job_id} back to {own}")
                    else:
                        notes.append(
                            f"job {j.job_id} relaxed to {new_w:.0f} W per GPU "
                            f"(was {hold.budget_w:.0f} W)"
                        )
                        hold.budget_w, hold.since_s = new_w, now_s
                        headroom = 0.0
                self._headroom_since = now_s
        else:
            self._headroom_since = None
            head = ""
        if not changed and not notes:
            return None
        return NodeCapDecision(
            at_s=now_s,
            node_power_w=node_power_w,
            budgets_w={j.job_id: self.effective_budget_w(j) for j in jobs},
            changed=tuple(changed),
            sentence=head + ": " + "; ".join(notes) if notes else head,
        )
