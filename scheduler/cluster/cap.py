"""One power cap over every node of a store: each daemon's part in it, leading or following.

Every ``TICK_S`` each daemon with a cap set tries to lead (``ClusterStore.lead``: one leader at a
time, a dead leader's lease runs out after ``LEASE_S`` and the next daemon to tick takes it).
The leader, every ``DIVIDE_EVERY_S``:

1. measures each running job over the period since the last division: its GPUs' mean draw per
   GPU (their energy counters) and its throughput (tokens/s, else samples/s, else steps/s), and
   files the point under the per-GPU watts the job held (its share, or its own budget);
2. divides the cap, less ``MARGIN`` and less what the GPUs without a running job draw, among the
   running jobs with ``energy.powershare.divide`` (watts go where they buy the most relative
   throughput per watt, by each job's measured points);
3. writes each job's per-GPU watts on each of its nodes and each node's cap: the node's share
   of the cap in proportion to the draw expected there, so the node caps add up to the cap.

Every daemon (the leader too) then reads its node's shares: its node cap is the lower of its own
and the cluster's, and a job's budget the lower of its own and its share; both are held by the
node's controllers as any budget is. A node whose leader is gone, or that cannot reach the store,
keeps the last shares it read. Pausing jobs is not one of the leader's moves: a cap under what
the jobs draw at their lowest limits is logged, not held.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from energy.powershare import JobDemand, Point, divide
from energy.units import mj_to_j, mw_to_w
from scheduler.jobs import JobState
from scheduler.store import JobStore
from scheduler.store.cluster import NODE_CAP, ClusterStore
from scheduler.store.records import JobRecord
from telemetry.store import GpuRecord, Store

log = logging.getLogger(__name__)

TICK_S = 2.0
"""How often each daemon takes part: renews or tries the lease, reads its shares."""
LEASE_S = 6.0
"""A leader that has not renewed its lease for this long is replaced."""
DIVIDE_EVERY_S = 10.0
"""How often the leader measures and divides."""
MARGIN = 0.03
"""Share of the cap kept unspent, for measurement noise and draws over a low limit."""


class ClusterCap:
    """A daemon's part in the cluster cap.

    Args:
        store: The shared store.
        node: This daemon's node name.
        now: The wall clock (aware UTC; tests give their own).
    """

    def __init__(self, store: Store, node: str,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._store = store
        self._jobs = JobStore(store)
        self._cluster = ClusterStore(store.engine)
        self._node = node
        self._now = now
        self._term: int | None = None
        self._divided: datetime | None = None
        self._points: dict[int, dict[float, list[tuple[float, float]]]] = {}
        self._held: dict[int, float] = {}  # per-GPU watts each job held since the last division
        self._node_cap_w: float | None = None
        self._job_watts: dict[int, float] = {}

    @property
    def leading(self) -> bool:
        return self._term is not None

    def node_cap_w(self) -> float | None:
        """This node's cap from the cluster's division (``None``: none)."""
        return self._node_cap_w

    def job_watts(self, job_id: int) -> float | None:
        """A job's per-GPU watts from the cluster's division (``None``: none)."""
        return self._job_watts.get(job_id)

    def tick(self) -> None:
        """Lead if it can, divide when due, and read this node's shares."""
        now = self._now()
        state = self._cluster.state()
        if state.cap_w is None:
            if self._term is not None:
                self._cluster.resign(self._node)
            self._term, self._node_cap_w, self._job_watts = None, None, {}
            return
        term = self._cluster.lead(self._node, at=now, lease_s=LEASE_S)
        if term != self._term:
            if term is not None:
                log.info("cluster cap: this node leads (term %d), holding %.0f W over the "
                         "cluster", term, state.cap_w)
                self._divided = None
            else:
                log.info("cluster cap: %s leads now", self._cluster.state().leader)
            self._term = term
        if term is not None and (
            self._divided is None
            or (now - self._divided).total_seconds() >= DIVIDE_EVERY_S - 0.5 * TICK_S
        ):
            self._divide(state.cap_w, term, now)
        self._follow()

    def stop(self) -> None:
        """Hand the lead over at once (a daemon that stops cleanly)."""
        if self._term is not None:
            self._cluster.resign(self._node)
            self._term = None

    def _follow(self) -> None:
        shares = self._cluster.shares(self._node)
        self._node_cap_w = next((s.watts for s in shares if s.job_id == NODE_CAP), None)
        self._job_watts = {s.job_id: s.watts for s in shares if s.job_id != NODE_CAP}

    # -- the leader ------------------------------------------------------------------------------

    def _divide(self, cap_w: float, term: int, now: datetime) -> None:
        up = {n.name for n in self._store.nodes() if n.is_up(now)}
        gpus = {g.id: g for g in self._store.gpus() if g.host in up}
        jobs = [j for j in self._jobs.list(states=[JobState.RUNNING])
                if any(h in up for h in j.gpu_hosts)]
        latest = self._store.latest_samples(list(gpus))
        busy = {g for j in jobs for g in j.gpu_ids}
        free_w = {gid: mw_to_w(s.power_avg_mw or s.power_mw or 0)
                  for gid, s in latest.items() if gid not in busy}
        if self._divided is not None:
            self._measure(jobs, self._divided, now)
        demands = [self._demand(job, gpus) for job in jobs]
        spendable = cap_w * (1 - MARGIN) - sum(free_w.values())
        shares = divide(max(0.0, spendable), demands)
        floors = sum(d.gpus * d.min_w for d in demands)
        if floors > spendable:
            log.warning("cluster cap: %.0f W cannot hold %d running jobs even at their lowest "
                        "limits (%.0f W, and %.0f W on free GPUs)", cap_w, len(jobs), floors,
                        sum(free_w.values()))
        rows: dict[tuple[str, int], tuple[float, float, float | None]] = {}
        expected: dict[str, float] = defaultdict(float)
        for gid, watts in free_w.items():
            expected[gpus[gid].host] += watts
        for job in jobs:
            share = shares[job.id]
            for host in sorted(set(job.gpu_hosts)):
                n = sum(1 for h in job.gpu_hosts if h == host)
                rows[(host, job.id)] = (share.limit_w, share.power_w * n, share.rate_rel)
                expected[host] += share.power_w * n
            self._held[job.id] = share.limit_w
        total = sum(expected.values())
        for host in up:
            node_w = expected.get(host, 0.0)
            rows[(host, NODE_CAP)] = (cap_w * node_w / total if total > 0 else cap_w / len(up),
                                      node_w, None)
        if self._cluster.write_division(self._node, term, rows, at=now):
            self._divided = now
            self._forget({j.id for j in jobs})
        else:
            self._term = None  # the lease was lost while dividing

    def _demand(self, job: JobRecord, gpus: dict[int, GpuRecord]) -> JobDemand:
        cards = [gpus[g] for g in job.gpu_ids if g in gpus]
        lows = [mw_to_w(c.min_limit_mw) for c in cards if c.min_limit_mw]
        highs = [mw_to_w(c.max_limit_mw) for c in cards if c.max_limit_mw]
        min_w = max(lows, default=100.0)
        max_w = min(highs, default=min_w)
        if job.watts_per_gpu is not None:
            max_w = max(min_w, min(max_w, job.watts_per_gpu))
        points = tuple(
            Point(limit, statistics.fmean(p for p, _ in ms), statistics.fmean(r for _, r in ms))
            for limit, ms in self._points.get(job.id, {}).items()
        )
        return JobDemand(job.id, len(job.gpu_ids), min_w, max_w, points)

    def _measure(self, jobs: Sequence[JobRecord], since: datetime, now: datetime) -> None:
        seconds = (now - since).total_seconds()
        for job in jobs:
            held = self._held.get(job.id)
            if held is None or seconds <= 0 or not job.gpu_ids:
                continue
            energy_j = sum(mj_to_j(self._store.gpu_energy(g, since, now).energy_mj)
                           for g in job.gpu_ids)
            rates = self._jobs.throughput(job.id, window_s=seconds, now=now)
            rate = rates and (rates.tokens_per_s or rates.samples_per_s or rates.steps_per_s)
            if not rate or not math.isfinite(rate) or energy_j <= 0:
                continue
            power = energy_j / seconds / len(job.gpu_ids)
            self._points.setdefault(job.id, {}).setdefault(held, []).append((power, rate))

    def _forget(self, running: set[int]) -> None:
        for job_id in [j for j in self._points if j not in running]:
            del self._points[job_id]
        for job_id in [j for j in self._held if j not in running]:
            del self._held[job_id]
