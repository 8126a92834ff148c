"""Sampling: one tick reads every GPU once, keeps each GPU's latest reading, and a writer stores
the rows in batches.

A GPU that fails never holds up the others: a lost GPU is marked and retried with exponential
backoff. The latest readings are what the control loop observes (``LatestReadings``), so the GPUs
are read once, here. The writer keeps rows in a bounded buffer while the store refuses them,
retries on every flush, and counts (and logs) what it had to drop once the buffer was full.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from telemetry.backends.base import GpuBackend, GpuError, GpuLostError, GpuReading
from telemetry.clock import Clock, WallClock

log = logging.getLogger(__name__)

Row = tuple[int, GpuReading]
"""A stored row: (gpu_id in the store, reading)."""


class SampleSink(Protocol):
    """Where the writer puts rows (``telemetry.store.Store`` in production)."""

    def insert_samples(self, rows: Sequence[Row]) -> int: ...


class LatestReadings(Protocol):
    """Each GPU's latest reading (``Sampler.latest`` in the daemon)."""

    def latest(self) -> dict[int, GpuReading]:
        """GPU index → its latest reading, for every GPU that has a fresh one; a GPU whose last
        read failed, or that has not been read recently, is left out."""
        ...


class ReadingObserver(Protocol):
    """Told of every reading as the sampler takes it (``scheduler.metrics.GpuEnergy`` adds up
    each GPU's energy from them). Called on the sampling thread: it must be quick."""

    def observe(self, index: int, reading: GpuReading) -> None: ...


@dataclass(slots=True)
class _GpuHealth:
    failures: int = 0
    retry_at: float = 0.0
    lost: bool = False


class Sampler:
    """Reads every GPU once per ``tick`` and hands the readings to a writer.

    Args:
        backend: Where readings come from.
        gpu_ids: GPU index → the GPU's id in the store.
        writer: Receives each tick's rows.
        clock: Time source for the retry backoff and the readings' age.
        backoff_initial_s / backoff_max_s: Retry delay of a failing GPU, doubling per failure.
        fresh_s: ``latest`` leaves out readings older than this (a stalled sampling thread must
            not pass an old reading off as the GPU's state).
        observer: Told of every reading, in the order taken (``None``: nobody).
    """

    def __init__(
        self,
        backend: GpuBackend,
        gpu_ids: Mapping[int, int],
        writer: BatchWriter,
        *,
        clock: Clock | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        fresh_s: float = 1.0,
        observer: ReadingObserver | None = None,
    ) -> None:
        self._backend = backend
        self._observer = observer
        self._gpu_ids = dict(gpu_ids)
        self._writer = writer
        self._clock = clock or WallClock()
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._fresh_s = fresh_s
        self._health = {index: _GpuHealth() for index in self._gpu_ids}
        # index -> (clock time of the read, reading); the sampling thread writes, the control
        # loop reads.
        self._latest: dict[int, tuple[float, GpuReading]] = {}
        self._latest_lock = threading.Lock()

    def lost_gpus(self) -> list[int]:
        """Indices of GPUs currently marked lost."""
        return [index for index, h in self._health.items() if h.lost]

    def latest(self) -> dict[int, GpuReading]:
        """Each GPU's latest reading, read within ``fresh_s``; a GPU whose last read failed (lost,
        or waiting out its backoff) has none until it answers again."""
        oldest = self._clock.now() - self._fresh_s
        with self._latest_lock:
            return {i: r for i, (at, r) in self._latest.items() if at >= oldest}

    def tick(self) -> int:
        """Read every GPU that is not waiting out a backoff. Returns the number of readings."""
        now = self._clock.now()
        rows: list[Row] = []
        for index, gpu_id in self._gpu_ids.items():
            health = self._health[index]
            if health.failures and now < health.retry_at:
                continue
            try:
                reading = self._backend.read(index)
            except GpuError as exc:
                with self._latest_lock:
                    self._latest.pop(index, None)
                self._record_failure(index, health, exc, now)
                continue
            with self._latest_lock:
                self._latest[index] = (self._clock.now(), reading)
            if self._observer is not None:
                self._observer.observe(index, reading)
            if health.failures:
                log.warning("GPU %d answers again after %d failed reads", index, health.failures)
                self._health[index] = _GpuHealth()
            rows.append((gpu_id, reading))
        if rows:
            self._writer.add(rows)
        return len(rows)

    def _record_failure(self, index: int, health: _GpuHealth, exc: GpuError, now: float) -> None:
        health.failures += 1
        delay = min(self._backoff_initial_s * 2 ** (health.failures - 1), self._backoff_max_s)
        health.retry_at = now + delay
        if isinstance(exc, GpuLostError):
            health.lost = True
        if health.failures == 1 or (delay >= self._backoff_max_s and health.failures % 10 == 0):
            kind = type(exc).__name__
            log.warning("GPU %d: %s (%s); retrying in %.1f s", index, exc, kind, delay)


