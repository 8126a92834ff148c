"""Prometheus metrics: the daemon's latest state as Prometheus text, on an HTTP port of its own.

``powertrain daemon --metrics-address HOST:PORT`` serves ``/metrics`` with prometheus-client's own
HTTP server, on a registry of its own (no process or platform collectors). Every scrape is built
by ``PowertrainCollector.collect`` from what the daemon already holds in memory: the sampler's
latest reading of each GPU, each GPU's energy as ``GpuEnergy`` adds it up, the sample writer's
counts, the job service's snapshot of its running jobs (``JobService.running_jobs``, refreshed by
the control tick) and the daemon's task timings (``DaemonHealth``). A scrape never reads a GPU or
the store, so it costs the same whatever the store's size or the GPUs' speed, and a slow or
failing store cannot hold it up.

The series are bounded: a fixed set per GPU (the throttle reasons are NVML's eleven), a fixed set
per job while it is active (running or paused) on this node, gone once it ends, and a fixed set
for the daemon; docs/metrics.md lists them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from energy.counters import EnergySample, interval_energy
from energy.units import mhz_to_hz, mj_to_j, mw_to_w, pct_to_ratio, wh_to_j
from scheduler.service import RunningJob
from scheduler.settings import host_port
from telemetry.backends.base import GpuInfo, GpuReading, ThrottleReason
from telemetry.sampler import LatestReadings, WriterStats
from telemetry.store import Store
from telemetry.store.models import to_epoch_us

SUGGESTED_PORT = 9488
"""The port docs/metrics.md suggests for ``--metrics-address`` (there is no default: metrics are
off unless an address is given)."""

THROTTLE_REASONS: tuple[ThrottleReason, ...] = tuple(r for r in ThrottleReason if r)
"""Every throttle reason: a GPU has one ``powertrain_gpu_throttle_reason`` series for each that is
active on it."""

TASK_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5)
"""Upper bounds, s, of the daemon tasks' duration histogram buckets (``+Inf`` added)."""

_F = TypeVar("_F", bound=Callable[[], Any])


def reason_name(reason: ThrottleReason) -> str:
    """A throttle reason's label value: its name in lower case, as ``gpus --json`` writes it."""
    return str(reason.name).lower()


