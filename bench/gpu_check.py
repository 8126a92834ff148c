"""Hardware validation of the NVML path: every field, call latencies, sensor update periods, energy.

READ-ONLY: this script NEVER changes a GPU setting. It sets no power limit, no locked or application
clocks, no persistence mode, no compute mode, no MIG mode and resets nothing; it calls no
``NvmlBackend`` setter. It only reads through NVML and runs a PyTorch matmul load in a child
process (the load is the only thing it does to the GPU).

What it measures on one GPU (``--gpu``, NVML index):

1. every ``GpuInfo`` and ``GpuReading`` field as ``NvmlBackend`` reads it;
2. the latency of each NVML getter the backend uses and of ``NvmlBackend.read`` (median/p99 µs
   over ``--calls`` calls; CPU µs per call), both as the daemon reads (the energy counter only as
   often as its cost allows) and with the counter read on every call;
3. under a bf16 (or fp16) matmul load: sampling through ``NvmlBackend.read`` with the counter read
   on every call at 10, 50 and 100 Hz (``--seconds`` each), with the achieved rate and read
   latency;
4. how often instant power, 1 s average power and the energy counter really change (their sensor
   update periods), from a tight polling loop;
5. the energy counter's delta over each loaded window against trapezoid-integrated instant power
   (and 1 s average power), with the relative difference;
6. the daemon's way, under the same load: the sampler's 10 Hz tick for 8 GPUs, emulated by eight
   back-to-back ``NvmlBackend.read`` calls of this GPU through eight backends (each with its own
   energy-counter schedule), for ``2 × --seconds``: the CPU this takes against the daemon's budget
   (under 1 % of a core), the counter period chosen, and the energy reported against the
   counter's own delta; and each getter's cost when called once per tick at 10 Hz.

Run it from the repository root (about a minute on an H100; well under four):

    .venv/bin/python bench/gpu_check.py --json bench/results/gpu_check.json

Without an NVIDIA driver it prints one line (``no NVIDIA driver found: ...``) and exits 2.
``--fake`` runs the same code against ``tests/fake_pynvml.py`` to check the plumbing without a
GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from telemetry.backends.base import BackendUnavailableError, ThrottleReason
from telemetry.backends.nvml import NvmlBackend, nvml_available

RATES_HZ = (10, 50, 100)
MATMUL_SIZE = 8192  # 3 bf16 8192² matrices = 400 MB; ~1.1 TFLOP per matmul keeps an H100 busy


@dataclass(frozen=True, slots=True)
class Sample:
    """One ``NvmlBackend.read`` during a sampling phase; ``t_s`` is the read's midpoint."""

    t_s: float
    read_us: float
    power_mw: int | None
    power_avg_mw: int | None
    energy_mj: int | None
    sm_clock_mhz: int | None
    gpu_util_pct: int | None
    temperature_c: int | None
    throttle_reasons: int | None
    cpu_us: float = 0.0


# -- statistics ---------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def update_period(times_s: Sequence[float], values: Sequence[Any]) -> dict[str, Any]:
    """How often a polled value really changes (Zeus's ``infer_counter_update_period`` idea).

    Polling much faster than the sensor updates, the intervals between successive changes are
    the sensor's update period; the median resists a repeated value hiding one update.

    Returns:
        ``samples``, ``changes``, and ``median_ms``/``p10_ms``/``p90_ms`` of the intervals
        between changes (``None`` with fewer than three changes).
    """
    changes = [t for t, v, prev in zip(times_s[1:], values[1:], values[:-1], strict=True)
               if v != prev]
    intervals_ms = [(b - a) * 1e3 for a, b in itertools.pairwise(changes)]
    out: dict[str, Any] = {"samples": len(values), "changes": len(changes),
                           "median_ms": None, "p10_ms": None, "p90_ms": None}
    if len(intervals_ms) >= 2:
        out.update(median_ms=statistics.median(intervals_ms),
                   p10_ms=percentile(intervals_ms, 10), p90_ms=percentile(intervals_ms, 90))
    return out


