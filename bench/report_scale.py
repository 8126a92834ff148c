"""How report cost scales: 30 days of 8 GPUs at 1 Hz (about 20 million raw rows) and a few hundred
jobs, then (a) the 30-day per-job report, (b) the same report for the last day, (c) one SQL
aggregate (the sum of power) over every raw sample of the 30 days.

The store is filled in bulk: the schema comes from the migrations (``open_store``), samples go in
with plain ``sqlite3`` ``executemany`` in time order per GPU, and the minute, 10-minute and hourly
rollups are computed with numpy exactly as ``Store.rollup`` defines them (each interval's counter
delta counts in the minute where it ends; buckets are sums of minutes; the minutes' running
total). The jobs go through ``JobStore``; the energy marks at their edges are written by
``Store.rollup`` itself, as the daemon would. The timings run in a fresh child process, so that
its peak RSS is the report's.

A "report" here is what ``powertrain report --by job --json`` does: open the store (schema
check), the queries, attribution, progress, the rows and the JSON (not the charts, not the Rich
table). ``build_report_*`` times the computation alone. ``peak_mib`` is the measuring process's
peak RSS (VmHWM: interpreter, imports and the reports; the raw scan runs after it is read).

Usage: python bench/report_scale.py [--days 30] [--gpus 8] [--jobs 300] [--repeat 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scheduler.jobs import JobState  # noqa: E402
from scheduler.store import JobStore, NewJob  # noqa: E402
from telemetry.backends.base import GpuInfo  # noqa: E402
from telemetry.store import open_store  # noqa: E402
from telemetry.store.models import to_epoch_us  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)
IDLE_MW, BUSY_MW = 75_000, 650_000


def _plan_jobs(
    days: int, gpus: int, n_jobs: int, rng: random.Random
) -> list[tuple[int, int, tuple[int, ...]]]:
    """(start_s, end_s, gpu indices) for ``n_jobs`` jobs packed over the range."""
    span_s = days * 86_400
    free_at = [0] * gpus
    # about 40 % of GPU time busy: room for waits while a multi-GPU job's GPUs free up
    mean_s = span_s * gpus * 0.4 / n_jobs / 2.0
    jobs = []
    for _ in range(n_jobs):
        width = rng.choice((1, 1, 2, 2, 4))
        first = rng.randrange(0, gpus - width + 1)
        chosen = tuple(range(first, first + width))
        start = max(free_at[g] for g in chosen) + rng.randint(60, int(mean_s * 0.2))
        end = start + rng.randint(int(mean_s * 0.5), int(mean_s * 1.5)) * 2 // max(1, width)
        if end >= span_s - 120:
            continue
        start += rng.random()  # jobs start and end between samples
        for g in chosen:
            free_at[g] = int(end) + 1
        jobs.append((int(start), int(end), chosen))
    return jobs


def fill(path: Path, days: int, gpus: int, n_jobs: int) -> dict[str, float]:
    import numpy as np  # only the fill needs it (the measuring process stays lean)

    rng = random.Random(7)
    store = open_store(f"sqlite:///{path}")
    infos = [GpuInfo(index=i, uuid=f"GPU-bench-{i}", name="NVIDIA H100 80GB HBM3",
                     min_limit_mw=200_000, max_limit_mw=700_000, default_limit_mw=700_000,
                     min_sm_clock_mhz=345, max_sm_clock_mhz=1980, memory_total_bytes=80 * 2**30,
                     has_energy_counter=True) for i in range(gpus)]
    ids = store.register_gpus(infos, host="bench", backend="simulated", seen_at=T0)
    plan = _plan_jobs(days, gpus, n_jobs, rng)
    started = time.perf_counter()
    job_store = JobStore(store)
    for n, (start, end, chosen) in enumerate(plan):
        job = job_store.create(
            NewJob(name=f"pretrain-{n}", user=f"user{n % 7}", uid=1000 + n % 7, gid=1000,
                   argv=("python", "train.py", f"--run={n}"), cwd="/work", host="bench",
                   gpu_count=len(chosen), watts_per_gpu=600.0),
            at=T0 + timedelta(seconds=start - 1),
        )
        job_store.transition(job.id, JobState.RUNNING, "placed",
                             at=T0 + timedelta(seconds=start),
                             gpus=[(ids[g], g) for g in chosen])
        job_store.transition(job.id, JobState.COMPLETED, "exited 0",
                             at=T0 + timedelta(seconds=end), exit_code=0)
    jobs_s = time.perf_counter() - started
    jobs = job_store.list()
    store.close()

    span_s = days * 86_400
    t0_us = to_epoch_us(T0)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    started = time.perf_counter()
    progress_rows = []
    for job, (start, end, _) in zip(jobs, plan, strict=True):
        for t in range(start, end, 300):
            progress_rows.append((job.id, t0_us + t * 1_000_000, (t - start) // 2,
                                  (t - start) * 4, (t - start) * 4_000 * len(job.gpus)))
    conn.executemany("INSERT INTO job_progress (job_id, at, steps, samples, tokens) "
                     "VALUES (?, ?, ?, ?, ?)", progress_rows)
    rows = 0
    rng_np = np.random.default_rng(11)
    seconds = np.arange(span_s, dtype=np.int64)
    for g in range(gpus):
        power = np.full(span_s, IDLE_MW, dtype=np.int64)
        for start, end, chosen in plan:
            if g in chosen:
                power[start + 1 : end + 1] = BUSY_MW
        power += rng_np.integers(-15_000, 15_000, span_s)
        # the counter: energy of each 1 s interval is the mean of its two ends' power (mJ)
        increments = np.empty(span_s, dtype=np.int64)
        increments[0] = 0
        increments[1:] = (power[1:] + power[:-1]) // 2
        counter = 10_000_000 + np.cumsum(increments)
        t_us = t0_us + seconds * 1_000_000
        gpu_id = ids[g]
        for chunk in range(0, span_s, 500_000):
            sl = slice(chunk, chunk + 500_000)
            conn.executemany(
                "INSERT INTO samples (gpu_id, sampled_at, power_mw, power_avg_mw, energy_mj) "
                "VALUES (?, ?, ?, ?, ?)",
                zip([gpu_id] * len(t_us[sl]), t_us[sl].tolist(), power[sl].tolist(),
                    power[sl].tolist(), counter[sl].tolist(), strict=True),
            )
        rows += span_s
        # minute rollups: intervals ending in a minute count in it (the first minute has one
        # sample fewer's worth of intervals: its first sample starts the series)
        per_min = counter.reshape(-1, 60)
        last = per_min[:, -1]
        prev = np.concatenate(([counter[0]], last[:-1]))
        energy_m = (last - prev).astype(np.float64)
        pm = power.reshape(-1, 60)
        minutes = t0_us + np.arange(len(last), dtype=np.int64) * 60_000_000
        conn.executemany(
            "INSERT INTO rollups_1m (gpu_id, minute_start, n_samples, energy_mj, mean_power_mw,"
            " min_power_mw, max_power_mw, method, energy_cum_mj)"
            " VALUES (?, ?, 60, ?, ?, ?, ?, 'counter', ?)",
            zip([gpu_id] * len(last), minutes.tolist(), energy_m.tolist(),
                pm.mean(axis=1).tolist(), pm.min(axis=1).tolist(), pm.max(axis=1).tolist(),
                np.cumsum(energy_m).tolist(), strict=True),
        )
        for level_s in (600, 3600):
            k = level_s // 60
            e = energy_m.reshape(-1, k).sum(axis=1)
            pl = power.reshape(-1, level_s)
            starts = t0_us + np.arange(len(e), dtype=np.int64) * level_s * 1_000_000
            conn.executemany(
                "INSERT INTO rollups_levels (gpu_id, level_s, bucket_start, n_samples, energy_mj,"
                " mean_power_mw, min_power_mw, max_power_mw, method)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'counter')",
                zip([gpu_id] * len(e), [level_s] * len(e), starts.tolist(),
                    [level_s] * len(e), e.tolist(), pl.mean(axis=1).tolist(),
                    pl.min(axis=1).tolist(), pl.max(axis=1).tolist(), strict=True),
            )
        conn.commit()
        print(f"  GPU {g}: {span_s:,} samples, counter delta {counter[-1] - counter[0]:,} mJ",
              flush=True)
    conn.commit()
    conn.close()
    # the energy marks at the job edges: what the daemon's rollup writes, by the same code (the
    # minutes and buckets are all there already, so it writes nothing else)
    marking = time.perf_counter()
    store = open_store(f"sqlite:///{path}")
    try:
        store.rollup(T0 + timedelta(days=days, seconds=30))
        with store.engine.connect() as sconn:
            marks = sconn.exec_driver_sql("SELECT count(*) FROM energy_marks").scalar_one()
    finally:
        store.close()
    print(f"  {marks} energy marks at job edges in {time.perf_counter() - marking:.1f} s",
          flush=True)
    conn = sqlite3.connect(path)
    conn.execute("ANALYZE")
    conn.commit()
    conn.close()
    return {"rows": rows, "jobs": len(jobs), "fill_s": time.perf_counter() - started + jobs_s}


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(path: Path, days: int, repeat: int) -> dict[str, float]:
    """Run in a fresh process: time the reports and the raw aggregate."""
    from rich.console import Console

    from reports.queries import ReportRequest, build_report
    from reports.render import table, to_json

    url = f"sqlite:///{path}"
    end = T0 + timedelta(days=days)

    def run(since: datetime) -> tuple[float, int, float, float]:
        """What ``powertrain report --by job --json`` does after parsing its flags: open the
        store (schema check), compute, format the JSON, close."""
        started = time.perf_counter()
        store = open_store(url)
        try:
            computing = time.perf_counter()
            report = build_report(store, ReportRequest(since=since, until=end, by="job", now=end))
            computed = time.perf_counter() - computing
            to_json(report)
        finally:
            store.close()
        return time.perf_counter() - started, len(report.rows), report.summary.energy_j, computed

    run(end - timedelta(days=1))  # warm the page cache and imports
    r30 = min(run(T0) for _ in range(repeat))
    r1 = min(run(end - timedelta(days=1)) for _ in range(repeat))
    # the process's peak RSS so far: interpreter, imports and the reports (not the raw scan).
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
    peak_rss_mib = _vm_hwm_mib()
    Console(file=io.StringIO(), width=160).print(table(build_report(
        open_store(url), ReportRequest(since=T0, until=end, by="job", now=end))))
    table_peak_mib = _vm_hwm_mib()
    tracemalloc.start()
    run(T0)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    conn = sqlite3.connect(path)
    raw = []
    for _ in range(repeat):
        started = time.perf_counter()
        conn.execute("SELECT SUM(power_mw) FROM samples WHERE sampled_at >= ? AND sampled_at < ?",
                     (to_epoch_us(T0), to_epoch_us(end))).fetchone()
        raw.append(time.perf_counter() - started)
    counter_total_mj = sum(
        conn.execute("SELECT (SELECT energy_mj FROM samples WHERE gpu_id = g.id ORDER BY "
                     "sampled_at DESC LIMIT 1) - (SELECT energy_mj FROM samples WHERE "
                     "gpu_id = g.id ORDER BY sampled_at LIMIT 1) FROM gpus g").fetchall()[i][0]
        for i in range(conn.execute("SELECT count(*) FROM gpus").fetchone()[0])
    )
    conn.close()
    return {
        "report_30d_s": r30[0], "report_30d_rows": r30[1], "report_30d_energy_j": r30[2],
        "report_1d_s": r1[0], "report_1d_rows": r1[1],
        "build_30d_s": r30[3], "build_1d_s": r1[3],
        "raw_aggregate_s": min(raw),
        "counter_energy_j": counter_total_mj / 1000,
        "peak_mib": peak_rss_mib, "python_heap_peak_mib": traced_peak / 2**20,
        "table_peak_mib": table_peak_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5,
                        help="Timings are the best of this many runs (all three alike).")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.days, args.repeat)))
        return
    with tempfile.TemporaryDirectory(prefix="report-scale-") as tmp:
        path = Path(tmp) / "powertrain.db"
        print(f"filling {path}: {args.days} days x {args.gpus} GPUs at 1 Hz, {args.jobs} jobs")
        filled = fill(path, args.days, args.gpus, args.jobs)
        print(f"filled {filled['rows']:,} raw rows and {filled['jobs']} jobs in "
              f"{filled['fill_s']:.0f} s ({path.stat().st_size / 2**30:.2f} GiB)")
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(path), "--days", str(args.days),
             "--repeat", str(args.repeat)],
            check=True, capture_output=True, text=True,
        )
        m = json.loads(child.stdout.strip().splitlines()[-1])
    result = {
        "rows": filled["rows"],
        "jobs": filled["jobs"],
        "gpus": args.gpus,
        "days": args.days,
        "report_30d_s": round(m["report_30d_s"], 4),
        "report_1d_s": round(m["report_1d_s"], 4),
        "raw_aggregate_s": round(m["raw_aggregate_s"], 4),
        "ratio_vs_raw": round(m["raw_aggregate_s"] / m["report_30d_s"], 1),
        "growth_30d_over_1d": round(m["report_30d_s"] / m["report_1d_s"], 2),
        "peak_mib": round(m["peak_mib"], 1),
        "build_report_30d_s": round(m["build_30d_s"], 4),
        "build_report_1d_s": round(m["build_1d_s"], 4),
        "build_growth_30d_over_1d": round(m["build_30d_s"] / m["build_1d_s"], 2),
        "python_heap_peak_mib": round(m["python_heap_peak_mib"], 1),
        "peak_mib_with_rich_table": round(m["table_peak_mib"], 1),
        "report_30d_rows": m["report_30d_rows"],
        "report_1d_rows": m["report_1d_rows"],
        "report_30d_energy_j": m["report_30d_energy_j"],
        "counter_energy_j": m["counter_energy_j"],
        "targets": {"ratio_vs_raw": ">= 50", "growth_30d_over_1d": "<= 3", "peak_mib": "< 200"},
        "machine": f"{sys.platform}, Python {sys.version.split()[0]}, SQLite "
                   f"{sqlite3.sqlite_version}",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
