"""Calibrate the simulated GPU on measured power-limit traces, and report how well it fits.

Reads traces in the Zeus NSDI'23 format (``summary_power_<gpu>.csv``: ``dataset, network,
batch_size, [optimizer,] power_limit, time_per_epoch, average_power``). Per file (one GPU) it fits
the GPU-level model parameters (static power, ``k``) jointly with one workload per
(dataset, network, batch size), then prints, per workload, the relative error of the predicted time
per epoch and average power at each power limit (evaluated with the simulator's own discrete-clock
model), the median absolute error and the worst case, and overall medians at the end.

The GPU name comes from the file name and maps to a SKU profile (``telemetry/backends/profiles``)
when one is known; otherwise the fit is generic (power-limit range from the file, nominal clocks).

**Micro-batch term.** Every (dataset, network) family runs the same epoch at several batch sizes,
so time and energy per epoch are comparable across them. Per family, ``fit_micro_batch`` fits the
micro-batch term (overhead batch ``m_h``, activity exponent ``beta``; ``energy.gpu_model``) to the
per-batch-size fits' time and power at ``f_max`` (which use every power limit). The report gives
the term's own error there, and the end-to-end error at every measured limit of the family's
reference workload (the fit at its middle batch size ``m0``, the lower median of the measured ones)
run at micro-batches ``m / m0`` times its own. Approximation: each trace iteration includes one
optimizer update, which gradient accumulation does once per global batch, so the fitted overhead
includes the update and overstates the cost of small micro-batches. The generic ``training``
workload takes the median over families of the overhead share at ``m0``, ``m_h / (m0 + m_h)``,
and the median ``beta``; each fitted workload ``<SKU>/<dataset>/<network>/bs<m>`` takes its family's
``beta`` and ``m_h / (m + m_h)``.

    python bench/calibrate_sim.py                  # every bundled trace (a40, p100)
    python bench/calibrate_sim.py --trace x.csv --json out.json  # or --trace a40
    python bench/calibrate_sim.py --write-profiles # update profiles/skus.json, workloads.json
    python bench/calibrate_sim.py --write-micro-batch  # only the micro-batch terms, workloads.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from energy.gpu_model import (  # noqa: E402
    GpuModel,
    MeasuredPoint,
    MicroBatchFit,
    MicroBatchPoint,
    WorkloadModel,
    at_micro_batch,
    fit_gpu,
    fit_micro_batch,
    power_at_clock_w,
    relative_errors,
)
from telemetry.backends.profiles import (  # noqa: E402
    SKUS_PATH,
    WORKLOADS_PATH,
    SkuProfile,
    Workload,
    find_sku,
    sku_to_json,
    workload_to_json,
)
from telemetry.backends.traces import bundled_trace_paths, resolve_trace  # noqa: E402

TARGET_MEDIAN_ERROR = 0.05
_REQUIRED = ("dataset", "network", "batch_size", "power_limit", "time_per_epoch", "average_power")
#: Nominal SM clocks for a GPU without a SKU profile: only their ratio matters to the fit.
_GENERIC_CLOCKS_MHZ = (210.0, 1500.0, 15.0)

GroupKey = tuple[str, str, int]


@dataclass(frozen=True)
class GroupResult:
    """Fit quality of one (GPU, workload, batch size)."""

    gpu: str
    sku: str
    dataset: str
    network: str
    batch_size: int
    workload: WorkloadModel
    limits_w: list[float]
    time_errs: list[float]
    power_errs: list[float]

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.network}"

    def summary(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "workload": self.name,
            "batch_size": self.batch_size,
            **_error_stats("", self.time_errs, self.power_errs),
        }


@dataclass(frozen=True)
class FamilyResult:
    """Micro-batch fit of one (GPU, dataset, network) over its batch sizes."""

    gpu: str
    sku: str
    dataset: str
    network: str
    fit: MicroBatchFit
    reference_batch: int
    batch_sizes: list[int]
    #: The term against the per-batch-size fits at f_max (time, power), per batch size.
    term_errs: list[tuple[float, float]]
    #: End to end: the reference workload scaled to each batch size against every measured point.
    time_errs: list[float]
    power_errs: list[float]

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.network}"

    @property
    def overhead_share(self) -> float:
        """``o`` at the reference batch size."""
        return self.fit.overhead_share(self.reference_batch)

    def summary(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "workload": self.name,
            "batch_sizes": self.batch_sizes,
            "reference_batch": self.reference_batch,
            "overhead_batch": round(self.fit.overhead_batch, 4),
            "micro_batch_overhead": round(self.overhead_share, 5),
            "micro_batch_activity_exp": round(self.fit.activity_exp, 5),
            **_error_stats("term_", [e[0] for e in self.term_errs],
                           [e[1] for e in self.term_errs]),
            **_error_stats("", self.time_errs, self.power_errs),
        }


def _error_stats(prefix: str, time_errs: list[float], power_errs: list[float]) -> dict[str, float]:
    """Median and largest absolute relative errors of time and power (keys
    ``{prefix}time_err_median`` and so on)."""
    t = [abs(e) for e in time_errs]
    p = [abs(e) for e in power_errs]
    return {
        f"{prefix}time_err_median": round(statistics.median(t), 5),
        f"{prefix}power_err_median": round(statistics.median(p), 5),
        f"{prefix}time_err_max": round(max(t), 5),
        f"{prefix}power_err_max": round(max(p), 5),
    }


def gpu_name_of(path: Path) -> str:
    """``summary_power_a40.csv`` -> ``a40``."""
    stem = path.stem
    prefix = "summary_power_"
    return stem[len(prefix) :] if stem.startswith(prefix) else stem


def load_groups(path: Path) -> dict[GroupKey, list[MeasuredPoint]]:
    """Measured points per (dataset, network, batch size); other columns are ignored."""
    groups: dict[GroupKey, list[MeasuredPoint]] = defaultdict(list)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in _REQUIRED if c not in (reader.fieldnames or ())]
        if missing:
            raise SystemExit(f"{path}: missing columns {', '.join(missing)}")
        for row in reader:
            key = (row["dataset"], row["network"], int(float(row["batch_size"])))
            groups[key].append(
                MeasuredPoint(
                    power_limit_w=float(row["power_limit"]),
                    time_s=float(row["time_per_epoch"]),
                    avg_power_w=float(row["average_power"]),
                )
            )
    return {k: sorted(v, key=lambda p: p.power_limit_w) for k, v in groups.items()}


def generic_sku(gpu: str, path: Path, groups: dict[GroupKey, list[MeasuredPoint]]) -> SkuProfile:
    """A profile for a GPU without one: limits from the file, nominal clocks, guessed thermals."""
    limits = [p.power_limit_w for pts in groups.values() for p in pts]
    lo, hi = min(limits), max(limits)
    f_min, f_max, step = _GENERIC_CLOCKS_MHZ
    return SkuProfile(
        name=gpu.upper(),
        product_name=f"{gpu.upper()} (generic profile fitted from {path.name})",
        aliases=(gpu.lower(),),
        tdp_w=hi,
        min_limit_w=lo,
        max_limit_w=hi,
        default_limit_w=hi,
        idle_power_w=round(0.12 * hi, 1),
        idle_sm_clock_mhz=f_min,
        static_power_w=round(0.3 * hi, 1),
        dyn_power_max_w=round(0.7 * hi, 1),
        k=2.7,
        sm_clock_min_mhz=f_min,
        sm_clock_max_mhz=f_max,
        sm_clock_step_mhz=step,
        mem_clock_mhz=1000.0,
        mem_clock_idle_mhz=1000.0,
        memory_total_mib=16384,
        ambient_c=30.0,
        thermal_c_per_w=45.0 / hi,
        thermal_time_constant_s=40.0,
        calibrated_from=None,
    )


def calibrate_file(path: Path) -> tuple[SkuProfile, GpuModel, list[GroupResult]]:
    """Fit one trace file; returns the SKU used, the fitted GPU model and per-group results."""
    gpu = gpu_name_of(path)
    groups = load_groups(path)
    if not groups:
        raise SystemExit(f"{path}: no rows")
    sku = find_sku(gpu)
    if sku is not None:
        print(f"\n== {path.name}: GPU {gpu!r} -> SKU profile {sku.name} ({sku.product_name})")
    else:
        sku = generic_sku(gpu, path, groups)
        print(
            f"\n== {path.name}: GPU {gpu!r} has no SKU profile: generic fitting "
            f"(limits {sku.min_limit_w:g}-{sku.max_limit_w:g} W from the file)"
        )
    keyed = {f"{d}/{n}/bs{b}": pts for (d, n, b), pts in groups.items()}
    started = time.perf_counter()
    fit = fit_gpu(keyed, sku.model)
    elapsed = time.perf_counter() - started
    g = fit.gpu
    print(
        f"fitted GPU parameters ({elapsed:.1f} s): static {g.static_power_w:.1f} W, "
        f"P_dyn_max {g.dyn_power_max_w:.0f} W (held), k {g.k:.2f}, "
        f"SM clocks {g.sm_clock_min_mhz:g}-{g.sm_clock_max_mhz:g} MHz step {g.sm_clock_step_mhz:g}"
    )
    results: list[GroupResult] = []
    for (dataset, network, bs), pts in sorted(groups.items()):
        wl = fit.workloads[f"{dataset}/{network}/bs{bs}"]
        errs = relative_errors(g, wl, pts)
        results.append(
            GroupResult(
                gpu=gpu,
                sku=sku.name,
                dataset=dataset,
                network=network,
                batch_size=bs,
                workload=wl,
                limits_w=[p.power_limit_w for p in pts],
                time_errs=[e[0] for e in errs],
                power_errs=[e[1] for e in errs],
            )
        )
    return sku, g, results


def calibrate_micro_batch(
    path: Path, g: GpuModel, results: list[GroupResult]
) -> list[FamilyResult]:
    """Fit the micro-batch term per (dataset, network) of one file (see the module's doc)."""
    groups = load_groups(path)
    families: dict[tuple[str, str], list[GroupResult]] = defaultdict(list)
    for r in results:
        families[(r.dataset, r.network)].append(r)
    out: list[FamilyResult] = []
    for (dataset, network), members in sorted(families.items()):
        members = sorted(members, key=lambda r: r.batch_size)
        if len(members) < 2:
            continue
        points = [
            MicroBatchPoint(
                batch_size=float(r.batch_size),
                time_s=r.workload.step_time_s,
                power_w=power_at_clock_w(g, r.workload.activity, g.sm_clock_max_mhz),
            )
            for r in members
        ]
        fit = fit_micro_batch(points, g)
        term_errs = []
        for pt in points:
            t, w = fit.predict(g, pt.batch_size)
            term_errs.append((t / pt.time_s - 1.0, w / pt.power_w - 1.0))
        ref = members[(len(members) - 1) // 2]
        m0 = ref.batch_size
        ref_wl = replace(
            ref.workload,
            micro_batch_overhead=fit.overhead_share(m0),
            micro_batch_activity_exp=fit.activity_exp,
        )
        time_errs: list[float] = []
        power_errs: list[float] = []
        for r in members:
            scaled = at_micro_batch(ref_wl, r.batch_size / m0)
            for et, ep in relative_errors(g, scaled, groups[(dataset, network, r.batch_size)]):
                time_errs.append(et)
                power_errs.append(ep)
        out.append(
            FamilyResult(
                gpu=ref.gpu,
                sku=ref.sku,
                dataset=dataset,
                network=network,
                fit=fit,
                reference_batch=m0,
                batch_sizes=[r.batch_size for r in members],
                term_errs=term_errs,
                time_errs=time_errs,
                power_errs=power_errs,
            )
        )
    return out


def print_families(families: list[FamilyResult]) -> None:
    for f in families:
        s = f.summary()
        print(
            f"micro-batch {f.name}: m_h {f.fit.overhead_batch:.4g} samples, beta "
            f"{f.fit.activity_exp:.3f}, o {f.overhead_share:.3f} at bs{f.reference_batch} | term "
            f"vs fits at f_max median |err| time {s['term_time_err_median']:.1%} power "
            f"{s['term_power_err_median']:.1%} | end to end (bs{f.reference_batch} scaled, every "
            f"limit) median time {s['time_err_median']:.1%} power {s['power_err_median']:.1%}, "
            f"worst time {s['time_err_max']:.1%} power {s['power_err_max']:.1%}"
        )
        _print_errors("batch", [f"{b:>6d}" for b in f.batch_sizes],
                      [e[0] for e in f.term_errs], [e[1] for e in f.term_errs])


def training_micro_batch(families: list[FamilyResult]) -> tuple[float, float]:
    """The generic workload's (overhead share, activity exponent): medians over the families."""
    o = statistics.median(f.overhead_share for f in families)
    beta = statistics.median(f.fit.activity_exp for f in families)
    return round(o, 4), round(beta, 4)


def print_results(results: list[GroupResult]) -> None:
    for r in results:
        s = r.summary()
        w = r.workload
        print(
            f"{r.name} bs{r.batch_size}: a={w.activity:.3f} c={w.compute_share:.3f} "
            f"r={w.ripple:.3f} t_max={w.step_time_s:.4g} s | median |err| time "
            f"{s['time_err_median']:.1%} power {s['power_err_median']:.1%}, worst time "
            f"{s['time_err_max']:.1%} power {s['power_err_max']:.1%}"
        )
        _print_errors("limit W", [f"{lim:>6g}" for lim in r.limits_w], r.time_errs,
                      r.power_errs)


def _print_errors(
    label: str, columns: list[str], time_errs: list[float], power_errs: list[float]
) -> None:
    """Three rows under a fit's line: the columns (batch sizes or limits), then the relative
    errors of time and of power at each."""
    print(f"   {label:<8}" + " ".join(columns))
    print("   time    " + " ".join(f"{e:>+6.1%}" for e in time_errs))
    print("   power   " + " ".join(f"{e:>+6.1%}" for e in power_errs))


def overall(results: list[GroupResult], label: str) -> tuple[float, float]:
    t = [abs(e) for r in results for e in r.time_errs]
    p = [abs(e) for r in results for e in r.power_errs]
    med_t, med_p = statistics.median(t), statistics.median(p)
    print(
        f"{label}: {len(t)} points in {len(results)} workloads: median |err| time {med_t:.2%} "
        f"power {med_p:.2%}; worst time {max(t):.1%} power {max(p):.1%}; "
        f"median of per-workload medians time "
        f"{statistics.median(r.summary()['time_err_median'] for r in results):.2%} power "
        f"{statistics.median(r.summary()['power_err_median'] for r in results):.2%}"
    )
    return med_t, med_p


def _fitted_workload(sku: SkuProfile, path: Path, r: GroupResult) -> Workload:
    w = r.workload
    # The traces carry no utilisation: a plain heuristic from the fitted activity/compute share.
    act = min(max(w.activity, 0.0), 1.0)
    return Workload(
        name=f"{sku.name}/{r.name}/bs{r.batch_size}",
        activity=round(w.activity, 5),
        compute_share=round(w.compute_share, 5),
        step_time_s=round(w.step_time_s, 5),
        ripple=round(w.ripple, 5),
        gpu_util_pct=round(min(99.0, 30.0 + 70.0 * act)),
        mem_util_pct=round(min(90.0, 10.0 + 50.0 * (1.0 - w.compute_share))),
        memory_fraction=0.75,
        sku=sku.name,
        source=f"{path.name} (time per epoch)",
    )


def _set_micro_batch(workloads_raw: dict[str, Any], families: list[FamilyResult]) -> None:
    """Write the micro-batch terms into ``workloads.json`` entries (training and fitted ones)."""

    def put(entry: dict[str, Any], o: float, beta: float) -> dict[str, Any]:
        # Keep the file's key order: the two terms follow ``ripple``.
        entry = {k: v for k, v in entry.items() if not k.startswith("micro_batch_")}
        out: dict[str, Any] = {}
        for k, v in entry.items():
            out[k] = v
            if k == "ripple":
                out["micro_batch_overhead"] = o
                out["micro_batch_activity_exp"] = beta
        out.setdefault("micro_batch_overhead", o)
        out.setdefault("micro_batch_activity_exp", beta)
        return out

    for f in families:
        for bs in f.batch_sizes:
            key = f"{f.sku}/{f.name}/bs{bs}"
            if key in workloads_raw:
                workloads_raw[key] = put(
                    workloads_raw[key],
                    round(f.fit.overhead_share(bs), 5),
                    round(f.fit.activity_exp, 5),
                )
    if "training" in workloads_raw and families:
        workloads_raw["training"] = put(workloads_raw["training"], *training_micro_batch(families))


def write_micro_batch(families: list[FamilyResult]) -> None:
    """Update only the micro-batch terms in workloads.json (the other fitted values stay)."""
    workloads_raw: dict[str, Any] = json.loads(WORKLOADS_PATH.read_text(encoding="utf-8"))
    _set_micro_batch(workloads_raw, families)
    WORKLOADS_PATH.write_text(json.dumps(workloads_raw, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote the micro-batch terms into {WORKLOADS_PATH.relative_to(REPO)}")


def write_profiles(
    fitted: list[tuple[Path, SkuProfile, GpuModel, list[GroupResult]]],
    families: list[FamilyResult],
) -> None:
    """Update skus.json (fitted static power and k) and workloads.json (fitted workloads)."""
    skus_raw: dict[str, Any] = json.loads(SKUS_PATH.read_text(encoding="utf-8"))
    workloads_raw: dict[str, Any] = json.loads(WORKLOADS_PATH.read_text(encoding="utf-8"))
    for path, sku, g, results in fitted:
        calibrated = replace(
            sku,
            static_power_w=round(g.static_power_w, 3),
            k=round(g.k, 4),
            calibrated_from=path.name,
        )
        skus_raw[sku.name] = sku_to_json(calibrated)
        prefix = f"{sku.name}/"
        for key in [k for k in workloads_raw if k.startswith(prefix)]:
            del workloads_raw[key]
        for r in results:
            wl = _fitted_workload(sku, path, r)
            workloads_raw[wl.name] = workload_to_json(wl)
    _set_micro_batch(workloads_raw, families)
    ordered = {"training": workloads_raw.pop("training")} if "training" in workloads_raw else {}
    ordered.update(sorted(workloads_raw.items()))
    SKUS_PATH.write_text(json.dumps(skus_raw, indent=2) + "\n", encoding="utf-8")
    WORKLOADS_PATH.write_text(json.dumps(ordered, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {SKUS_PATH.relative_to(REPO)} and {WORKLOADS_PATH.relative_to(REPO)}")


def _trace_arg(text: str) -> Path:
    """A ``--trace`` value: a bundled trace name or a file (argparse reports a bad one)."""
    try:
        return resolve_trace(text)
    except LookupError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--trace",
        nargs="+",
        type=_trace_arg,
        help="trace files, or names of bundled traces (default: every bundled trace: "
        + ", ".join(bundled_trace_paths())
        + ")",
    )
    parser.add_argument("--json", type=Path, help="write per-workload errors as JSON here")
    parser.add_argument(
        "--write-profiles",
        action="store_true",
        help="update telemetry/backends/profiles/{skus,workloads}.json with the fit",
    )
    parser.add_argument(
        "--write-micro-batch",
        action="store_true",
        help="update only the micro-batch terms in telemetry/backends/profiles/workloads.json",
    )
    args = parser.parse_args(argv)
    traces: list[Path] = args.trace or list(bundled_trace_paths().values())
    if not traces:
        print("no bundled traces found (telemetry/backends/traces)", file=sys.stderr)
        return 2
    fitted = []
    all_results: list[GroupResult] = []
    all_families: list[FamilyResult] = []
    for path in traces:
        sku, g, results = calibrate_file(path)
        print_results(results)
        overall(results, f"{path.name} ({sku.name})")
        families = calibrate_micro_batch(path, g, results)
        print_families(families)
        fitted.append((path, sku, g, results))
        all_results += results
        all_families += families
    print()
    med_t, med_p = overall(all_results, "OVERALL")
    met = med_t <= TARGET_MEDIAN_ERROR and med_p <= TARGET_MEDIAN_ERROR
    print(
        f"target (median |err| <= {TARGET_MEDIAN_ERROR:.0%} for time and power): "
        f"{'met' if met else 'NOT met'}"
    )
    micro: dict[str, Any] = {}
    if all_families:
        o, beta = training_micro_batch(all_families)
        fam = [f.summary() for f in all_families]
        medians = (
            "term_time_err_median",
            "term_power_err_median",
            "time_err_median",
            "power_err_median",
        )
        micro = {
            "training": {"micro_batch_overhead": o, "micro_batch_activity_exp": beta},
            **{key: round(statistics.median(f[key] for f in fam), 5) for key in medians},
            "families": fam,
        }
        print(
            f"micro-batch term over {len(fam)} families: median of per-family medians, term vs "
            f"fits at f_max time {micro['term_time_err_median']:.1%} power "
            f"{micro['term_power_err_median']:.1%}; end to end time "
            f"{micro['time_err_median']:.1%} power {micro['power_err_median']:.1%}; "
            f"'training' takes o = {o:g} (median at the middle batch sizes), beta = {beta:g}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"workloads": [r.summary() for r in all_results], "micro_batch": micro}
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.write_profiles:
        write_profiles(fitted, all_families)
    elif args.write_micro_batch:
        write_micro_batch(all_families)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