def trapezoid_mj(times_s: Sequence[float], power_mw: Sequence[float]) -> float:
    """Energy in mJ from power in mW sampled at ``times_s`` (mW × s = mJ)."""
    return sum((t1 - t0) * (p0 + p1) / 2
               for t0, t1, p0, p1 in zip(times_s, times_s[1:], power_mw, power_mw[1:],
                                         strict=False))


def energy_check(samples: Sequence[Sample]) -> dict[str, Any]:
    """Energy counter delta against integrated power over the same samples."""
    rows = [s for s in samples if s.energy_mj is not None]
    if len(rows) < 2:
        return {"counter_mj": None, "note": "no energy counter"}
    counter_mj = float(rows[-1].energy_mj - rows[0].energy_mj)  # type: ignore[operator]
    out: dict[str, Any] = {"window_s": rows[-1].t_s - rows[0].t_s, "counter_mj": counter_mj}
    for name in ("power_mw", "power_avg_mw"):
        pts = [(s.t_s, getattr(s, name)) for s in rows if getattr(s, name) is not None]
        if len(pts) < 2 or counter_mj <= 0:
            out[f"{name}_integrated_mj"] = out[f"{name}_rel_diff"] = None
            continue
        integrated = trapezoid_mj([t for t, _ in pts], [p for _, p in pts])
        out[f"{name}_integrated_mj"] = integrated
        out[f"{name}_rel_diff"] = (integrated - counter_mj) / counter_mj
    return out


def _w(mw: float | None) -> str:
    return "n/a" if mw is None else f"{mw / 1000:.1f} W"


# -- the load -----------------------------------------------------------------------------------

def _load_worker(index: int, dtype_name: str, size: int, running: Any, ready: Any, stop: Any,
                 result: Any) -> None:
    """Child process: matmuls on ``cuda:index`` until ``stop`` is set; reports its throughput.

    Sets ``running`` once the first matmuls finished, then ``ready``; on failure only ``ready``.
    """
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA indices = NVML indices
    try:
        import torch

        device = torch.device("cuda", index)
        dtype = getattr(torch, dtype_name)
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        c = torch.empty_like(a)
        for _ in range(5):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize(device)
        props = torch.cuda.get_device_properties(device)
        running.set()
        ready.set()
        n, t0 = 0, time.perf_counter()
        while not stop.is_set():
            for _ in range(20):
                torch.matmul(a, b, out=c)
            torch.cuda.synchronize(device)
            n += 20
        seconds = time.perf_counter() - t0
        result.put({"ok": True, "device": props.name, "uuid": str(getattr(props, "uuid", "")),
                    "dtype": dtype_name, "size": size, "matmuls": n, "seconds": seconds,
                    "tflops": 2 * size**3 * n / seconds / 1e12, "torch": torch.__version__})
    except Exception as err:  # report, never hang the parent
        result.put({"ok": False, "error": f"{type(err).__name__}: {err}"})
        ready.set()


class Load:
    """A matmul load in a spawned child process (no GIL shared with the sampling loop)."""

    def __init__(self, index: int, dtype_name: str, size: int) -> None:
        ctx = mp.get_context("spawn")
        self._running, self._ready, self._stop = ctx.Event(), ctx.Event(), ctx.Event()
        self._result = ctx.Queue()
        self._proc = ctx.Process(target=_load_worker, daemon=True,
                                 args=(index, dtype_name, size, self._running, self._ready,
                                       self._stop, self._result))

    def start(self, timeout_s: float = 120.0) -> bool:
        """Start and wait until the first matmuls ran; False if the child failed."""
        self._proc.start()
        return self._ready.wait(timeout_s) and self._running.is_set()

    def stop(self) -> dict[str, Any]:
        """Stop the load and return what the child reported."""
        self._stop.set()
        try:
            report: dict[str, Any] = self._result.get(timeout=60)
        except Exception as err:
            report = {"ok": False, "error": f"no report from the load process: {err!r}"}
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.terminate()
        return report


