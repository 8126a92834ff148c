"""Benchmark: one power cap over a cluster of training jobs, split evenly or by powertrain.

Simulated nodes in virtual time, one-second steps. Every GPU of the cluster runs a job drawn
from a trace file's power-throughput curves (every workload of the file, its largest batch size:
compute-bound ones whose throughput climbs with power and memory- or input-bound ones that draw
the same at any limit). A job holds 1 or 2 GPUs of one node; when its work is done another job
drawn the same way takes its GPUs, so the mix keeps changing. Under a limit a job's GPUs draw
the curve's average power and it makes the curve's throughput (epochs per second), each with 2 %
noise per second.

The cluster cap is 60 % of the first jobs' unconstrained draw (every GPU at its top limit).
Policies:

* ``even``: every GPU the cap over the GPU count as its power limit (within the card's range),
  recomputed whenever a job starts: how DCGM divides a group's budget.
* ``powertrain``: ``energy.powershare.divide`` every 10 s and whenever a job starts, over each
  job's measured points (its mean draw and throughput in each 10 s period at the limit it held),
  with 3 % of the cap kept as margin. Where the cap cannot hold every job even at its lowest
  limit, it pauses the jobs that gain least per watt (a paused job's GPUs draw a quarter of the
  card's lowest limit: an assumption, the traces do not measure idle power).

Each row (per trace file, seed and policy): ``within_cap_share`` (10 s windows whose mean cluster
draw is at most the cap), ``throughput_rel`` (each job's throughput over its throughput at the
top limit, averaged over the running jobs and over the run: see ``Cluster.run``), the cap and the
mean draw. Goal on the bundled traces: ``powertrain`` holds the cap in at least 99 % of windows
and reaches at least 1.1 times ``even``'s ``throughput_rel``. Any trace file of the same format
runs unchanged.

Usage: ``python bench/cluster_cap.py [--trace a40 p100 FILE ...] [--seeds 0 1 2]
[--nodes 4 --gpus-per-node 4] [--hours 2] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from energy.powershare import JobDemand, Point, divide, even  # noqa: E402
from telemetry.backends.replay import TraceCurve, load_trace  # noqa: E402
from telemetry.backends.traces import resolve_trace  # noqa: E402

RESULTS = REPO / "bench" / "results"
DEFAULT_TRACES = ("a40", "p100")
POLICIES = ("even", "powertrain")
CAP_SHARE = 0.6
MARGIN = 0.03
PERIOD_S = 10
NOISE = 0.02
MEAN_WORK_S = 1200.0  # a job's work, in seconds at its top limit (drawn 0.5x to 1.5x)
IDLE_SHARE = 0.25  # a paused job's GPUs draw this share of the card's lowest limit (assumed)


def workloads(curves: Sequence[TraceCurve]) -> list[TraceCurve]:
    """Every workload of a trace once, at its largest batch size."""
    chosen: dict[str, TraceCurve] = {}
    for c in sorted(curves, key=lambda c: (c.workload, -c.batch_size, c.optimizer)):
        chosen.setdefault(c.workload, c)
    return list(chosen.values())


@dataclass
class Job:
    """A simulated job: its curve, GPUs, work left and what it has measured."""

    job_id: int
    curve: TraceCurve
    node: int
    gpus: int
    work: float  # epochs left
    started_s: int
    limit_w: float
    done: float = 0.0
    points: dict[float, list[tuple[float, float]]] = field(default_factory=dict)
    period: list[tuple[float, float]] = field(default_factory=list)

    @property
    def min_w(self) -> float:
        return self.curve.limits_w[0]

    @property
    def max_w(self) -> float:
        return self.curve.limits_w[-1]

    def top_rate(self) -> float:
        return 1.0 / self.curve.at(self.max_w)[0]

    @property
    def idle_w(self) -> float:
        return IDLE_SHARE * self.min_w

    def demand(self) -> JobDemand:
        pts = tuple(
            Point(limit, statistics.fmean(p for p, _ in ms), statistics.fmean(r for _, r in ms))
            for limit, ms in self.points.items()
        )
        return JobDemand(self.job_id, self.gpus, self.min_w, self.max_w, pts, self.idle_w)

    def second(self, noise: random.Random) -> tuple[float, float]:
        """One second's draw per GPU and throughput under the limit it holds (0: paused)."""
        if self.limit_w == 0:
            return self.idle_w, 0.0
        t_epoch, power = self.curve.at(self.limit_w)
        return power * (1 + noise.gauss(0, NOISE)), (1 / t_epoch) * (1 + noise.gauss(0, NOISE))

    def close_period(self) -> None:
        """File the period's mean draw per GPU and throughput under the limit it held."""
        if self.period and self.limit_w > 0:
            power = statistics.fmean(p for p, _ in self.period)
            rate = statistics.fmean(r for _, r in self.period)
            self.points.setdefault(self.limit_w, []).append((power, rate))
        self.period = []


@dataclass(frozen=True, slots=True)
class Row:
    trace: str
    gpu: str
    seed: int
    policy: str
    within_cap_share: float
    throughput_rel: float
    cap_w: float
    mean_power_w: float
    windows: int
    jobs: int