class GpuEnergy:
    """Each GPU's energy since it was first sampled into the store, J: a counter that restarts
    nowhere.

    At daemon start ``from_store`` reads each GPU's stored energy (the rollups' running energy,
    then the raw samples after the last rolled-up minute) and its latest stored sample; from
    there each reading the sampler takes (``observe``) adds the interval since the previous one
    with the store's own rule (``energy.counters.interval_energy``: the counter's delta, or the
    trapezoid of power across a counter reset or on a GPU without a counter). The total is
    therefore what the store holds for the same samples, it continues across daemon restarts
    (the interval from the previous daemon's last sample to this one's first counts too, as it
    does in the store) and a counter reset never makes it go down.

    Args:
        totals_mj: Each GPU's energy so far, mJ (absent: 0).
        last: Each GPU's latest sample so far, the start of its next interval.
    """

    def __init__(
        self,
        totals_mj: Mapping[int, float] | None = None,
        last: Mapping[int, EnergySample] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._total_mj: dict[int, float] = dict(totals_mj or {})
        self._last: dict[int, EnergySample] = dict(last or {})

    @classmethod
    def from_store(cls, store: Store, gpu_ids: Mapping[int, int]) -> GpuEnergy:
        """Each GPU's stored energy and latest sample (a few queries per GPU, once at start:
        the rollups' running energy keeps it cheap however long the store's history).

        Args:
            store: The daemon's store.
            gpu_ids: GPU index → the GPU's id in the store.
        """
        by_id = {gpu_id: index for index, gpu_id in gpu_ids.items()}
        latest = store.latest_samples(list(by_id))
        # from the epoch to just past the latest sample: everything the store holds
        points = {gpu_id: [0, to_epoch_us(s.sampled_at) + 1] for gpu_id, s in latest.items()}
        totals: dict[int, float] = {}
        for gpu_id, segments in store.segment_energy_us(points, source="rollups").items():
            totals[by_id[gpu_id]] = sum(seg.energy_mj for seg in segments)
        last = {
            by_id[gpu_id]: EnergySample(
                s.sampled_at.timestamp(), s.energy_mj,
                s.power_mw if s.power_mw is not None else s.power_avg_mw,
            )
            for gpu_id, s in latest.items()
        }
        return cls(totals, last)

    def observe(self, index: int, reading: GpuReading) -> None:
        """Add the interval from the GPU's previous reading to this one."""
        power = reading.power_mw if reading.power_mw is not None else reading.power_avg_mw
        sample = EnergySample(reading.sampled_at.timestamp(), reading.energy_mj, power)
        with self._lock:
            prev = self._last.get(index)
            self._last[index] = sample
            if prev is None:
                self._total_mj.setdefault(index, 0.0)
                return
            if (prev.energy_mj is not None and sample.energy_mj is not None
                    and sample.energy_mj >= prev.energy_mj):
                added: float | None = float(sample.energy_mj - prev.energy_mj)
            elif sample.t_s < prev.t_s:  # the wall clock stepped back: the interval has no length
                added = None
            else:
                added = interval_energy(prev, sample).energy_mj
            self._total_mj[index] = self._total_mj.get(index, 0.0) + (added or 0.0)

    def totals(self) -> dict[int, tuple[float, float | None]]:
        """GPU index → (energy so far, J; the time of the latest sample counted, epoch s)."""
        with self._lock:
            return {
                index: (mj_to_j(total), last.t_s if (last := self._last.get(index)) else None)
                for index, total in self._total_mj.items()
            }


class DaemonHealth:
    """How the daemon's scheduled tasks went: each one's duration (a histogram) and failures.

    The tasks are the names the daemon wraps with ``timed`` (``control``, ``flush``, ``rollup``,
    ...): a fixed set in the code, so their series are bounded.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, list[int]] = {}
        self._sum_s: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def timed(self, task: str, fn: _F) -> _F:
        """``fn`` timed and its failures counted under ``task``; the wrapper keeps ``fn``'s name
        and lets its exceptions through. The task's series show from now on, at zero."""
        self._add(task)

        def wrapper() -> Any:
            start = self._clock()
            try:
                return fn()
            except BaseException:
                with self._lock:
                    self._failures[task] += 1
                raise
            finally:
                self.record(task, self._clock() - start)

        wrapper.__name__ = getattr(fn, "__name__", task)
        return wrapper  # type: ignore[return-value]

    def record(self, task: str, duration_s: float) -> None:
        """Count one run of ``task`` that took ``duration_s``."""
        slot = next((i for i, le in enumerate(TASK_BUCKETS_S) if duration_s <= le),
                    len(TASK_BUCKETS_S))
        self._add(task)
        with self._lock:
            self._buckets[task][slot] += 1
            self._sum_s[task] += duration_s

    def snapshot(self) -> dict[str, tuple[list[int], float, int]]:
        """Task → (runs per bucket, not cumulative, the last being ``+Inf``; total seconds;
        failures)."""
        with self._lock:
            return {t: (list(b), self._sum_s[t], self._failures[t])
                    for t, b in self._buckets.items()}

    def _add(self, task: str) -> None:
        with self._lock:
            if task not in self._buckets:
                self._buckets[task] = [0] * (len(TASK_BUCKETS_S) + 1)
                self._sum_s[task] = 0.0
                self._failures[task] = 0


class PowertrainCollector(Collector):
    """The daemon's metrics, built at each scrape from its in-memory state only.

    Args:
        node: This node's name (the ``node`` label of every series).
        infos: The GPUs' probed facts, by index (their UUIDs label the GPU series).
        readings: Each GPU's latest fresh reading (the sampler).
        energy: Each GPU's energy counter.
        writer_stats: The sample writer's counts (``BatchWriter.stats``).
        running_jobs: The jobs active on this node as the last control tick saw them
            (``JobService.running_jobs``).
        health: The daemon's task timings.
        version / backend: For ``powertrain_daemon_info``.
        clock: Wall-clock time, epoch s (the sampler's lag is measured against it).
    """

    def __init__(
        self,
        *,
        node: str,
        infos: Mapping[int, GpuInfo],
        readings: LatestReadings,
        energy: GpuEnergy,
        writer_stats: Callable[[], WriterStats],
        running_jobs: Callable[[], Sequence[RunningJob]],
        health: DaemonHealth,
        version: str,
        backend: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._node = node
        self._infos = dict(sorted(infos.items()))
        self._readings = readings
        self._energy = energy
        self._writer_stats = writer_stats
        self._running_jobs = running_jobs
        self._health = health
        self._version = version
        self._backend = backend
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        now_s = self._clock()
        yield from self._gpus(now_s)
        yield from self._jobs()
        yield from self._daemon(now_s)

    # -- per GPU ---------------------------------------------------------------------------------

    def _gpus(self, now_s: float) -> Iterator[Metric]:
        labels = ["node", "gpu", "uuid"]
        readings = self._readings.latest()
        energy = self._energy.totals()

        def gauge(name: str, doc: str, unit: str = "") -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels, unit=unit)

        up = gauge("powertrain_gpu_up", "1 while the GPU has a fresh reading (read within the "
                   "last two sampling periods), 0 while it is lost or failing.")
        power = gauge("powertrain_gpu_power_watts",
                      "Average power over the last second (power.draw.average), W.")
        limit = gauge("powertrain_gpu_power_limit_watts",
                      "Enforced power limit (enforced.power.limit), W.")
        sm_clock = gauge("powertrain_gpu_sm_clock_hertz", "SM clock (clocks.sm), Hz.")
        mem_clock = gauge("powertrain_gpu_memory_clock_hertz", "Memory clock (clocks.mem), Hz.")
        util = gauge("powertrain_gpu_utilization_ratio",
                     "Share of the last sample period a kernel ran (utilization.gpu), 0 to 1.")
        mem_util = gauge("powertrain_gpu_memory_utilization_ratio",
                         "Share of the last sample period memory was read or written "
                         "(utilization.memory), 0 to 1.")
        temp = gauge("powertrain_gpu_temperature_celsius", "Core temperature (temperature.gpu).")
        mem_used = gauge("powertrain_gpu_memory_used_bytes", "Framebuffer in use (memory.used).")
        throttle = GaugeMetricFamily(
            "powertrain_gpu_throttle_reason",
            "1 for each clock event (throttle) reason active on the GPU "
            "(clocks_event_reasons.active); a reason that is not active has no series.",
            labels=[*labels, "reason"],
        )
        joules = CounterMetricFamily(
            "powertrain_gpu_energy_joules",
            "Energy since the GPU was first sampled into the store, J: the energy counter's "
            "deltas, power across counter resets; continues across daemon restarts.",
            labels=labels,
        )
        sampled = gauge("powertrain_gpu_last_sample_timestamp_seconds",
                        "When the latest reading counted in powertrain_gpu_energy_joules_total "
                        "was taken, Unix time.")
        for index, info in self._infos.items():
            values = [self._node, str(index), info.uuid]
            r = readings.get(index)
            up.add_metric(values, 1.0 if r is not None else 0.0)
            if index in energy:
                total_j, at_s = energy[index]
                joules.add_metric(values, total_j)
                if at_s is not None:
                    sampled.add_metric(values, at_s)
            if r is None:
                continue
            _add(power, values, r.power_avg_mw, mw_to_w)
            _add(limit, values, r.power_limit_mw, mw_to_w)
            _add(sm_clock, values, r.sm_clock_mhz, mhz_to_hz)
            _add(mem_clock, values, r.mem_clock_mhz, mhz_to_hz)
            _add(util, values, r.gpu_util_pct, pct_to_ratio)
            _add(mem_util, values, r.mem_util_pct, pct_to_ratio)
            _add(temp, values, r.temperature_c, float)
            _add(mem_used, values, r.memory_used_bytes, float)
            if r.throttle_reasons:
                for reason in THROTTLE_REASONS:
                    if r.throttle_reasons & reason:
                        throttle.add_metric([*values, reason_name(reason)], 1.0)
        yield from (up, power, joules, limit, sm_clock, mem_clock, util, mem_util, temp,
                    mem_used, throttle, sampled)

    # -- per job ---------------------------------------------------------------------------------

    def _jobs(self) -> Iterator[Metric]:
        labels = ["node", "job_id", "user"]
        info = InfoMetricFamily(
            "powertrain_job",
            "A job active on this node: its name, state, GPUs here, requested and effective "
            "wattage mode, and whether this node owns it (takes its energy decisions).",
            labels=[*labels, "name", "state", "gpus", "mode", "mode_effective", "on_exceed",
                    "owner"],
        )
        power = GaugeMetricFamily(
            "powertrain_job_power_watts",
            "Average power (1 s) summed over the job's GPUs on this node, W.", labels=labels)
        budget = GaugeMetricFamily(
            "powertrain_job_power_budget_watts",
            "The job's wattage budget in force (per GPU, as held after the node cap) times its "
            "GPUs on this node, W.", labels=labels)
        joules = CounterMetricFamily(
            "powertrain_job_energy_joules",
            "The job's energy so far, every GPU of the run on every node, as its budget loop "
            "adds it up, J (on the node that owns the job only).", labels=labels)
        energy_budget = GaugeMetricFamily(
            "powertrain_job_energy_budget_joules",
            "The job's energy budget, J (on the node that owns the job only).", labels=labels)
        tokens = CounterMetricFamily(
            "powertrain_job_tokens",
            "Tokens the run has processed, as its ranks last reported (on the node that owns "
            "the job only).", labels=labels)
        for job in self._running_jobs():
            values = [self._node, str(job.id), job.user]
            info.add_metric(values, {
                "name": job.name,
                "state": job.state,
                "gpus": ",".join(map(str, job.gpus)),
                "mode": job.mode,
                "mode_effective": job.mode_effective or "",
                "on_exceed": job.on_exceed,
                "owner": "true" if job.owner else "false",
            })
            if job.power_w is not None:
                power.add_metric(values, job.power_w)
            if job.budget_w is not None and job.gpus:
                budget.add_metric(values, job.budget_w * len(job.gpus))
            if not job.owner:
                continue
            if job.energy_j is not None:
                joules.add_metric(values, job.energy_j)
            if job.energy_budget_wh is not None:
                energy_budget.add_metric(values, wh_to_j(job.energy_budget_wh))
            tokens.add_metric(values, float(job.tokens))
        yield from (info, power, budget, joules, energy_budget, tokens)

    # -- the daemon ------------------------------------------------------------------------------

    def _daemon(self, now_s: float) -> Iterator[Metric]:
        node = [self._node]
        yield _info("powertrain_daemon", "The daemon: its version and GPU backend.", node,
                    {"version": self._version, "backend": self._backend})
        newest = max((at for _, at in self._energy.totals().values() if at is not None),
                     default=None)
        lag = GaugeMetricFamily(
            "powertrain_sampler_lag_seconds",
            "Age of the newest reading any GPU gave (how far the sampler lags now), s.",
            labels=["node"])
        if newest is not None:
            lag.add_metric(node, max(0.0, now_s - newest))
        yield lag
        stats = self._writer_stats()
        yield _gauge("powertrain_store_rows_buffered",
                     "Samples taken and not yet written to the store.", node, stats.pending)
        yield _counter("powertrain_store_rows_written", "Samples written to the store.", node,
                       stats.written)
        yield _counter("powertrain_store_rows_dropped",
                       "Samples dropped because the buffer was full while the store failed.",
                       node, stats.dropped)
        yield _counter("powertrain_store_write_failures",
                       "Flushes of samples that the store refused (the rows are kept and "
                       "retried).", node, stats.failed_flushes)
        yield _gauge("powertrain_store_failing",
                     "1 while the store refuses the sampler's writes, else 0.", node,
                     1.0 if stats.store_failing else 0.0)
        durations = HistogramMetricFamily(
            "powertrain_daemon_task_duration_seconds",
            "Duration of the daemon's scheduled tasks (control: the once-a-second control "
            "tick), s.", labels=["node", "task"])
        failures = CounterMetricFamily(
            "powertrain_daemon_task_failures",
            "Runs of the daemon's scheduled tasks that failed (logged; the task runs again at "
            "its next slot).", labels=["node", "task"])
        for task, (counts, sum_s, failed) in self._health.snapshot().items():
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for le, count in zip((*TASK_BUCKETS_S, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if le == float("inf") else repr(le), float(cumulative)))
            durations.add_metric([self._node, task], buckets, sum_s)
            failures.add_metric([self._node, task], float(failed))
        yield durations
        yield failures


def _add(family: GaugeMetricFamily, values: list[str], raw: int | None,
         convert: Callable[[float], float]) -> None:
    """One series of ``family``, unless the GPU gave no value."""
    if raw is not None:
        family.add_metric(values, convert(raw))


def _gauge(name: str, doc: str, values: list[str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["node"])
    family.add_metric(values, float(value))
    return family


def _counter(name: str, doc: str, values: list[str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["node"])
    family.add_metric(values, float(value))
    return family


def _info(name: str, doc: str, values: list[str], info: dict[str, str]) -> InfoMetricFamily:
    family = InfoMetricFamily(name, doc, labels=["node"])
    family.add_metric(values, info)
    return family


class MetricsServer:
    """``/metrics`` on ``HOST:PORT`` over plain HTTP, from prometheus-client's own server, on a
    registry holding only ``collector``.

    Args:
        address: ``HOST:PORT`` (``[V6]:PORT`` for IPv6), as ``scheduler.settings.host_port``
            reads it.
        collector: What a scrape shows.
    """

    def __init__(self, address: str, collector: Collector) -> None:
        self.address = address
        self._host, self._port = host_port(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve from a thread of its own.

        Raises:
            OSError: The address cannot be bound (in use, not this host's, no such name); the
                message names the address.
        """
        try:
            self._server, self._thread = start_http_server(
                self._port, self._host, registry=self.registry
            )
        except OSError as exc:
            raise OSError(f"metrics address {self.address}: {exc.strerror or exc}") from exc

    @property
    def port(self) -> int:
        """The bound port."""
        return self._port

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