# -- measurements -------------------------------------------------------------------------------

def nvml_getters(nvml: Any, index: int) -> list[tuple[str, Callable[[], Any]]]:
    """Each read-only NVML getter that ``NvmlBackend.read`` may call, by name."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    instant = [nvml.NVML_FI_DEV_POWER_INSTANT]
    return [
        ("nvmlDeviceGetFieldValues[POWER_INSTANT]",
         lambda: nvml.nvmlDeviceGetFieldValues(handle, instant)),
        ("nvmlDeviceGetPowerUsage", lambda: nvml.nvmlDeviceGetPowerUsage(handle)),
        ("nvmlDeviceGetTotalEnergyConsumption",
         lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle)),
        ("nvmlDeviceGetClockInfo[SM]",
         lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
        ("nvmlDeviceGetClockInfo[MEM]",
         lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)),
        ("nvmlDeviceGetUtilizationRates", lambda: nvml.nvmlDeviceGetUtilizationRates(handle)),
        ("nvmlDeviceGetTemperatureV",
         lambda: nvml.nvmlDeviceGetTemperatureV(handle, nvml.NVML_TEMPERATURE_GPU)),
        ("nvmlDeviceGetTemperature",
         lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
        ("nvmlDeviceGetMemoryInfo", lambda: nvml.nvmlDeviceGetMemoryInfo(handle)),
        ("nvmlDeviceGetEnforcedPowerLimit", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle)),
        ("nvmlDeviceGetCurrentClocksEventReasons",
         lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(handle)),
        ("nvmlDeviceGetCurrentClocksThrottleReasons",
         lambda: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)),
        ("nvmlDeviceGetComputeRunningProcesses",
         lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle)),
    ]


def time_calls(nvml: Any, backend: NvmlBackend, exact: NvmlBackend, index: int,
               calls: int) -> dict[str, Any]:
    """Median/p99 wall µs of each read-only NVML getter the backend uses, and of ``read``."""
    getters = [*nvml_getters(nvml, index),
               ("NvmlBackend.read", lambda: backend.read(index)),
               ("NvmlBackend.read (counter every call)", lambda: exact.read(index))]
    out: dict[str, Any] = {}
    for name, fn in getters:
        try:
            fn()
        except Exception as err:  # NVMLError or AttributeError (old pynvml)
            out[name] = {"error": str(err) or type(err).__name__}
            continue
        wall_us: list[float] = []
        cpu0 = time.process_time()
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            fn()
            wall_us.append((time.perf_counter_ns() - t0) / 1e3)
        cpu_us = (time.process_time() - cpu0) / calls * 1e6
        out[name] = {"calls": calls, "median_us": statistics.median(wall_us),
                     "p99_us": percentile(wall_us, 99), "max_us": max(wall_us),
                     "cpu_us_per_call": cpu_us}
    return out


def sample(backend: NvmlBackend, index: int, rate_hz: float, seconds: float) -> list[Sample]:
    """Read through the backend at ``rate_hz`` (absolute schedule, no drift) for ``seconds``.

    ``Sample.cpu_us`` is the CPU time (this process, all threads) each read took."""
    period = 1.0 / rate_hz
    start = time.perf_counter()
    out: list[Sample] = []
    k = 0
    while True:
        due = start + k * period
        if due >= start + seconds:
            return out
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        c0 = time.process_time()
        t0 = time.perf_counter()
        r = backend.read(index)
        t1 = time.perf_counter()
        cpu_us = (time.process_time() - c0) * 1e6
        out.append(Sample(t_s=(t0 + t1) / 2 - start, read_us=(t1 - t0) * 1e6, cpu_us=cpu_us,
                          power_mw=r.power_mw, power_avg_mw=r.power_avg_mw,
                          energy_mj=r.energy_mj, sm_clock_mhz=r.sm_clock_mhz,
                          gpu_util_pct=r.gpu_util_pct, temperature_c=r.temperature_c,
                          throttle_reasons=r.throttle_reasons))
        k += 1
        late = int((time.perf_counter() - start) / period)
        k = max(k, late)  # if a read overran, skip the slots it missed instead of bursting


def phase_summary(rate_hz: float, samples: Sequence[Sample]) -> dict[str, Any]:
    """Achieved rate, read latency, power statistics, update periods and the energy check."""
    span = samples[-1].t_s - samples[0].t_s if len(samples) > 1 else 0.0
    reads = [s.read_us for s in samples]
    powers = [s.power_mw for s in samples if s.power_mw is not None]
    times = [s.t_s for s in samples]
    reasons = 0
    for s in samples:
        reasons |= s.throttle_reasons or 0
    return {
        "rate_hz": rate_hz,
        "achieved_hz": (len(samples) - 1) / span if span > 0 else None,
        "samples": len(samples),
        "read_median_us": statistics.median(reads) if reads else None,
        "read_p99_us": percentile(reads, 99) if reads else None,
        "power_mean_mw": statistics.fmean(powers) if powers else None,
        "power_min_mw": min(powers, default=None),
        "power_max_mw": max(powers, default=None),
        "sm_clock_median_mhz": statistics.median(
            [s.sm_clock_mhz for s in samples if s.sm_clock_mhz is not None] or [0]),
        "gpu_util_median_pct": statistics.median(
            [s.gpu_util_pct for s in samples if s.gpu_util_pct is not None] or [0]),
        "throttle_reasons_seen": str(ThrottleReason(reasons)),
        "update_period": {name: update_period(times, [getattr(s, name) for s in samples])
                          for name in ("power_mw", "power_avg_mw", "energy_mj")},
        "energy": energy_check(samples),
    }


def poll_sensors(nvml: Any, index: int, seconds: float) -> dict[str, Any]:
    """Poll the three power sensors as fast as NVML answers; infer each one's update period."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    instant = [nvml.NVML_FI_DEV_POWER_INSTANT]
    probes: dict[str, Callable[[], Any]] = {
        "power_mw": lambda: _field(nvml.nvmlDeviceGetFieldValues(handle, instant)[0], nvml),
        "power_avg_mw": lambda: nvml.nvmlDeviceGetPowerUsage(handle),
        "energy_mj": lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle),
    }
    live: dict[str, Callable[[], Any]] = {}
    for name, fn in probes.items():
        try:
            fn()
        except Exception as err:  # NVMLError (not supported) or AttributeError (old pynvml)
            print(f"  {name}: cannot poll ({err})")
            continue
        live[name] = fn
    series: dict[str, tuple[list[float], list[Any]]] = {name: ([], []) for name in live}
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        for name, fn in live.items():
            t0 = time.perf_counter()
            value = fn()
            series[name][0].append((t0 + time.perf_counter()) / 2 - start)
            series[name][1].append(value)
    return {name: update_period(ts, vs) for name, (ts, vs) in series.items()}


