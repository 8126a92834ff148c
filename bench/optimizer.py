"""Benchmark: our energy optimiser against Zeus and the oracle, on replayed measured traces.

For every (workload, batch size) of every trace file, one simulated job of ``--epochs`` epochs
runs on a ``ReplayBackend`` (same seed, same noise model for every policy) under:

* ``max``: the maximum power limit throughout;
* ``zeus``: Zeus's ``GlobalPowerLimitOptimizer`` (the zeus package when it runs here, else our
  re-implementation of its published policy, labelled as such), 25 W steps from the top,
  10 warm-up + 40 measured steps per limit, interrupted by epoch ends as in Zeus;
* ``ours``: ``energy.optimizer.EnergyOptimizer`` with the ``ZeusCost`` objective;
* ``oracle``: the limit that minimises the cost on the trace's own (interpolated, noise-free)
  curve, held from the first step, with no profiling.

Cost is Zeus's ``eta * E + (1 - eta) * P_max * T`` over the whole job (profiling included),
``P_max`` the top power limit; regret is a policy's cost over the oracle's, minus one. Profiling
energy and time are what a policy spent from its first probe to its decision (warm-ups included;
Zeus's interrupted windows and the steps at the maximum limit between them included), and for
ours also the challengers it measures after the search against the held setting, with the
warm-ups there and back. The steps ours runs at the setting it holds are not profiling, although
they measure that setting further and may revise the choice (``rv``: revisions): the job would
run them at that setting anyway, as Zeus's job runs at its choice.

Usage: ``python bench/optimizer.py [--trace FILE|NAME ...] [--eta 0.5] [--epochs 100]
[--seeds 0-9] [--workers 2] [--config FIELD=NUMBER ...] [--json PATH]`` (``--trace`` takes files
or bundled trace names, default ``a40 p100``; ``--config`` changes ``SearchConfig`` fields for
ours). Writes ``bench/results/optimizer.txt`` (the table) and
``bench/results/optimizer.json`` (one row per job, policy and seed). With ``--seeds``, the tables
are the first seed's, and the robustness targets are judged over every workload-seed (a workload:
one GPU's dataset/network, its batch sizes summed): ours at or below zeus's total cost on at
least 99 % of them, mean regret under 1 %, profiling energy at most half of zeus's.
``--write-synthetic PATH [--shape physical|flat]`` writes a held-out trace of another curve shape
(``flat``: memory-bound curves with bumps as large as their slope) to check generalisation.

``--joint`` is the micro-batch lever: one job per workload at a fixed global batch (gradient
accumulation keeps it), trained in micro-batches the trace measured (``joint_job_shape``), under
``max`` (the job's own micro-batch at the top limit), ``zeus`` and ``ours`` (the power limit at
the job's own micro-batch), ``ours_joint`` (``energy.optimizer.JointOptimizer``: micro-batch and
limit) and ``oracle_joint`` (the best pair on the noise-free curves); one row per (trace,
workload, policy) in ``bench/results/optimizer_joint.json``, with ``micro_batch``,
``power_limit_w``, ``energy_per_sample_j``, ``time_per_sample_s`` and ``profiling_energy_j``.
It runs on any trace file of the same format.

Steps per epoch come from the public training-set sizes (``telemetry.backends.replay``); an
unknown dataset counts 100,000 samples per epoch. The replay's noise is a function of the seed
and the step indices alone, so every policy meets the same noise on the same steps however it
cuts them into runs: two policies at the same setting on the same steps pay the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._zeus import make_zeus, real_zeus_problem, zeus_version  # noqa: E402
from energy.optimizer import (  # noqa: E402
    EnergyOptimizer,
    JointOptimizer,
    SearchConfig,
    SettingSpace,
    ZeusCost,
)
from telemetry.backends.replay import (  # noqa: E402
    ReplayBackend,
    ReplayNoise,
    TraceCurve,
    load_trace,
    micro_batches_of,
    steps_per_epoch,
)
from telemetry.backends.traces import resolve_trace  # noqa: E402
from telemetry.clock import VirtualClock  # noqa: E402

#: The bundled measured traces the benchmark runs on unless ``--trace`` names others.
DEFAULT_TRACES = ("a40", "p100")
RESULTS = REPO / "bench" / "results"
POLICIES = ("max", "zeus", "ours", "oracle")


@dataclass(frozen=True, slots=True)
class Run:
    """One policy's simulated job. Energies in J, times in s, limits in mW."""

    trace: str
    gpu: str
    workload: str
    batch_size: int
    policy: str
    energy_j: float
    time_s: float
    cost: float
    regret: float
    profiling_energy_j: float
    profiling_time_s: float
    zeus_is_reimplementation: bool
    limit_mw: int | None
    probes: int
    steps: int
    note: str = ""
    revisions: int = 0
    seed: int = 0


@dataclass(slots=True)
class _Job:
    """A simulated job on a fresh replayed GPU."""

    backend: ReplayBackend
    clock: VirtualClock
    total_steps: int
    steps_per_epoch: int
    done_steps: int = 0

    @property
    def remaining(self) -> int:
        return self.total_steps - self.done_steps

    def set_limit(self, limit_mw: int) -> None:
        if self.backend.power_limit_mw(0) != limit_mw:
            self.backend.set_power_limit(0, limit_mw)

    def run(self, steps: int) -> tuple[float, float]:
        """Run steps; their seconds and joules."""
        e0 = self.backend.energy_mj(0)
        dt = self.backend.run_steps(steps)
        self.done_steps += steps
        return dt, (self.backend.energy_mj(0) - e0) / 1000.0

    def to_epoch_end(self) -> int:
        left = self.steps_per_epoch - self.done_steps % self.steps_per_epoch
        return min(left, self.remaining)