class Cluster:
    """The simulated cluster under one policy."""

    def __init__(self, curves: Sequence[TraceCurve], nodes: int, per_node: int, seed: int,
                 policy: str, cap_share: float = CAP_SHARE) -> None:
        self.curves = list(curves)
        self.policy = policy
        self.rng = random.Random(seed)  # the jobs: the same draws under every policy
        self.noise = random.Random(seed + 10_000)
        self.jobs: list[Job] = []
        self.started = 0  # jobs started after the first ones
        self.next_id = 0
        for node in range(nodes):
            free = per_node
            while free > 0:
                gpus = min(free, self.rng.choice((1, 1, 2)))
                self.jobs.append(self._new_job(node, gpus, 0))
                free -= gpus
        self.cap_w = cap_share * sum(j.gpus * j.curve.at(j.max_w)[1] for j in self.jobs)
        self._divide()

    def _new_job(self, node: int, gpus: int, now_s: int) -> Job:
        curve = self.rng.choice(self.curves)
        work_s = MEAN_WORK_S * self.rng.uniform(0.5, 1.5)
        self.next_id += 1
        return Job(self.next_id, curve, node, gpus, work_s / curve.at(curve.limits_w[-1])[0],
                   now_s, curve.limits_w[0])

    def _divide(self) -> None:
        for j in self.jobs:  # what each measured so far, under the limit it held
            j.close_period()
        if self.policy == "even":
            limits = even(self.cap_w, [j.demand() for j in self.jobs])
        else:
            shares = divide(self.cap_w * (1 - MARGIN), [j.demand() for j in self.jobs])
            limits = {job_id: s.limit_w for job_id, s in shares.items()}
        for j in self.jobs:
            j.limit_w = limits[j.job_id]

    def run(self, seconds: int) -> tuple[float, list[float], float]:
        """Run; returns the cap, each window's mean draw, and the relative throughput: at
        every second the mean over the running jobs of their throughput over their top-limit
        throughput, averaged over the run (a job favoured or not counts for the time it runs,
        however often jobs like it end and start)."""
        windows: list[float] = []
        window: list[float] = []
        rel: list[float] = []
        for now in range(seconds):
            total, rels = 0.0, []
            for j in self.jobs:
                power, rate = j.second(self.noise)
                total += power * j.gpus
                j.period.append((power, rate))
                j.done += rate
                rels.append(rate / j.top_rate())
            window.append(total)
            rel.append(statistics.fmean(rels))
            if (now + 1) % PERIOD_S == 0:
                windows.append(statistics.fmean(window))
                window = []
            started = False
            for i, j in enumerate(self.jobs):
                if j.done >= j.work:
                    self.jobs[i] = self._new_job(j.node, j.gpus, now + 1)
                    self.started += 1
                    started = True
            if (self.policy == "powertrain" and (now + 1) % PERIOD_S == 0) or started:
                self._divide()
        return self.cap_w, windows, statistics.fmean(rel)


def bench_trace(path: Path, name: str, seeds: Sequence[int], nodes: int, per_node: int,
                seconds: int, cap_share: float = CAP_SHARE) -> list[Row]:
    curves = workloads(load_trace(path))
    rows = []
    for seed in seeds:
        for policy in POLICIES:
            cluster = Cluster(curves, nodes, per_node, seed, policy, cap_share)
            cap, windows, rel = cluster.run(seconds)
            rows.append(Row(
                trace=name, gpu=curves[0].gpu, seed=seed, policy=policy,
                within_cap_share=sum(w <= cap for w in windows) / len(windows),
                throughput_rel=round(rel, 4), cap_w=round(cap, 1),
                mean_power_w=round(statistics.fmean(windows), 1), windows=len(windows),
                jobs=len(cluster.jobs) + cluster.started,
            ))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", nargs="+", default=list(DEFAULT_TRACES),
                        help="trace files or bundled trace names (default: a40 p100)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--hours", type=float, default=2.0, help="virtual time per run")
    parser.add_argument("--cap-share", type=float, default=CAP_SHARE,
                        help="the cap over the first jobs' unconstrained draw (default 0.6)")
    parser.add_argument("--json", type=Path, default=RESULTS / "cluster_cap.json")
    args = parser.parse_args(argv)
    seconds = int(args.hours * 3600)
    rows: list[Row] = []
    for trace in args.trace:
        path = resolve_trace(trace)
        rows += bench_trace(path, trace, args.seeds, args.nodes, args.gpus_per_node, seconds,
                            args.cap_share)
    print(f"{'trace':<10} {'seed':>4} {'policy':<11} {'in cap':>7} {'thr rel':>8} "
          f"{'cap W':>8} {'mean W':>8} {'jobs':>5}")
    for r in rows:
        print(f"{r.trace:<10} {r.seed:>4} {r.policy:<11} {r.within_cap_share:>7.1%} "
              f"{r.throughput_rel:>8.3f} {r.cap_w:>8.0f} {r.mean_power_w:>8.0f} {r.jobs:>5}")
    verdicts = []
    for trace in args.trace:
        mine = [r for r in rows if r.trace == trace and r.policy == "powertrain"]
        base = [r for r in rows if r.trace == trace and r.policy == "even"]
        share = min(r.within_cap_share for r in mine)
        ratio = statistics.fmean(r.throughput_rel for r in mine) / statistics.fmean(
            r.throughput_rel for r in base)
        even_share = statistics.fmean(r.within_cap_share for r in base)
        ok = share >= 0.99 and ratio >= 1.1
        verdicts.append(ok)
        print(f"{trace}: powertrain within the cap in {share:.1%} of 10 s windows (worst seed), "
              f"throughput_rel {ratio:.2f}x even's (even within the cap in {even_share:.1%}): "
              f"{'meets' if ok else 'MISSES'} the goal (>= 99 %, >= 1.1x)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