def _field(value: Any, nvml: Any) -> int | None:
    if value.nvmlReturn != nvml.NVML_SUCCESS:
        raise nvml.NVMLError(value.nvmlReturn)
    member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal",
              6: "usVal"}[value.valueType]
    return int(getattr(value.value, member))


# -- the run ------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to check")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="sampling time per rate under load (default 5)")
    parser.add_argument("--calls", type=int, default=1000, help="calls per timed getter")
    parser.add_argument("--poll-seconds", type=float, default=4.0,
                        help="tight polling time for the sensor update periods (default 4)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--size", type=int, default=MATMUL_SIZE, help="matmul size N (N×N)")
    parser.add_argument("--no-load", action="store_true", help="sample without a matmul load")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--fake", action="store_true",
                        help="use tests/fake_pynvml.py (plumbing check; numbers meaningless)")
    args = parser.parse_args(argv)

    nvml: Any
    if args.fake:
        from tests.fake_pynvml import FakePynvml

        nvml = FakePynvml(gpus=2)
    else:
        try:
            import pynvml
        except ImportError as err:
            print(f"no NVIDIA driver found: nvidia-ml-py is not installed ({err})")
            return 2
        nvml = pynvml
    ok, why = nvml_available(nvml)
    if not ok:
        print(f"no NVIDIA driver found: {why}")
        return 2
    try:
        backend = NvmlBackend(nvml=nvml)  # as the daemon reads: the counter as its cost allows
        exact = NvmlBackend(nvml=nvml, counter_period_s=0)  # the counter on every read
    except BackendUnavailableError as err:
        print(f"no NVIDIA driver found: {err}")
        return 2
    started = time.perf_counter()
    nvml.nvmlInit()  # our own reference for the direct getter calls; NVML counts inits
    report: dict[str, Any] = {"settings_changed": False, "fake": args.fake, "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    try:
        run(nvml, backend, exact, args, report)
    finally:
        exact.close()
        backend.close()
        nvml.nvmlShutdown()
    report["total_seconds"] = time.perf_counter() - started
    print(f"\ndone in {report['total_seconds']:.0f} s; no GPU setting was changed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


def run(nvml: Any, backend: NvmlBackend, exact: NvmlBackend, args: argparse.Namespace,
        report: dict[str, Any]) -> None:
    """Every measurement, in order; fills ``report``. ``exact`` reads the counter every time."""
    index = args.gpu
    devices = backend.devices()
    if not 0 <= index < len(devices):
        raise SystemExit(f"--gpu {index}: NVML sees {len(devices)} GPU(s)")
    info = devices[index]
    report["environment"] = {
        "driver": _safe(lambda: nvml.nvmlSystemGetDriverVersion()),
        "nvml": _safe(lambda: nvml.nvmlSystemGetNVMLVersion()),
        "python": platform.python_version(),
        "host": platform.node(),
        "gpus": len(devices),
    }
    print(f"== NVML {report['environment']['nvml']}, driver {report['environment']['driver']}, "
          f"{len(devices)} GPU(s)")
    report["devices"] = [asdict(d) for d in devices]
    for d in devices:
        print(f"  GPU {d.index}: {d.name} {d.uuid}")

    print(f"\n== GPU {index}: every field through NvmlBackend")
    reading = backend.read(index)
    report["reading"] = asdict(reading)
    report["supported_fields"] = sorted(backend.supported_fields(index))
    report["supported_sm_clocks_mhz"] = list(backend.supported_sm_clocks(index))
    for key, value in {**asdict(info), **asdict(reading)}.items():
        print(f"  {key:<22} {value}")
    missing = sorted(set(reading.__dataclass_fields__) - {"index", "sampled_at", "processes"}
                     - set(report["supported_fields"]))
    print(f"  unsupported fields     {missing or 'none'}")
    print(f"  supported SM clocks    {len(report['supported_sm_clocks_mhz'])} steps")

    print(f"\n== NVML call latency ({args.calls} calls each, idle GPU)")
    timings = time_calls(nvml, backend, exact, index, args.calls)
    report["call_latency"] = timings
    for name, t in timings.items():
        if "error" in t:
            print(f"  {name:<44} {t['error']}")
        else:
            print(f"  {name:<44} median {t['median_us']:8.1f} µs  p99 {t['p99_us']:8.1f} µs"
                  f"  cpu {t['cpu_us_per_call']:7.1f} µs")
    read_t = timings.get("NvmlBackend.read (counter every call)", {})
    if "cpu_us_per_call" in read_t:
        share = read_t["cpu_us_per_call"] * 80 / 1e6  # 8 GPUs × 10 Hz, CPU s per s
        report["cpu_share_8gpus_10hz_counter_every_read"] = share
        print(f"  => with the counter on every read, 8 GPUs at 10 Hz would use {share:.2%} of "
              "one core (budget < 1%; the daemon's way is measured under load below)")

    print("\n== idle (2 s at 10 Hz)")
    idle = sample(backend, index, 10, 2.0)
    report["idle"] = phase_summary(10, idle)
    print(f"  power {_w(report['idle']['power_mean_mw'])}, "
          f"SM {report['idle']['sm_clock_median_mhz']} MHz")

    load: Load | None = None
    if args.no_load:
        print("\n== no load (--no-load)")
    elif args.fake:
        print("\n== no load (--fake)")
    else:
        print(f"\n== starting a {args.dtype} {args.size}² matmul load on cuda:{index}")
        load = Load(index, args.dtype, args.size)
        if not load.start():
            report["load"] = load.stop()
            print(f"  load failed: {report['load'].get('error')}; sampling without load")
            load = None
        else:
            time.sleep(3.0)  # let power and clocks settle under load
    report["loaded"] = load is not None

    phases: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    try:
        for rate in RATES_HZ:
            samples = sample(exact, index, rate, args.seconds)
            summary = phase_summary(rate, samples)
            phases[str(rate)] = summary
            raw[str(rate)] = [asdict(s) for s in samples]
            e = summary["energy"]
            rel = e.get("power_mw_rel_diff")
            print(f"  {rate:>3} Hz: {summary['samples']} reads at {summary['achieved_hz']:.1f} Hz"
                  f", read median {summary['read_median_us']:.0f} µs p99 "
                  f"{summary['read_p99_us']:.0f} µs, power {_w(summary['power_mean_mw'])} "
                  f"({_w(summary['power_min_mw'])}..{_w(summary['power_max_mw'])}), SM "
                  f"{summary['sm_clock_median_mhz']} MHz, util {summary['gpu_util_median_pct']}%"
                  f", reasons {summary['throttle_reasons_seen']}")
            print(f"          energy counter {e.get('counter_mj')} mJ vs ∫instant "
                  f"{e.get('power_mw_integrated_mj')} mJ: "
                  f"{'n/a' if rel is None else f'{rel:+.2%}'}")
        report["daemon_way"] = daemon_way(nvml, backend, index, 2 * args.seconds)
        report["getters_10hz"] = getters_at_rate(nvml, index, 10, args.seconds)
        print(f"\n== sensor update periods (tight polling, {args.poll_seconds:.0f} s)")
        periods = poll_sensors(nvml, index, args.poll_seconds)
        report["update_period"] = periods
        for name, p in periods.items():
            med = p["median_ms"]
            print(f"  {name:<14} {p['changes']:>5} changes in {p['samples']} polls: "
                  + ("too few changes" if med is None else
                     f"every {med:.1f} ms (p10 {p['p10_ms']:.1f}, p90 {p['p90_ms']:.1f})"))
    finally:
        if load is not None:
            report["load"] = load.stop()
            lr = report["load"]
            if lr.get("ok"):
                print(f"\n== load: {lr['matmuls']} matmuls in {lr['seconds']:.1f} s = "
                      f"{lr['tflops']:.0f} TFLOP/s on {lr['device']} (torch {lr['torch']})")
                if lr.get("uuid") and lr["uuid"] not in info.uuid:
                    print(f"  WARNING: the load ran on {lr['uuid']}, not {info.uuid}: check "
                          "CUDA_VISIBLE_DEVICES")
            else:
                print(f"\n== load failed: {lr.get('error')}")
    report["phases"] = phases
    report["samples"] = raw

    if phases:
        print("\n== energy counter vs integrated power, per loaded window")
        for label, summary in phases.items():
            e = summary["energy"]
            for name in ("power_mw", "power_avg_mw"):
                rel = e.get(f"{name}_rel_diff")
                print(f"  {label:>3} Hz {name:<13} "
                      + ("n/a" if rel is None else
                         f"counter {e['counter_mj'] / 1e3:9.1f} J  integrated "
                         f"{e[f'{name}_integrated_mj'] / 1e3:9.1f} J  diff {rel:+.2%}"))


def getters_at_rate(nvml: Any, index: int, rate_hz: float, seconds: float) -> dict[str, Any]:
    """Each getter once per tick at ``rate_hz``, as the sampler calls them: median/p99 wall and
    mean CPU µs per getter (back-to-back timings in ``time_calls`` can hide cold-call costs)."""
    getters = []
    for name, fn in nvml_getters(nvml, index):
        try:
            fn()
        except Exception:  # unsupported here; time_calls reports why
            continue
        getters.append((name, fn))
    wall: dict[str, list[float]] = {name: [] for name, _ in getters}
    cpu: dict[str, float] = dict.fromkeys(wall, 0.0)
    period = 1.0 / rate_hz
    start = time.perf_counter()
    ticks = int(seconds * rate_hz)
    for k in range(ticks):
        delay = start + k * period - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        for name, fn in getters:
            c0 = time.process_time()
            t0 = time.perf_counter_ns()
            fn()
            wall[name].append((time.perf_counter_ns() - t0) / 1e3)
            cpu[name] += time.process_time() - c0
    out = {name: {"median_us": statistics.median(w), "p99_us": percentile(w, 99),
                  "cpu_us_per_call": cpu[name] / ticks * 1e6} for name, w in wall.items()}
    print(f"  getters at {rate_hz:.0f} Hz under load, {ticks} ticks:")
    for name, t in out.items():
        print(f"    {name:<44} median {t['median_us']:8.1f} µs  p99 {t['p99_us']:8.1f} µs"
              f"  cpu {t['cpu_us_per_call']:7.1f} µs")
    return out


def daemon_way(nvml: Any, backend: NvmlBackend, index: int, seconds: float,
               gpus: int = 8) -> dict[str, Any]:
    """The sampler's tick at 10 Hz for ``gpus`` GPUs, emulated on this one: each tick reads it
    through ``gpus`` backends (each with its own energy-counter schedule, as ``gpus`` GPUs would
    have), back to back as the sampler does. CPU per tick, counter period, and the energy the
    first backend reports against the counter's own delta."""
    extra = [NvmlBackend(nvml=nvml) for _ in range(gpus - 1)]
    every = [backend, *extra]
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    try:
        for b in every:
            b.read(index)
        counter0 = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        first = backend.read(index)
        period = 0.1
        start = time.perf_counter()
        tick_us: list[float] = []
        cpu_s = 0.0
        for k in range(1, int(seconds / period) + 1):
            delay = start + k * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            c0 = time.process_time()
            t0 = time.perf_counter()
            readings = [b.read(index) for b in every]
            tick_us.append((time.perf_counter() - t0) * 1e6)
            cpu_s += time.process_time() - c0
        last = readings[0]
        counter1 = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        span = time.perf_counter() - start
    finally:
        for b in extra:
            b.close()
    reported = (None if first.energy_mj is None or last.energy_mj is None
                else last.energy_mj - first.energy_mj)
    counter = counter1 - counter0
    out = {
        "gpus_emulated": gpus, "seconds": span, "ticks": len(tick_us),
        "counter_period_s": backend.counter_period(index),
        "cpu_share": cpu_s / span,
        "tick_median_us": statistics.median(tick_us), "tick_p99_us": percentile(tick_us, 99),
        "reported_mj": reported, "counter_mj": counter,
        "rel_diff": None if reported is None or counter <= 0 else (reported - counter) / counter,
    }
    cp = out["counter_period_s"]
    print(f"  daemon's way: {gpus} reads per tick at 10 Hz for {span:.1f} s (the sampler's tick "
          f"for {gpus} GPUs): tick median {out['tick_median_us']:.0f} µs p99 "
          f"{out['tick_p99_us']:.0f} µs, CPU {out['cpu_share']:.2%} of a core (budget < 1%); "
          f"counter read every {'n/a' if cp is None else f'{cp:.2f} s'}")
    rel = out["rel_diff"]
    print(f"          reported energy {reported} mJ vs counter {counter} mJ: "
          f"{'n/a' if rel is None else f'{rel:+.2%}'}")
    return out


def _safe(fn: Callable[[], Any]) -> str:
    try:
        return str(fn())
    except Exception as err:
        return f"unknown ({err})"


if __name__ == "__main__":
    sys.exit(main())