def _new_job(path: Path, curve: TraceCurve, epochs: int, seed: int) -> _Job:
    clock = VirtualClock()
    backend = ReplayBackend(
        path, curve.workload, curve.batch_size, optimizer=curve.optimizer, clock=clock, seed=seed,
        gpu_name=curve.gpu,
    )
    spe = backend.steps_per_epoch
    return _Job(backend, clock, epochs * spe, spe)


def _steps_to_run(opt: EnergyOptimizer | JointOptimizer, job: _Job) -> int:
    """Like Zeus's callbacks: every step while searching; once done, the optimiser's monitoring
    windows (cut at epoch ends), whole epochs when it can no longer revise."""
    if not opt.done:
        return 1
    if opt.settled:
        return job.to_epoch_end()
    return min(opt.steps_wanted, job.to_epoch_end())


def oracle_limit_mw(curve: TraceCurve, eta: float, max_power_w: float) -> int:
    """The limit (1 W grid) with the least cost per epoch on the noise-free trace curve."""
    lo, hi = round(curve.limits_w[0]), round(curve.limits_w[-1])
    best_w, best = hi, math.inf
    for w in range(hi, lo - 1, -1):
        t, p = curve.at(w)
        c = t * (eta * p + (1.0 - eta) * max_power_w)
        if c < best - 1e-12:
            best_w, best = w, c
    return best_w * 1000


def _run_fixed(job: _Job, limit_mw: int) -> None:
    job.set_limit(limit_mw)
    while job.remaining > 0:
        job.run(job.to_epoch_end())


def _run_ours(
    job: _Job, eta: float, max_power_w: float, config: SearchConfig | None
) -> tuple[float, float, int, int, str, int]:
    info = job.backend.devices()[0]
    assert info.min_limit_mw is not None and info.max_limit_mw is not None
    opt = EnergyOptimizer(
        SettingSpace.power_limits(info.min_limit_mw, info.max_limit_mw),
        ZeusCost(eta, max_power_w),
        config,
    )
    while job.remaining > 0:
        job.set_limit(opt.setting)
        steps = _steps_to_run(opt, job)
        dt, de = job.run(steps)
        opt.observe(steps, dt, de)
    res = opt.result
    note = res.reason if res is not None else "the job ended before the search finished"
    revisions = res.revisions if res is not None else 0
    return (opt.profiling_energy_j, opt.profiling_time_s, opt.setting, len(opt.probes), note,
            revisions)


def _run_zeus(job: _Job, eta: float, use_package: bool) -> tuple[float, float, int, int, str]:
    policy = make_zeus(job.backend, job.clock, eta, use_package)
    prof_e = prof_t = 0.0
    started = False
    try:
        while job.remaining > 0 and policy.phase != "done":
            policy.on_step_begin()
            phase: str = policy.phase
            started = started or phase in ("warmup", "profiling")
            dt, de = job.run(1)
            if started and phase != "done":
                prof_e, prof_t = prof_e + de, prof_t + dt
            if job.done_steps % job.steps_per_epoch == 0:
                policy.on_epoch_end()
        chosen = policy.chosen_limit_mw
        while job.remaining > 0:
            job.run(job.to_epoch_end())  # Zeus's callbacks do nothing once it is done
        probes = len(range(job.backend.devices()[0].max_limit_mw or 0,
                           (job.backend.devices()[0].min_limit_mw or 0) - 1, -25_000))
        if chosen is None:
            note = "never finished profiling: a 51-step window does not fit in an epoch"
            return prof_e, prof_t, job.backend.power_limit_mw(0), probes, note
        return prof_e, prof_t, chosen, probes, ""
    finally:
        policy.close()


def run_curve(
    path: Path,
    curve: TraceCurve,
    eta: float,
    epochs: int,
    seed: int,
    use_package: bool,
    config: SearchConfig | None = None,
) -> list[Run]:
    """Every policy on one (workload, batch size) curve."""
    info_job = _new_job(path, curve, epochs, seed)
    info = info_job.backend.devices()[0]
    assert info.max_limit_mw is not None
    max_power_w = info.max_limit_mw / 1000.0
    oracle = oracle_limit_mw(curve, eta, max_power_w)
    out: dict[str, tuple[float, float, float, float, int | None, int, str, int]] = {}
    for policy in POLICIES:
        job = _new_job(path, curve, epochs, seed)
        e0, t0 = job.backend.energy_mj(0), job.clock.now()
        prof_e = prof_t = 0.0
        limit: int | None
        probes, note, revisions = 0, "", 0
        if policy == "max":
            limit = info.max_limit_mw
            _run_fixed(job, limit)
        elif policy == "oracle":
            limit = oracle
            _run_fixed(job, limit)
        elif policy == "ours":
            prof_e, prof_t, limit, probes, note, revisions = _run_ours(
                job, eta, max_power_w, config)
        else:
            prof_e, prof_t, limit, probes, note = _run_zeus(job, eta, use_package)
        energy = (job.backend.energy_mj(0) - e0) / 1000.0
        elapsed = job.clock.now() - t0
        out[policy] = (energy, elapsed, prof_e, prof_t, limit, probes, note, revisions)
    oracle_cost = _cost(out["oracle"][0], out["oracle"][1], eta, max_power_w)
    runs = []
    for policy, (energy, elapsed, prof_e, prof_t, limit, probes, note, revisions) in out.items():
        cost = _cost(energy, elapsed, eta, max_power_w)
        runs.append(Run(
            trace=path.name, gpu=curve.gpu, workload=curve.workload,
            batch_size=curve.batch_size, policy=policy, energy_j=energy, time_s=elapsed,
            cost=cost, regret=cost / oracle_cost - 1.0, profiling_energy_j=prof_e,
            profiling_time_s=prof_t, zeus_is_reimplementation=not use_package, limit_mw=limit,
            probes=probes, steps=info_job.total_steps, note=note, revisions=revisions,
            seed=seed,
        ))
    return runs


