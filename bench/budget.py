"""Benchmark: one training job held to 400, 300 and 200 W per GPU in each of hw, clock and soft.

What it runs: the daemon's job service and budget loop (``scheduler.service.JobService``, whose
controllers from ``scheduler.control`` act through the actuators) against the simulated H100 SXM
of ``telemetry.backends.simulated`` in VIRTUAL time (``bench/simjob.py``: a simulated job attaches,
reports progress every second and obeys the service's directives as ``scheduler.client`` does,
its steps stretched by the slowdown the service reads from the simulator's clock). No daemon
process, no real training process, no real timer. Every number comes from the simulator's exact
energy:

* share of 10 s windows (1 s stride, after settling) whose average power per GPU is at or under
  the budget + 2 %;
* throughput and energy per token relative to the unconstrained run (measured from
  ``--measure-from`` s after the start to the end);
* the pacing bound ``(B - P_idle) / (P_unconstrained - P_idle)``: the best relative throughput
  a GPU that can only alternate between full power and idle reaches at budget ``B``.

Targets (the issue's): soft mode reaches at least 90 % of the pacing bound; hw and clock
throughputs are within 3 % of each other; every mode holds 99 % of windows after settling
within 15 s.

Usage: ``python bench/budget.py [--seconds 300] [--json PATH] [--table PATH] [--strict]``.
Writes ``bench/results/budget.txt`` and ``bench/results/budget.json`` (one object per run:
mode, budget_w, settle_s, within_budget_share, throughput_rel, energy_per_token_rel,
pacing_bound_rel; mode ``none`` and budget_w null for the unconstrained run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.simjob import JobSpec, JobStats, SimMode, SimNode  # noqa: E402

RESULTS = REPO / "bench" / "results"
BUDGETS_W = (400.0, 300.0, 200.0)
MODES: tuple[SimMode, ...] = ("hw", "clock", "soft")
SETTLE_MAX_S = 15.0


@dataclass(frozen=True, slots=True)
class Row:
    """One run, relative to the unconstrained one."""

    mode: str
    budget_w: float | None
    stats: JobStats
    throughput_rel: float
    energy_per_token_rel: float
    pacing_bound_rel: float | None

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        return {
            "mode": self.mode,
            "budget_w": self.budget_w,
            "settle_s": s.settle_s,
            "within_budget_share": round(s.within_share, 6),
            "throughput_rel": round(self.throughput_rel, 6),
            "energy_per_token_rel": round(self.energy_per_token_rel, 6),
            "pacing_bound_rel": (
                None if self.pacing_bound_rel is None else round(self.pacing_bound_rel, 6)
            ),
            "windows": s.windows,
            "max_window_w": round(s.max_window_w, 3),
            "mean_power_w": round(s.mean_power_w, 3),
            "steps_per_s": round(s.steps_per_s, 6),
            "energy_per_token_j": round(s.energy_per_token_j, 6),
        }


def run_one(
    mode: SimMode, budget_w: float | None, seconds: float, measure_from_s: float, seed: int
) -> JobStats:
    """One job on one simulated H100 for ``seconds`` of virtual time."""
    with SimNode(gpus=1, seed=seed) as node:
        job = node.add_job(JobSpec("bench", gpus=(0,), mode=mode, budget_w=budget_w))
        node.run(seconds)
        return node.stats(job, limit_w=budget_w, measure_from_s=measure_from_s)


def run_all(seconds: float, measure_from_s: float, seed: int) -> tuple[list[Row], float]:
    """The unconstrained run, then every (mode, budget); returns rows and idle power in W."""
    with SimNode(gpus=1, seed=seed) as node:
        idle_w = node.backend.sku.idle_power_w
    base = run_one("none", None, seconds, measure_from_s, seed)
    rows = [Row("none", None, base, 1.0, 1.0, None)]
    for budget in BUDGETS_W:
        bound = (budget - idle_w) / (base.mean_power_w - idle_w)
        for mode in MODES:
            s = run_one(mode, budget, seconds, measure_from_s, seed)
            rows.append(
                Row(
                    mode,
                    budget,
                    s,
                    s.steps_per_s / base.steps_per_s,
                    s.energy_per_token_j / base.energy_per_token_j,
                    bound,
                )
            )
    return rows, idle_w


def summarise(rows: Sequence[Row], idle_w: float, seconds: float) -> tuple[str, bool]:
    """The side-by-side table and the target checks; returns (text, all targets met)."""
    base = rows[0].stats
    lines = [
        "Budgets held: one simulated training job on a simulated H100 SXM, in VIRTUAL time",
        "(the daemon's job service and budget loop against the simulator via bench/simjob.py;",
        "no daemon process, no real training process, no real timer).",
        f"Unconstrained: {base.mean_power_w:.1f} W, {base.steps_per_s:.3f} steps/s, "
        f"{base.energy_per_token_j * 1000:.2f} mJ/token; idle {idle_w:.0f} W; "
        f"{seconds:.0f} s per run.",
        "",
        "within = share of 10 s windows <= budget + 2 % after settling; thr / J/tok relative",
        "to unconstrained; settle in s; bound = pacing bound (B - P_idle) / (P_unc - P_idle).",
        "",
    ]
    head = f"{'budget':>7} {'bound':>6} |"
    for mode in MODES:
        head += f" {mode + ': within':>14} {'thr':>6} {'J/tok':>6} {'settle':>6} |"
    lines += [head, "-" * len(head)]
    by = {(r.mode, r.budget_w): r for r in rows}
    ok = True
    checks: list[str] = []
    for budget in BUDGETS_W:
        bound = by[("hw", budget)].pacing_bound_rel or 0.0
        line = f"{budget:>6.0f}W {bound:>6.3f} |"
        for mode in MODES:
            r = by[(mode, budget)]
            line += (
                f" {r.stats.within_share:>14.1%} {r.throughput_rel:>6.3f} "
                f"{r.energy_per_token_rel:>6.3f} {r.stats.settle_s:>6.0f} |"
            )
        lines.append(line)
        soft = by[("soft", budget)]
        hw, clock = by[("hw", budget)], by[("clock", budget)]
        soft_share = soft.throughput_rel / bound
        gap = abs(hw.throughput_rel / clock.throughput_rel - 1.0)
        held = all(
            by[(m, budget)].stats.within_share >= 0.99
            and by[(m, budget)].stats.settle_s <= SETTLE_MAX_S
            for m in MODES
        )
        for name, good, text in (
            ("soft >= 90% of the pacing bound", soft_share >= 0.90, f"{soft_share:.1%}"),
            ("hw and clock within 3%", gap <= 0.03, f"{gap:.2%} apart"),
            ("every mode: >= 99% of windows, settle <= 15 s", held, "yes" if held else "NO"),
        ):
            ok &= good
            checks.append(f"  {budget:.0f} W: {name}: {text} -> {'met' if good else 'MISSED'}")
    lines += ["", "Targets:", *checks, "", "all targets met" if ok else "SOME TARGETS MISSED"]
    return "\n".join(lines) + "\n", ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=300.0, help="virtual seconds per run")
    parser.add_argument(
        "--measure-from", type=float, default=20.0, help="throughput/energy measured from (s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sensor noise seed")
    parser.add_argument("--json", type=Path, default=RESULTS / "budget.json", help="JSON output")
    parser.add_argument("--table", type=Path, default=RESULTS / "budget.txt", help="table output")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.seconds < args.measure_from + 30:
        parser.error("--seconds must be at least --measure-from + 30")
    started = time.perf_counter()
    rows, idle_w = run_all(args.seconds, args.measure_from, args.seed)
    table, ok = summarise(rows, idle_w, args.seconds)
    table += f"\n(simulated in {time.perf_counter() - started:.1f} s of wall time)\n"
    print(table, end="")
    for out in (args.table, args.json):
        out.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(table, encoding="utf-8")
    args.json.write_text(json.dumps([r.to_json() for r in rows], indent=1) + "\n", "utf-8")
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
