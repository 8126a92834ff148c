"""The ``Store`` facade: one object for GPU telemetry's samples, rollups, energy and chart series.

Each responsibility lives in its own module (``samples``, ``rollups``, ``segments``, ``series``);
``Store`` hands every call to the part that owns it and runs the maintenance that spans parts
(a rollup writes minutes and buckets, then the energy marks at job edges).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from energy.counters import DEFAULT_MAX_GAP_S, EnergyResult
from telemetry.backends.base import GpuInfo, GpuReading
from telemetry.store.errors import write_error
from telemetry.store.models import to_epoch_us
from telemetry.store.nodes import NodeRecord, heartbeat, list_nodes, node_stopped, register_node
from telemetry.store.records import (
    BucketRecord,
    EnergySource,
    GpuRecord,
    PowerPoint,
    ProcessRecord,
    RollupRecord,
    SampleRecord,
    SegmentEnergy,
    SegmentEnergyUs,
)
from telemetry.store.rollups import ROLLUP_SETTLE_S, Rollups, rollup_end_us
from telemetry.store.samples import Samples
from telemetry.store.segments import Segments
from telemetry.store.series import Series


class Store:
    """GPU telemetry in a SQL database: GPUs, samples, processes, rollups, energy, power series.

    Build one with ``telemetry.store.open_store(url)``, which checks the schema first.
    Thread-safe as far as the engine's pool is (each call uses its own connection).
    """

    def __init__(self, engine: Engine, *, max_gap_s: float = DEFAULT_MAX_GAP_S) -> None:
        """Wrap an engine whose database is at the latest schema.

        Args:
            engine: From ``telemetry.store.make_engine``; ``close`` disposes of it.
            max_gap_s: Trapezoid intervals longer than this many seconds count as gaps.
        """
        self._engine = engine
        self._samples = Samples(engine, max_gap_s=max_gap_s)
        self._rollups = Rollups(engine, max_gap_s=max_gap_s)
        self._segments = Segments(engine, self._samples, max_gap_s=max_gap_s)
        self._series = Series(engine, self._rollups)

    @property
    def engine(self) -> Engine:
        """The engine the store writes through."""
        return self._engine

    # -- GPUs and samples (``telemetry.store.samples``) ----------------------------------------

    def register_gpus(
        self,
        infos: Sequence[GpuInfo],
        *,
        host: str,
        backend: str,
        seen_at: datetime | None = None,
    ) -> dict[int, int]:
        """Insert or update the GPUs of one host; GPU index to store ``gpu_id`` (see
        ``Samples.register_gpus``)."""
        return self._samples.register_gpus(infos, host=host, backend=backend, seen_at=seen_at)

    def gpus(self, *, host: str | None = None) -> list[GpuRecord]:
        """Registered GPUs (of one host, if given), by host then index."""
        return self._samples.gpus(host=host)

    def insert_samples(self, rows: Sequence[tuple[int, GpuReading]]) -> int:
        """Write a batch of ``(gpu_id, reading)`` in one transaction; how many were written
        (see ``Samples.insert_samples``)."""
        return self._samples.insert_samples(rows)

    def samples(
        self, gpu_id: int, since: datetime | None = None, until: datetime | None = None
    ) -> list[SampleRecord]:
        """One GPU's samples with ``since <= sampled_at < until``, oldest first."""
        return self._samples.samples(gpu_id, since, until)

    def latest_samples(self, gpu_ids: Sequence[int]) -> dict[int, SampleRecord]:
        """Each GPU's latest stored sample (another node's GPUs too, in a shared store)."""
        return self._samples.latest_samples(gpu_ids)

    def sample_count(
        self,
        gpu_id: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> int:
        """How many samples (of one GPU, or all) have ``since <= sampled_at < until``."""
        return self._samples.sample_count(gpu_id, since, until)

    def processes(
        self, gpu_id: int, since: datetime | None = None, until: datetime | None = None
    ) -> list[ProcessRecord]:
        """Processes seen on one GPU with ``since <= sampled_at < until``, oldest first."""
        return self._samples.processes(gpu_id, since, until)

    def gpu_energy(
        self, gpu_id: int, since: datetime | None = None, until: datetime | None = None
    ) -> EnergyResult:
        """Energy of one GPU between its raw samples with ``since <= sampled_at < until`` (see
        ``Samples.gpu_energy``)."""
        return self._samples.gpu_energy(gpu_id, since, until)

    # -- energy between breakpoints (``telemetry.store.segments``) -----------------------------

    def span_energy(
        self, gpu_id: int, since: datetime, until: datetime | None = None
    ) -> EnergyResult:
        """Energy of one GPU over ``[since, until)``, from raw samples or rollups, wherever the
        data still is (see ``Segments.span_energy``)."""
        return self._segments.span_energy(gpu_id, since, until)

    def segment_energy(
        self,
        points: Mapping[int, Sequence[datetime]],
        *,
        source: EnergySource | Literal["auto"] = "auto",
    ) -> dict[int, list[SegmentEnergy]]:
        """Energy of each GPU between consecutive breakpoints, for many GPUs in a few queries
        (see ``Segments.segment_energy``)."""
        return self._segments.segment_energy(points, source=source)

    def segment_energy_us(
        self,
        points_us: Mapping[int, Sequence[int]],
        *,
        source: EnergySource | Literal["auto"] = "auto",
    ) -> dict[int, list[SegmentEnergyUs]]:
        """``segment_energy`` with breakpoints and segment ends as epoch microseconds."""
        return self._segments.segment_energy_us(points_us, source=source)

    # -- rollups and retention (``telemetry.store.rollups``) -----------------------------------

    def rollup(
        self, now: datetime, *, settle_s: float = ROLLUP_SETTLE_S, host: str | None = None
    ) -> int:
        """Write one-minute rollups for every complete minute not yet rolled up.

        A daemon rolls up its own node's GPUs only (``host``): with many daemons on one store,
        each owns its node's rows, and none writes another's.

        Idempotent: a minute is rolled up once, when complete, after the latest rolled-up minute
        of its GPU. Each interval between consecutive samples counts in the minute in which it
        ends. A minute counts as complete ``settle_s`` after it ends, so that rows still in the
        sampler's buffer land first; rows arriving for a minute after it was rolled up are not
        counted in it. Then the 10-minute and hourly buckets of complete minutes are summed, and
        every job edge (start or end) on the GPU whose hour is rolled up gets its energy mark
        (``energy_marks``), once.

        Args:
            now: Current time (aware UTC).
            settle_s: Seconds after a minute's end before it is rolled up (>= 0).
            host: Only this host's GPUs (``None``: every GPU in the store).

        Returns:
            How many rollup rows were written.

        Raises:
            ValueError: ``settle_s`` is negative or not finite.
            StoreWriteError: The current hour of one GPU was not written (earlier ones were).
        """
        end_us = rollup_end_us(now, settle_s)
        written = 0
        for gpu_id in self._rollups.gpu_ids(host):
            try:
                written += self._rollups.roll_up(gpu_id, end_us)
                self._segments.mark_job_edges(gpu_id)
            except SQLAlchemyError as exc:
                raise write_error(f"rolling up GPU {gpu_id}", exc) from exc
        return written

    def rollups(
        self, gpu_id: int, since: datetime | None = None, until: datetime | None = None
    ) -> list[RollupRecord]:
        """One GPU's rollups with ``since <= minute_start < until``, oldest first."""
        return self._rollups.rollups(gpu_id, since, until)

    def level_rollups(
        self,
        gpu_id: int,
        level_s: int,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[BucketRecord]:
        """One GPU's ``level_s`` buckets with ``since <= start < until``, oldest first."""
        return self._rollups.level_rollups(gpu_id, level_s, since, until)

    def apply_retention(
        self, now: datetime, days: float, *, settle_s: float = ROLLUP_SETTLE_S,
        host: str | None = None,
    ) -> int:
        """Delete raw samples and processes older than ``days`` before ``now``; rollups stay.

        Rolls up first, and never deletes a sample that is not yet rolled up, nor the last
        rolled-up sample of a GPU (the start of the next minute's first interval).

        Args:
            now: Current time (aware UTC).
            days: Retention in days (> 0).
            settle_s: Passed to ``rollup``.
            host: Only this host's GPUs (``None``: every GPU in the store).

        Returns:
            How many sample rows were deleted.

        Raises:
            ValueError: ``days`` is not a positive finite number.
            StoreWriteError: That GPU's deletions were not made (earlier GPUs' were).
        """
        if not (math.isfinite(days) and days > 0):
            raise ValueError(f"retention must be a positive number of days (got {days})")
        self.rollup(now, settle_s=settle_s, host=host)
        cutoff_us = to_epoch_us(now - timedelta(days=days))
        deleted = 0
        for gpu_id in self._rollups.gpu_ids(host):
            try:
                deleted += self._rollups.delete_raw(gpu_id, cutoff_us)
            except SQLAlchemyError as exc:
                raise write_error(f"retention for GPU {gpu_id}", exc) from exc
        return deleted

    # -- chart series (``telemetry.store.series``) ---------------------------------------------

    def power_series(
        self, gpu_id: int, since: datetime, until: datetime, *, max_points: int = 600
    ) -> list[PowerPoint]:
        """One GPU's power over ``[since, until)`` in at most about ``max_points`` buckets (see
        ``Series.power_series``)."""
        return self._series.power_series(gpu_id, since, until, max_points=max_points)

    # -- the nodes registry (``telemetry.store.nodes``) ----------------------------------------

    def register_node(
        self, *, name: str, gpu_count: int, backend: str, version: str, pid: int, at: datetime
    ) -> None:
        """Register a node as started at ``at``, overwriting its row if it had one (see
        ``telemetry.store.nodes.register_node``)."""
        register_node(self._engine, name=name, gpu_count=gpu_count, backend=backend,
                      version=version, pid=pid, at=at)

    def heartbeat(self, name: str, at: datetime) -> bool:
        """Record a heartbeat of a node; whether it was registered and not stopped."""
        return heartbeat(self._engine, name, at)

    def node_stopped(self, name: str, at: datetime) -> bool:
        """Mark a node stopped at ``at``; whether it was registered."""
        return node_stopped(self._engine, name, at)

    def nodes(self) -> list[NodeRecord]:
        """Every registered node, by name (``NodeRecord.state`` tells up, down or stopped)."""
        return list_nodes(self._engine)

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()