def _cost(energy_j: float, time_s: float, eta: float, max_power_w: float) -> float:
    return eta * energy_j + (1.0 - eta) * max_power_w * time_s


# -- reporting ------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100.0 * x:+.1f}%"


def summarise(runs: Sequence[Run], eta: float, epochs: int, zeus_label: str) -> tuple[str, bool]:
    """The human-readable table and whether every acceptance target was met."""
    by_job: dict[tuple[str, str, str, int], dict[str, Run]] = defaultdict(dict)
    for r in runs:
        by_job[(r.trace, r.gpu, r.workload, r.batch_size)][r.policy] = r
    lines = [
        f"powertrain energy optimiser vs Zeus and the oracle: eta = {eta}, {epochs} epochs per job",
        f"zeus: {zeus_label}",
        "",
        "Per job (saved/slowdown against the maximum limit; regret against the oracle's cost;",
        "prof = energy spent profiling, kJ; #pr = settings probed; rv = revisions once done;",
        "limits in W):",
        f"{'gpu':5} {'workload':32} {'bs':>6} | {'max W':>5} | "
        f"{'zeus W':>6} {'saved':>7} {'slow':>7} {'regret':>7} {'prof':>8} | "
        f"{'ours W':>6} {'saved':>7} {'slow':>7} {'regret':>7} {'prof':>8} {'#pr':>3} {'rv':>2} | "
        f"{'orcl W':>6} {'saved':>7}",
    ]
    for (_, gpu, wl, bs), pol in sorted(by_job.items()):
        m, z, o, orc = pol["max"], pol["zeus"], pol["ours"], pol["oracle"]

        def cols(r: Run, m: Run = m) -> str:
            return (f"{(r.limit_mw or 0) / 1000:6.0f} {_pct(1 - r.energy_j / m.energy_j):>7} "
                    f"{_pct(r.time_s / m.time_s - 1):>7} {_pct(r.regret):>7} "
                    f"{r.profiling_energy_j / 1000:8.1f}")

        lines.append(
            f"{gpu:5} {wl:32} {bs:6d} | {(m.limit_mw or 0) / 1000:5.0f} | {cols(z)} | {cols(o)} "
            f"{o.probes:3d} {o.revisions:2d} | {(orc.limit_mw or 0) / 1000:6.0f} "
            f"{_pct(1 - orc.energy_j / m.energy_j):>7}"
            + ("  [zeus never finished profiling]" if z.note.startswith("never") else "")
        )

    lines += ["", "Per workload (sums over batch sizes):",
              f"{'gpu':5} {'workload':32} {'jobs':>4} | {'policy':6} {'saved':>7} {'slow':>7} "
              f"{'regret':>7} {'prof kJ':>9} {'prof h':>7} | {'ours<=zeus':>10}"]
    groups: dict[tuple[str, str], list[dict[str, Run]]] = defaultdict(list)
    for (_, gpu, wl, _), pol in sorted(by_job.items()):
        groups[(gpu, wl)].append(pol)
    all_cost_ok = True
    for (gpu, wl), jobs in groups.items():
        tot = {p: (sum(j[p].energy_j for j in jobs), sum(j[p].time_s for j in jobs),
                   sum(j[p].cost for j in jobs), sum(j[p].profiling_energy_j for j in jobs),
                   sum(j[p].profiling_time_s for j in jobs)) for p in POLICIES}
        ok = tot["ours"][2] <= tot["zeus"][2]
        all_cost_ok &= ok
        for p in ("zeus", "ours", "oracle"):
            e, t, c, pe, pt = tot[p]
            lines.append(
                f"{gpu:5} {wl:32} {len(jobs):4d} | {p:6} {_pct(1 - e / tot['max'][0]):>7} "
                f"{_pct(t / tot['max'][1] - 1):>7} {_pct(c / tot['oracle'][2] - 1):>7} "
                f"{pe / 1000:9.1f} {pt / 3600:7.2f} | "
                + (("yes" if ok else "NO") if p == "ours" else "")
            )

    ours = [j["ours"] for j in by_job.values()]
    zeus = [j["zeus"] for j in by_job.values()]
    finished = [(j["ours"], j["zeus"]) for j in by_job.values() if not j["zeus"].note]
    mean_regret_ours = statistics.fmean(r.regret for r in ours)
    mean_regret_zeus = statistics.fmean(r.regret for r in zeus)
    prof_ours = sum(r.profiling_energy_j for r in ours)
    prof_zeus = sum(r.profiling_energy_j for r in zeus)
    prof_ours_f = sum(o.profiling_energy_j for o, _ in finished)
    prof_zeus_f = sum(z.profiling_energy_j for _, z in finished)
    prof_ratio_f = prof_ours_f / max(prof_zeus_f, 1e-9)
    prof_ok = prof_ours <= 0.5 * prof_zeus and prof_ratio_f <= 0.5
    regret_ok = mean_regret_ours < 0.01

    def saved(rs: Sequence[Run], ref: Sequence[Run]) -> str:
        return _pct(1 - sum(r.energy_j for r in rs) / sum(r.energy_j for r in ref))

    def median_saved(policy: str) -> str:
        return _pct(statistics.median(
            1 - j[policy].energy_j / j["max"].energy_j for j in by_job.values()
        ))

    maxes = [j["max"] for j in by_job.values()]
    oracles = [j["oracle"] for j in by_job.values()]
    lines += [
        "",
        f"Overall ({len(ours)} jobs):",
        f"  energy saved against max: zeus {saved(zeus, maxes)}, ours {saved(ours, maxes)}, "
        f"oracle {saved(oracles, maxes)}",
        f"  median energy saved per job: zeus {median_saved('zeus')}, ours "
        f"{median_saved('ours')}, oracle {median_saved('oracle')}",
        f"  mean regret: zeus {_pct(mean_regret_zeus)}, ours {_pct(mean_regret_ours)}; "
        f"max regret: zeus {_pct(max(r.regret for r in zeus))}, "
        f"ours {_pct(max(r.regret for r in ours))}",
        f"  profiling energy: zeus {prof_zeus / 1e6:.2f} MJ, ours {prof_ours / 1e6:.2f} MJ "
        f"(ratio {prof_ours / prof_zeus:.2f}); on the {len(finished)} jobs where zeus finished "
        f"profiling: ratio {prof_ratio_f:.2f}",
        f"  profiling time: zeus {sum(r.profiling_time_s for r in zeus) / 3600:.1f} h, ours "
        f"{sum(r.profiling_time_s for r in ours) / 3600:.1f} h; probes per job: zeus "
        f"{statistics.fmean(r.probes for r in zeus):.1f}, ours "
        f"{statistics.fmean(r.probes for r in ours):.1f}; ours revised its choice on "
        f"{sum(r.revisions > 0 for r in ours)} jobs ({sum(r.revisions for r in ours)} revisions)",
        "",
        "Acceptance (eta = 0.5 on the given traces):",
        f"  [{'PASS' if all_cost_ok else 'FAIL'}] ours' total cost <= zeus's on every workload",
        f"  [{'PASS' if regret_ok else 'FAIL'}] ours' mean regret against the oracle < 1% "
        f"({_pct(mean_regret_ours)})",
        f"  [{'PASS' if prof_ok else 'FAIL'}] ours' profiling energy <= half of zeus's, over all "
        f"jobs and over those where zeus finished profiling (ratios {prof_ours / prof_zeus:.2f}, "
        f"{prof_ratio_f:.2f})",
    ]
    return "\n".join(lines) + "\n", all_cost_ok and regret_ok and prof_ok