@dataclass(frozen=True, slots=True)
class WriterStats:
    """What the writer has done so far."""

    pending: int
    written: int
    dropped: int
    failed_flushes: int
    store_failing: bool


class BatchWriter:
    """Buffers rows and writes them to the store in batches.

    Rows that the store refuses stay in the buffer (oldest first) and are retried at the next
    flush. The buffer holds at most ``max_rows``; beyond that the oldest rows are dropped, counted
    in ``stats().dropped`` and logged. Thread-safe: the sampler adds from one thread while a flush
    runs in another.

    Args:
        sink: The store.
        max_rows: Buffer bound in rows (at 8 GPUs × 10 Hz, 100 000 rows ≈ 21 minutes).
        batch_rows: Most rows written in one transaction.
    """

    def __init__(
        self, sink: SampleSink, *, max_rows: int = 100_000, batch_rows: int = 5_000
    ) -> None:
        self._sink = sink
        self._max_rows = max_rows
        self._batch_rows = batch_rows
        self._rows: deque[Row] = deque()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._removed = 0  # rows ever taken off the front (written or dropped): the head's position
        self._written = 0
        self._dropped = 0
        self._failed_flushes = 0
        self._failing_since_flush: int | None = None

    def add(self, rows: Sequence[Row]) -> None:
        """Queue rows for the next flush, dropping the oldest if the buffer is full."""
        with self._lock:
            self._rows.extend(rows)
            overflow = len(self._rows) - self._max_rows
            if overflow > 0:
                for _ in range(overflow):
                    self._rows.popleft()
                first_drop = self._dropped == 0
                self._dropped += overflow
                self._removed += overflow
        if overflow > 0 and (first_drop or self._dropped % 1000 < overflow):
            log.error(
                "sample buffer full (%d rows): dropped %d oldest rows, %d in all",
                self._max_rows, overflow, self._dropped,
            )

    def flush(self) -> int:
        """Write everything buffered. Returns rows written; on a store error keeps them."""
        written = 0
        with self._flush_lock:
            while True:
                with self._lock:
                    head = self._removed
                    batch = [self._rows[i] for i in range(min(self._batch_rows, len(self._rows)))]
                if not batch:
                    break
                try:
                    self._sink.insert_samples(batch)
                except Exception as exc:  # any store failure: keep the rows, retry next flush
                    self._failed_flushes += 1
                    if self._failing_since_flush is None:
                        self._failing_since_flush = self._failed_flushes
                    failing = self._failed_flushes - self._failing_since_flush + 1
                    if failing == 1 or failing % 30 == 0:
                        log.error(
                            "store write failed (%d rows kept, attempt %d): %s",
                            len(self._rows), failing, exc,
                        )
                    break
                with self._lock:
                    # add() may have dropped rows off the front while we wrote: pop only the part
                    # of our batch that is still there.
                    for _ in range(max(0, head + len(batch) - self._removed)):
                        self._rows.popleft()
                    self._removed = max(self._removed, head + len(batch))
                if self._failing_since_flush is not None:
                    log.warning("store writes recovered; %d rows still buffered", len(self._rows))
                    self._failing_since_flush = None
                written += len(batch)
                self._written += len(batch)
        return written

    def stats(self) -> WriterStats:
        with self._lock:
            return WriterStats(
                pending=len(self._rows),
                written=self._written,
                dropped=self._dropped,
                failed_flushes=self._failed_flushes,
                store_failing=self._failing_since_flush is not None,
            )
