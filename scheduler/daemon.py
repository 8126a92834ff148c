"""The daemon: a thread of its own samples, APScheduler drives flushes, the job control loop,
rollups and retention, and the API serves requests, until SIGTERM/SIGINT. Jobs keep running when
the daemon stops.

This is the only module that imports APScheduler.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import IO, Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import make_url

from energy.units import ms_to_s
from scheduler import systemd
from scheduler.api import ApiServer, bind_socket, bind_tcp, create_app
from scheduler.cluster.cap import TICK_S as CLUSTER_TICK_S
from scheduler.cluster.cap import ClusterCap
from scheduler.cluster.ray.supervise import ReserveProcess
from scheduler.launcher import choose_runner_python
from scheduler.metrics import DaemonHealth, GpuEnergy, MetricsServer, PowertrainCollector
from scheduler.service import JobService
from scheduler.settings import Settings
from scheduler.sim_adapter import sim_adapter_for
from scheduler.store.tokens import TokenStore
from telemetry.backends.base import GpuBackend
from telemetry.sampler import BatchWriter, Sampler
from telemetry.store import Store
from telemetry.store.nodes import HEARTBEAT_INTERVAL_S

log = logging.getLogger(__name__)

ROLLUP_INTERVAL_S = 60.0
RETENTION_INTERVAL_S = 3600.0
RAY_CHECK_INTERVAL_S = 5.0


def package_version() -> str:
    """The installed powertrain's version (``unknown`` where it is not installed)."""
    try:
        return metadata.version("powertrain")
    except metadata.PackageNotFoundError:
        return "unknown"


class DaemonAlreadyRunningError(RuntimeError):
    """Another daemon holds this home's lock."""


@contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """Hold ``home/daemon.pid`` locked for the daemon's life, so one daemon runs per home."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "daemon.pid"
    handle: IO[str] = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "?"
            raise DaemonAlreadyRunningError(
                f"another powertrain daemon (pid {pid}) is running on {home}"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


class Ticker:
    """Calls ``fn`` every ``period_s`` seconds on a thread of its own, on a fixed grid (no drift).

    The sampling tick runs ten times a second, and dispatching it through APScheduler (its
    thread waking, a pool worker taking the job) cost more CPU than a plain timed wait. A call
    that overruns skips the slots it missed, as APScheduler's coalescing did; a failing call is
    logged, and the next one runs on time.
    """

    def __init__(self, fn: Callable[[], Any], period_s: float, name: str) -> None:
        if not period_s > 0:
            raise ValueError(f"the period must be positive, got {period_s}")
        self._fn = fn
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the call in progress, if any."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            try:
                self._fn()
            except Exception:
                log.exception("%s failed", self._thread.name)
            due += self._period_s
            late = time.monotonic() - due
            if late > 0:
                due += math.ceil(late / self._period_s) * self._period_s


class Daemon:
    """Samples every GPU into the store on a schedule.

    Args:
        settings: Intervals, buffer bound and retention.
        backend: The GPUs.
        store: Where samples go; the daemon owns it from here on and closes it.
        host: Node name recorded with each GPU (default: this host's name).
    """

    def __init__(
        self, settings: Settings, backend: GpuBackend, store: Store, *, host: str | None = None
    ) -> None:
        python, problem = choose_runner_python(settings.runner_python, settings.socket_group)
        if problem:
            log.warning("%s", problem)
        self.settings = settings = settings.model_copy(update={"runner_python": python})
        self.backend = backend
        self.store = store
        self.host = host or socket.gethostname()
        self.gpu_ids = store.register_gpus(backend.devices(), host=self.host, backend=backend.name)
        self.writer = BatchWriter(store, max_rows=settings.buffer_max_rows)
        self.health = DaemonHealth()
        # With metrics, each GPU's energy counter goes on from what the store holds.
        self.energy = (GpuEnergy.from_store(store, self.gpu_ids)
                       if settings.metrics_address else None)
        # The control loop observes the sampler's latest readings: a reading is fresh for two
        # sampling periods, and never less than a second (one control interval at the default).
        self.sampler = Sampler(backend, self.gpu_ids, self.writer,
                               fresh_s=max(1.0, ms_to_s(2 * settings.interval_ms)),
                               observer=self.energy)
        self.cluster = ClusterCap(store, self.host)
        self.service = JobService(settings, store, backend, self.gpu_ids, host=self.host,
                                  readings=self.sampler, sim=sim_adapter_for(backend),
                                  cluster=self.cluster)
        for entry in self.service.actuators.recover():
            log.warning(
                "recovery: GPU %d %s for job %s, left by a previous daemon: %s",
                entry.gpu_index,
                entry.describe(),
                entry.job_id,
                entry.status,
            )
        self.metrics = None if self.energy is None else MetricsServer(
            settings.metrics_address or "", PowertrainCollector(
                node=self.host, infos={d.index: d for d in backend.devices()},
                readings=self.sampler, energy=self.energy, writer_stats=self.writer.stats,
                running_jobs=self.service.running_jobs, health=self.health,
                version=package_version(), backend=backend.name,
            ),
        )
        app = create_app(self.service, admin_group=settings.admin_group,
                         tokens=TokenStore(store.engine).verify)
        unix = bind_socket(settings.socket_path, group=settings.socket_group)
        self._apis = [ApiServer(app, unix)]
        if settings.listen_address is not None:
            try:
                self._apis.append(ApiServer(app, bind_tcp(*settings.listen_address),
                                            tls=settings.tls))
            except BaseException:
                self._apis[0].stop()
                raise
        self._stopped = threading.Event()
        # With a Ray address, a child process keeps this node's reservation in Ray (docs/ray.md).
        self._ray = (ReserveProcess(settings.ray_address, settings.socket_path)
                     if settings.ray_address else None)
        self._sampling = Ticker(self.sampler.tick, ms_to_s(settings.interval_ms), "sampler")
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 5},
            timezone=UTC,
        )

    def start(self) -> None:
        """Register the node, schedule the jobs and start the scheduler's thread.

        Raises:
            OSError: The metrics address could not be bound.
        """
        if self.metrics is not None:
            self.metrics.start()  # first: an address in use stops the start here
            log.info("Prometheus metrics on http://%s/metrics", self.metrics.address)
        self._guard(self._register_node)()  # if it fails, the first heartbeat registers it
        every = self._scheduler.add_job
        now = datetime.now(UTC)
        timed = self.health.timed
        every(timed("flush", self.writer.flush), "interval",
              seconds=self.settings.flush_interval_s, id="flush")
        every(
            self._guard(timed("control", self.service.tick)),
            "interval",
            seconds=self.settings.control_interval_s,
            id="control",
            next_run_time=now,
        )
        every(self._guard(timed("rollup", self._rollup)), "interval",
              seconds=ROLLUP_INTERVAL_S, id="rollup")
        every(self._guard(timed("heartbeat", self._heartbeat)), "interval",
              seconds=HEARTBEAT_INTERVAL_S, id="heartbeat")
        every(self._guard(timed("cluster", self.cluster.tick)), "interval",
              seconds=CLUSTER_TICK_S, id="cluster", next_run_time=now)
        every(
            self._guard(timed("retention", self._retention)),
            "interval",
            seconds=RETENTION_INTERVAL_S,
            id="retention",
            next_run_time=now,
        )
        if self._ray is not None:
            every(self._guard(self._ray.check), "interval", seconds=RAY_CHECK_INTERVAL_S,
                  id="ray")
        # Sampling first: the control job's first tick observes the sampler's readings.
        self._sampling.start()
        self._scheduler.start()
        for api in self._apis:
            api.start()
        if self._ray is not None:
            self._ray.check()  # after the API: the child reads the node's headroom there
        log.info(
            "sampling %d GPUs every %d ms into %s; API on %s",
            len(self.gpu_ids),
            self.settings.interval_ms,
            make_url(self.settings.db_url).render_as_string(hide_password=True),
            self.api_where,
        )

    @property
    def api_where(self) -> str:
        """Where the API is served, for people."""
        where = str(self.settings.socket_path)
        if self.settings.listen is not None:
            scheme = "https" if self.settings.tls else "http"
            where += f" and {scheme}://{self.settings.listen} (with tokens)"
        return where

    def stop(self) -> None:
        """Stop scheduling, write what is buffered, roll up, mark the node stopped, and release
        the store and backend."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._ray is not None:
            self._ray.stop()  # its reservation stays in Ray while the jobs go on
        for api in self._apis:
            api.stop()
        if self.metrics is not None:
            self.metrics.stop()
        self._sampling.stop()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        self._guard(self.cluster.stop)()  # another node leads at once
        self.service.actuators.undo_all("daemon stopped")
        self.writer.flush()
        self._guard(self._rollup)()
        stats = self.writer.stats()
        if stats.pending or stats.dropped:
            log.error(
                "stopping with %d rows unwritten and %d dropped", stats.pending, stats.dropped
            )
        self._guard(self._node_stopped)()
        self.backend.close()
        self.store.close()
        log.info("stopped: %d samples written", stats.written)

    def run(self) -> int:
        """Run in the foreground until SIGTERM or SIGINT; returns the exit status."""
        wake = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("%s received: flushing and stopping", signal.Signals(signum).name)
            wake.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            # Type=notify: systemd counts the daemon started once it samples and serves.
            systemd.notify(f"READY=1\nSTATUS=sampling {len(self.gpu_ids)} GPUs of node "
                           f"{self.host}; API on {self.api_where}")
            while not wake.wait(0.5):
                pass
            systemd.notify("STOPPING=1")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()
        return 0

    def _rollup(self) -> None:
        # this node's GPUs only: other daemons on a shared store roll up their own
        self.store.rollup(datetime.now(UTC), host=self.host)

    def _register_node(self) -> None:
        self.store.register_node(
            name=self.host, gpu_count=len(self.gpu_ids), backend=self.backend.name,
            version=package_version(), pid=os.getpid(), at=datetime.now(UTC),
        )

    def _heartbeat(self) -> None:
        # a node not in the registry (its registration failed) is registered now
        if not self.store.heartbeat(self.host, datetime.now(UTC)):
            self._register_node()

    def _node_stopped(self) -> None:
        self.store.node_stopped(self.host, datetime.now(UTC))

    def _retention(self) -> None:
        self.store.apply_retention(
            datetime.now(UTC), self.settings.retention_days, host=self.host
        )

    @staticmethod
    def _guard(job: Callable[[], Any]) -> Callable[[], None]:
        """Log a failing maintenance job instead of letting it kill anything; it runs again."""

        def guarded() -> None:
            try:
                job()
            except Exception as exc:
                log.error("%s failed: %s", job.__name__.lstrip("_"), exc)

        guarded.__name__ = job.__name__
        return guarded