def seed_line(seed: int, runs: Sequence[Run]) -> str:
    """One seed's acceptance numbers in a line: workloads at or below zeus's total cost (and the
    others, with ours' cost against zeus's), mean regrets, profiling energy ratios."""
    by_wl: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in runs:
        by_wl[(r.gpu, r.workload)][r.policy] += r.cost
    misses = [f"{gpu} {wl} {_pct(c['ours'] / c['zeus'] - 1)}"
              for (gpu, wl), c in sorted(by_wl.items()) if c["ours"] > c["zeus"]]
    ours = [r for r in runs if r.policy == "ours"]
    zeus = {(r.trace, r.workload, r.batch_size): r for r in runs if r.policy == "zeus"}
    fin = [r for r in ours if not zeus[(r.trace, r.workload, r.batch_size)].note]
    ratio = sum(r.profiling_energy_j for r in ours) / sum(z.profiling_energy_j
                                                         for z in zeus.values())
    ratio_f = sum(r.profiling_energy_j for r in fin) / max(1e-9, sum(
        zeus[(r.trace, r.workload, r.batch_size)].profiling_energy_j for r in fin))
    return (
        f"  seed {seed:2d}: ours <= zeus on {len(by_wl) - len(misses)}/{len(by_wl)} workloads; "
        f"mean regret ours {_pct(statistics.fmean(r.regret for r in ours))}, zeus "
        f"{_pct(statistics.fmean(z.regret for z in zeus.values()))}; profiling energy ratio "
        f"{ratio:.2f} (zeus-finished jobs {ratio_f:.2f})"
        + (f"; above zeus: {', '.join(misses)}" if misses else "")
    )


def robustness(runs: Sequence[Run]) -> tuple[list[str], bool]:
    """Acceptance over every seed: ours at or below zeus's total cost on at least 99 % of
    workload-seeds, mean regret under 1 %, profiling energy at most half of zeus's (over all
    jobs, and over the jobs where zeus finished profiling)."""
    by_wl: dict[tuple[int, str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in runs:
        by_wl[(r.seed, r.gpu, r.workload)][r.policy] += r.cost
    misses = sorted(k for k, c in by_wl.items() if c["ours"] > c["zeus"])
    ours = [r for r in runs if r.policy == "ours"]
    zeus = {(r.seed, r.trace, r.workload, r.batch_size): r for r in runs if r.policy == "zeus"}
    fin = [r for r in ours if not zeus[(r.seed, r.trace, r.workload, r.batch_size)].note]
    prof = sum(r.profiling_energy_j for r in ours) / sum(
        z.profiling_energy_j for z in zeus.values())
    prof_f = sum(r.profiling_energy_j for r in fin) / max(1e-9, sum(
        zeus[(r.seed, r.trace, r.workload, r.batch_size)].profiling_energy_j for r in fin))
    regret = statistics.fmean(r.regret for r in ours)
    seeds = sorted({r.seed for r in runs})
    share = 1.0 - len(misses) / len(by_wl)
    cost_ok, regret_ok, prof_ok = share >= 0.99, regret < 0.01, prof <= 0.5 and prof_f <= 0.5
    lines = [
        f"Robustness over seeds {', '.join(map(str, seeds))} ({len(by_wl)} workload-seeds, "
        f"{len(ours)} jobs):",
        f"  [{'PASS' if cost_ok else 'FAIL'}] ours at or below zeus's total cost on "
        f"{len(by_wl) - len(misses)}/{len(by_wl)} workload-seeds ({100 * share:.1f}%, target "
        ">= 99%)" + ("; above: " + ", ".join(
            f"seed {sd} {g} {w} {_pct(by_wl[(sd, g, w)]['ours'] / by_wl[(sd, g, w)]['zeus'] - 1)}"
            for sd, g, w in misses) if misses else ""),
        f"  [{'PASS' if regret_ok else 'FAIL'}] mean regret ours {_pct(regret)} (zeus "
        f"{_pct(statistics.fmean(z.regret for z in zeus.values()))}; target < 1%); max "
        f"regret ours {_pct(max(r.regret for r in ours))}, zeus "
        f"{_pct(max(z.regret for z in zeus.values()))}",
        f"  [{'PASS' if prof_ok else 'FAIL'}] profiling energy ours / zeus {prof:.2f} over all "
        f"jobs, {prof_f:.2f} over those where zeus finished profiling (target <= 0.5)",
    ]
    return lines, cost_ok and regret_ok and prof_ok


def parse_seeds(text: str) -> list[int]:
    """``0-9``, ``0,3,5`` or a mix (``0-2,7``): the seeds, in order, without repeats."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a seed list: {text!r}") from None
        if first < 0 or last < first:
            raise argparse.ArgumentTypeError(f"not a seed range: {part!r}")
        seeds += [s for s in range(first, last + 1) if s not in seeds]
    return seeds


def run_seed(
    paths: Sequence[Path], eta: float, epochs: int, seed: int, use_package: bool,
    config: SearchConfig | None = None,
) -> list[Run]:
    """Every policy on every curve of the trace files, with one seed of the replay's noise."""
    runs: list[Run] = []
    for path in paths:
        for curve in load_trace(path):
            runs += run_curve(path, curve, eta, epochs, seed, use_package, config)
    return runs


def _run_seed_args(
    args: tuple[Sequence[Path], float, int, int, bool, SearchConfig | None],
) -> list[Run]:
    return run_seed(*args)


def _config_arg(text: str) -> tuple[str, float]:
    """A ``--config`` value: ``FIELD=NUMBER`` for a field of ``SearchConfig``."""
    types = {f.name: f.type for f in dataclasses.fields(SearchConfig)}
    name, sep, value = text.partition("=")
    if not sep or name not in types:
        raise argparse.ArgumentTypeError(
            f"not FIELD=NUMBER for a SearchConfig field: {text!r} (fields: {', '.join(types)})")
    try:
        return name, (int(value) if types[name] in ("int", int) else float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} takes a number, got {value!r}") from None


# -- the micro-batch lever (--joint) ---------------------------------------------------------------

JOINT_POLICIES = ("max", "zeus", "ours", "ours_joint", "oracle_joint")

#: Zeus's profiling window (warm-up and measurement) must fit in an epoch: a global batch leaves
#: at least this many steps per epoch.
MIN_STEPS_PER_EPOCH = 60


@dataclass(frozen=True, slots=True)
class JointRun:
    """One policy's job in ``--joint``: a workload at a fixed global batch, trained in
    micro-batches. Energies in J, times in s; per sample over the whole job (profiling
    included)."""

    trace: str
    gpu: str
    workload: str
    policy: str
    global_batch: int
    default_micro_batch: int
    micro_batch: int
    power_limit_w: float
    energy_per_sample_j: float
    time_per_sample_s: float
    profiling_energy_j: float
    cost: float
    regret: float
    seed: int
    note: str = ""


def joint_job_shape(
    curves: Sequence[TraceCurve], workload: str
) -> tuple[int, int, tuple[int, ...]]:
    """A workload's job in ``--joint``: its global batch, its own micro-batch, and the
    micro-batches it allows.

    The global batch is the largest batch size the trace measured whose epoch still holds
    ``MIN_STEPS_PER_EPOCH`` steps (the trace's largest when none does); the micro-batches are
    the measured batch sizes that divide it (they ran, so they fit); the job's own is the largest
    of them at most a quarter of the global batch (four micro-batches accumulated), else the
    smallest.
    """
    named = [c for c in curves if c.workload == workload]
    optimizer = named[0].optimizer
    sizes = sorted({c.batch_size for c in named if c.optimizer == optimizer})
    dataset = named[0].dataset
    fits = [b for b in sizes if steps_per_epoch(dataset, b) >= MIN_STEPS_PER_EPOCH]
    global_batch = fits[-1] if fits else sizes[-1]
    allowed = micro_batches_of(curves, workload, global_batch, optimizer)
    quarter = [m for m in allowed if 4 * m <= global_batch]
    return global_batch, quarter[-1] if quarter else allowed[0], allowed


def _new_joint_job(
    path: Path, curve: TraceCurve, global_batch: int, micro_batch: int, epochs: int, seed: int,
    noise: ReplayNoise | None = None,
) -> _Job:
    clock = VirtualClock()
    backend = ReplayBackend(
        path, curve.workload, global_batch, optimizer=curve.optimizer, clock=clock, seed=seed,
        gpu_name=curve.gpu, micro_batch=micro_batch, noise=noise,
    )
    spe = backend.steps_per_epoch
    return _Job(backend, clock, epochs * spe, spe)


def oracle_joint(
    path: Path, curve: TraceCurve, global_batch: int, default: int, eta: float,
    max_power_w: float,
) -> tuple[int, int]:
    """The micro-batch and limit (1 W grid) with the least cost per step on the noise-free
    curves."""
    job = _new_joint_job(path, curve, global_batch, default, 1, 0, ReplayNoise.off())
    b = job.backend
    info = b.devices()[0]
    assert info.min_limit_mw is not None and info.max_limit_mw is not None
    best, best_cost = (default, info.max_limit_mw), math.inf
    for m in b.micro_batches():
        b.set_micro_batch(m)
        for w in range(info.max_limit_mw // 1000, info.min_limit_mw // 1000 - 1, -1):
            b.set_power_limit(0, w * 1000)
            c = b.step_time_s() * (eta * b.power_w() + (1.0 - eta) * max_power_w)
            if c < best_cost - 1e-12:
                best, best_cost = (m, w * 1000), c
    return best


def _run_joint(
    job: _Job, eta: float, max_power_w: float, default: int
) -> tuple[float, int, str]:
    info = job.backend.devices()[0]
    assert info.min_limit_mw is not None and info.max_limit_mw is not None
    opt = JointOptimizer(
        SettingSpace.power_limits(info.min_limit_mw, info.max_limit_mw),
        ZeusCost(eta, max_power_w), job.backend.micro_batches(), default,
    )
    while job.remaining > 0:
        job.set_limit(opt.setting)
        if job.backend.micro_batch != opt.micro_batch:
            job.backend.set_micro_batch(opt.micro_batch)  # at a step boundary
        steps = _steps_to_run(opt, job)
        dt, de = job.run(steps)
        opt.observe(steps, dt, de)
    res = opt.result
    note = res.reason if res is not None else "the job ended before the search finished"
    return opt.profiling_energy_j, opt.setting, note


def run_joint_workload(
    path: Path, curves: Sequence[TraceCurve], workload: str, eta: float, epochs: int, seed: int,
    use_package: bool,
) -> list[JointRun]:
    """Every ``--joint`` policy on one workload of a trace."""
    curve = next(c for c in curves if c.workload == workload)
    global_batch, default, _ = joint_job_shape(curves, workload)
    probe_job = _new_joint_job(path, curve, global_batch, default, epochs, seed)
    info = probe_job.backend.devices()[0]
    assert info.max_limit_mw is not None
    max_power_w = info.max_limit_mw / 1000.0
    oracle = oracle_joint(path, curve, global_batch, default, eta, max_power_w)
    out: dict[str, tuple[float, float, float, int, int, str]] = {}
    for policy in JOINT_POLICIES:
        job = _new_joint_job(path, curve, global_batch, default, epochs, seed)
        e0, t0 = job.backend.energy_mj(0), job.clock.now()
        prof, note, limit = 0.0, "", info.max_limit_mw
        if policy == "max":
            _run_fixed(job, limit)
        elif policy == "oracle_joint":
            job.backend.set_micro_batch(oracle[0])
            _run_fixed(job, limit := oracle[1])
        elif policy == "zeus":  # its limit as chosen: zeus puts the maximum back at the end
            prof, _, limit, _, note = _run_zeus(job, eta, use_package)
        elif policy == "ours":
            prof, _, limit, _, note, _ = _run_ours(job, eta, max_power_w, None)
        else:
            prof, limit, note = _run_joint(job, eta, max_power_w, default)
        energy = (job.backend.energy_mj(0) - e0) / 1000.0
        out[policy] = (energy, job.clock.now() - t0, prof, job.backend.micro_batch, limit, note)
    samples = probe_job.total_steps * global_batch
    oracle_cost = _cost(out["oracle_joint"][0], out["oracle_joint"][1], eta, max_power_w)
    return [
        JointRun(
            trace=path.name, gpu=curve.gpu, workload=workload, policy=policy,
            global_batch=global_batch, default_micro_batch=default, micro_batch=m,
            power_limit_w=limit / 1000.0, energy_per_sample_j=energy / samples,
            time_per_sample_s=elapsed / samples, profiling_energy_j=prof,
            cost=_cost(energy, elapsed, eta, max_power_w),
            regret=_cost(energy, elapsed, eta, max_power_w) / oracle_cost - 1.0, seed=seed,
            note=note,
        )
        for policy, (energy, elapsed, prof, m, limit, note) in out.items()
    ]


def summarise_joint(runs: Sequence[JointRun], eta: float, epochs: int,
                    zeus_label: str) -> tuple[str, bool]:
    """``--joint``'s table and whether its targets were met: ours_joint saves more energy per
    sample than ours (median over workloads) and is within 1 % of oracle_joint (mean regret)."""
    by_wl: dict[tuple[str, str], dict[str, JointRun]] = defaultdict(dict)
    for r in runs:
        by_wl[(r.gpu, r.workload)][r.policy] = r
    lines = [
        f"Micro-batch and power limit, jointly: eta = {eta}, {epochs} epochs per job, one job per "
        "workload at a fixed global batch (gradient accumulation keeps it)",
        f"zeus: {zeus_label}",
        "",
        "mb = micro-batch (own: the job's own), W = power limit; saved = energy per sample "
        "against max; regret against oracle_joint's cost:",
        f"{'gpu':5} {'workload':32} {'global':>6} {'own':>5} | "
        + " | ".join(f"{p:>12} {'mb':>5} {'W':>4} {'saved':>7} {'regret':>7}"
                     for p in JOINT_POLICIES[1:]),
    ]
    for (gpu, wl), pol in sorted(by_wl.items()):
        m = pol["max"]
        lines.append(
            f"{gpu:5} {wl:32} {m.global_batch:6d} {m.default_micro_batch:5d} | "
            + " | ".join(
                f"{'':>12} {pol[p].micro_batch:5d} {pol[p].power_limit_w:4.0f} "
                f"{_pct(1 - pol[p].energy_per_sample_j / m.energy_per_sample_j):>7} "
                f"{_pct(pol[p].regret):>7}" for p in JOINT_POLICIES[1:])
        )

    def median_saved(policy: str) -> float:
        return statistics.median(1 - p[policy].energy_per_sample_j / p["max"].energy_per_sample_j
                                 for p in by_wl.values())

    saved = {p: median_saved(p) for p in JOINT_POLICIES[1:]}
    regret = {p: statistics.fmean(v[p].regret for v in by_wl.values()) for p in JOINT_POLICIES}
    slow = {p: statistics.median(v[p].time_per_sample_s / v["max"].time_per_sample_s - 1
                                 for v in by_wl.values()) for p in JOINT_POLICIES[1:]}
    saves_more = saved["ours_joint"] > saved["ours"]
    close = regret["ours_joint"] < 0.01
    moved = sum(v["ours_joint"].micro_batch != v["ours_joint"].default_micro_batch
                for v in by_wl.values())
    prof = {p: sum(v[p].profiling_energy_j for v in by_wl.values()) for p in JOINT_POLICIES}
    lines += [
        "",
        f"Overall ({len(by_wl)} workloads):",
        "  median energy saved per sample against max: "
        + ", ".join(f"{p} {_pct(saved[p])}" for p in JOINT_POLICIES[1:]),
        "  median time per sample against max: "
        + ", ".join(f"{p} {_pct(slow[p])}" for p in JOINT_POLICIES[1:]),
        "  mean regret against oracle_joint: "
        + ", ".join(f"{p} {_pct(regret[p])}" for p in JOINT_POLICIES),
        f"  ours_joint moved the micro-batch on {moved}/{len(by_wl)} workloads; profiling "
        f"energy ours_joint / ours {prof['ours_joint'] / max(1e-9, prof['ours']):.2f}, "
        f"ours_joint / zeus {prof['ours_joint'] / max(1e-9, prof['zeus']):.2f}",
        "",
        "Acceptance:",
        f"  [{'PASS' if saves_more else 'FAIL'}] ours_joint saves more energy per sample than "
        f"ours (median {_pct(saved['ours_joint'])} against {_pct(saved['ours'])})",
        f"  [{'PASS' if close else 'FAIL'}] ours_joint within 1% of oracle_joint (mean regret "
        f"{_pct(regret['ours_joint'])})",
    ]
    return "\n".join(lines) + "\n", saves_more and close


def write_synthetic_trace(path: Path, seed: int = 12345, shape: str = "physical") -> None:
    """A held-out trace in the same format, from a curve shape the real traces do not have
    (``shape="flat"``: ``write_flat_trace``'s flat, rough curves instead).

    An imaginary 700 W GPU ("SYN700", limits 200-700 W in 50 W steps, not Zeus's 25 W grid),
    after the simulator's model: ``P(f) = P_static + a P_dyn (f/f_max)^k`` and
    ``t(f) = t_max (c f_max/f + 1 - c)``, the clock set by the limit, with eight workloads of
    random activity, exponent and compute share, and 1.5 % multiplicative run-to-run noise on
    every time and power (the real traces have such noise). Nothing here is fitted to the
    A40/P100 traces; it checks that the optimiser is not tuned to them.
    """
    if shape == "flat":
        write_flat_trace(path, seed)
        return
    rng = random.Random(seed)
    rows = ["dataset,network,batch_size,optimizer,power_limit,time_per_epoch,average_power"]
    for w in range(8):
        p_static = rng.uniform(80.0, 160.0)
        p_dyn = rng.uniform(150.0, 560.0) * rng.uniform(0.4, 1.0)  # activity times P_dyn_max
        k = rng.uniform(2.3, 3.2)
        c = rng.uniform(0.3, 0.95)
        for batch_size in (16, 64, 256):
            t_max = rng.uniform(50.0, 3000.0) * (256 / batch_size) ** 0.3
            for limit in range(200, 701, 50):
                top = p_static + p_dyn
                power = min(float(limit) * rng.uniform(0.9, 0.97), top)
                f = max(0.15, ((power - p_static) / p_dyn) ** (1 / k)) if power > p_static else 0.15
                t = t_max * (c / f + 1 - c) * rng.gauss(1.0, 0.015)
                p = max(p_static, power) * rng.gauss(1.0, 0.015)
                rows.append(f"synth{w},net{w},{batch_size},sgd,{limit},{t:.3f},{p:.3f}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def write_flat_trace(path: Path, seed: int = 12345) -> None:
    """A held-out trace of flat, rough curves, where a top-down walk is easily fooled.

    An imaginary 300 W GPU ("FLAT", limits 100-300 W in 25 W steps) running memory-bound
    workloads: the same model as ``write_synthetic_trace`` with a compute share ``c`` of at most
    0.15, so the step time hardly changes with the limit until the clock floor near the bottom,
    and 3 % run-to-run noise on every time and power (twice the other synthetic trace's), so the
    measured curve has bumps as large as its slope.
    """
    rng = random.Random(seed)
    rows = ["dataset,network,batch_size,optimizer,power_limit,time_per_epoch,average_power"]
    for w in range(8):
        p_static = rng.uniform(60.0, 110.0)
        p_dyn = rng.uniform(150.0, 230.0)
        k = rng.uniform(2.3, 3.2)
        c = rng.uniform(0.0, 0.15)
        for batch_size in (32, 128, 512):
            t_max = rng.uniform(50.0, 1500.0) * (512 / batch_size) ** 0.3
            for limit in range(100, 301, 25):
                power = min(float(limit) * rng.uniform(0.9, 0.97), p_static + p_dyn)
                f = max(0.15, ((power - p_static) / p_dyn) ** (1 / k)) if power > p_static else 0.15
                t = t_max * (c / f + 1 - c) * rng.gauss(1.0, 0.03)
                p = max(p_static, power) * rng.gauss(1.0, 0.03)
                rows.append(f"flat{w},net{w},{batch_size},sgd,{limit},{t:.3f},{p:.3f}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def _trace_arg(text: str) -> Path:
    """A ``--trace`` value: a bundled trace name or a file (argparse reports a bad one)."""
    try:
        return resolve_trace(text)
    except LookupError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--trace", type=_trace_arg, nargs="+",
                        default=[resolve_trace(name) for name in DEFAULT_TRACES],
                        help="trace files (dataset,network,batch_size,optimizer,power_limit,"
                             "time_per_epoch,average_power) or bundled trace names "
                             f"(default: {' '.join(DEFAULT_TRACES)})")
    parser.add_argument("--eta", type=float, default=0.5, help="Zeus's eta (energy weight)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs per simulated job")
    parser.add_argument("--seed", type=int, default=0, help="seed of the replayed noise")
    parser.add_argument("--more-seeds", type=int, nargs="*", default=[], metavar="SEED",
                        help="also run these seeds and add one acceptance line per seed")
    parser.add_argument("--seeds", type=parse_seeds, metavar="LIST",
                        help="run every seed of a list (0-9, 0,3,5): the tables for the first, "
                             "one line per seed, and the robustness targets over all of them")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that run seeds side by side (default 1)")
    parser.add_argument("--zeus", choices=("auto", "package", "reimplementation"),
                        default="auto", help="the zeus package if it runs (auto), or which")
    parser.add_argument("--json", type=Path, default=RESULTS / "optimizer.json",
                        help="where to write one JSON object per job and policy")
    parser.add_argument("--table", type=Path, default=RESULTS / "optimizer.txt",
                        help="where to write the human-readable table")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when an acceptance target is missed")
    parser.add_argument("--joint", action="store_true",
                        help="the micro-batch lever: one job per workload at a fixed global "
                             "batch, policies max, zeus, ours, ours_joint, oracle_joint "
                             "(writes bench/results/optimizer_joint.json/.txt by default)")
    parser.add_argument("--config", type=_config_arg, nargs="+", default=[],
                        metavar="FIELD=NUMBER",
                        help="run ours with these SearchConfig fields changed (e.g. "
                             "budget_steps_per_candidate=50), to see what a search costs and "
                             "gains at other settings")
    parser.add_argument("--write-synthetic", type=Path, metavar="PATH",
                        help="write a held-out synthetic trace (another curve shape) and exit")
    parser.add_argument("--shape", choices=("physical", "flat"), default="physical",
                        help="the synthetic trace's curves: the simulator's model, or flat and "
                             "rough (memory-bound, 3%% run-to-run noise)")
    args = parser.parse_args(argv)
    if args.write_synthetic is not None:
        write_synthetic_trace(args.write_synthetic, shape=args.shape)
        print(f"wrote {args.write_synthetic}")
        return 0
    if not 0.0 <= args.eta <= 1.0 or args.epochs < 1:
        parser.error("need 0 <= --eta <= 1 and --epochs >= 1")

    try:
        config = SearchConfig(**dict(args.config))
    except ValueError as exc:
        parser.error(f"--config: {exc}")
    if args.config and args.joint:
        parser.error("--config applies to the power-limit runs, not to --joint")

    problem = real_zeus_problem() if args.zeus != "reimplementation" else "asked for"
    if args.zeus == "package" and problem is not None:
        parser.error(problem)
    use_package = problem is None
    zeus_label = (
        f"the zeus package {zeus_version()} (GlobalPowerLimitOptimizer + ZeusMonitor on faked "
        "NVML/clock boundaries)" if use_package
        else f"RE-IMPLEMENTATION of Zeus's published policy (bench/_zeus.py): {problem}"
    )

    started = time.perf_counter()
    if args.joint:
        return _main_joint(args, use_package, zeus_label, started)
    seeds = args.seeds or [args.seed, *(s for s in args.more_seeds if s != args.seed)]
    jobs = [(args.trace, args.eta, args.epochs, seed, use_package, config) for seed in seeds]
    if args.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(args.workers, len(jobs))) as pool:
            per_seed = list(pool.map(_run_seed_args, jobs))
    else:
        per_seed = [_run_seed_args(job) for job in jobs]
    runs = per_seed[0]
    table, ok = summarise(runs, args.eta, args.epochs, zeus_label)
    if args.config:
        changed = ", ".join(f"{name}={value}" for name, value in args.config)
        table = f"ours with SearchConfig({changed})\n" + table
    if len(seeds) > 1:
        lines = ["", f"Per seed (the tables above are seed {seeds[0]}; the replay's noise "
                 "differs by seed):"]
        lines += [seed_line(seed, seed_runs) for seed, seed_runs in zip(seeds, per_seed,
                                                                          strict=True)]
        robust, robust_ok = robustness([r for seed_runs in per_seed for r in seed_runs])
        lines += ["", *robust]
        table += "\n".join(lines) + "\n"
        ok = ok and robust_ok
        runs = [r for seed_runs in per_seed for r in seed_runs]
    table += f"\n(simulated in {time.perf_counter() - started:.0f} s of wall time)\n"
    print(table, end="")
    for out in (args.table, args.json):
        out.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(table, encoding="utf-8")
    args.json.write_text(
        json.dumps([asdict(r) for r in runs], indent=1) + "\n", encoding="utf-8"
    )
    return 0 if ok or not args.strict else 1


def _main_joint(
    args: argparse.Namespace, use_package: bool, zeus_label: str, started: float
) -> int:
    json_path = args.json if args.json != RESULTS / "optimizer.json" else (
        RESULTS / "optimizer_joint.json")
    table_path = args.table if args.table != RESULTS / "optimizer.txt" else (
        RESULTS / "optimizer_joint.txt")
    runs: list[JointRun] = []
    for seed in args.seeds or [args.seed]:
        for path in args.trace:
            curves = load_trace(path)
            for workload in sorted({c.workload for c in curves}):
                runs += run_joint_workload(path, curves, workload, args.eta, args.epochs, seed,
                                           use_package)
    first = [r for r in runs if r.seed == runs[0].seed]
    table, ok = summarise_joint(first, args.eta, args.epochs, zeus_label)
    table += f"\n(simulated in {time.perf_counter() - started:.0f} s of wall time)\n"
    print(table, end="")
    for out in (table_path, json_path):
        out.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(table, encoding="utf-8")
    json_path.write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n",
                         encoding="utf-8")
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
