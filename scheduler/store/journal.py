"""The settings journal: every GPU setting powertrain changes, written before it is applied.

An entry starts ``pending`` (committed before the GPU is touched), becomes ``applied`` or
``failed``, and an applied or pending entry ends ``undone`` (the setting was put back to the GPU's
default) or ``undo_failed`` (to be tried again). Pending counts as outstanding: a daemon may have
crashed between writing the entry and applying it, so the setting may be in force.
``scheduler.actuators`` is the only writer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, select, update
from sqlalchemy.exc import SQLAlchemyError

from energy.optimizer import Knob
from energy.units import mw_to_w
from telemetry.store import Store
from telemetry.store.errors import StoreError, write_error
from telemetry.store.models import settings_journal_table, to_epoch_us
from telemetry.store.sql import inserted_id, write_transaction


class JournalStatus(enum.StrEnum):
    """Where a journal entry stands (``pending`` → ``applied`` | ``failed``; → ``undone`` | ...)."""

    PENDING = "pending"
    APPLIED = "applied"
    FAILED = "failed"
    UNDONE = "undone"
    UNDO_FAILED = "undo_failed"


OUTSTANDING = (JournalStatus.PENDING, JournalStatus.APPLIED, JournalStatus.UNDO_FAILED)
"""Statuses of entries whose setting may still be in force on the GPU."""

# status -> the statuses an entry may come from
_FROM: dict[JournalStatus, tuple[JournalStatus, ...]] = {
    JournalStatus.APPLIED: (JournalStatus.PENDING,),
    JournalStatus.FAILED: (JournalStatus.PENDING,),
    JournalStatus.UNDONE: OUTSTANDING,
    JournalStatus.UNDO_FAILED: OUTSTANDING,
}


class JournalEntryNotFoundError(StoreError, LookupError):
    """No journal entry has the given id."""


class InvalidJournalTransitionError(StoreError, ValueError):
    """A status change the journal does not allow (e.g. applying an undone entry)."""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One row of the settings journal.

    Attributes:
        id: Store key; increases with every entry.
        host: The node whose GPU it is.
        gpu_id / gpu_index: The GPU (store id, NVML index).
        job_id: The job that asked for it (``None``: the node itself, e.g. an admin default).
        setting: Which setting.
        value: Power limit in mW, or the locked maximum SM clock in MHz.
        min_clock_mhz: The locked minimum SM clock, MHz (``sm_clocks`` only).
        previous_value: What was in force before, same unit as ``value`` (``None``: unknown).
        dry_run: Written by a dry run: nothing was (or will be) set; ``applied`` means "would have".
        status: Where it stands.
        requested_at / applied_at / undone_at: Aware UTC.
        undo_reason: Why it was undone (job ended, daemon stopped, recovery after a crash).
        error: Why applying or undoing failed.
    """

    id: int
    host: str
    gpu_id: int
    gpu_index: int
    job_id: int | None
    setting: Knob
    value: int
    min_clock_mhz: int | None
    previous_value: int | None
    dry_run: bool
    status: JournalStatus
    requested_at: datetime
    applied_at: datetime | None
    undone_at: datetime | None
    undo_reason: str | None
    error: str | None

    @property
    def outstanding(self) -> bool:
        """Whether the setting may still be in force (pending, applied or undo failed)."""
        return self.status in OUTSTANDING

    def describe(self) -> str:
        """The setting in words, e.g. ``power limit 300 W`` or ``SM clocks 345..1410 MHz``."""
        if self.setting is Knob.POWER_LIMIT:
            return f"power limit {mw_to_w(self.value):g} W"
        low = "?" if self.min_clock_mhz is None else str(self.min_clock_mhz)
        return f"SM clocks {low}..{self.value} MHz"


def _entry(row: Row[Any]) -> JournalEntry:
    m = row._mapping
    return JournalEntry(
        id=int(m["id"]),
        host=m["host"],
        gpu_id=int(m["gpu_id"]),
        gpu_index=int(m["gpu_index"]),
        job_id=None if m["job_id"] is None else int(m["job_id"]),
        setting=Knob(m["setting"]),
        value=int(m["value"]),
        min_clock_mhz=None if m["min_clock_mhz"] is None else int(m["min_clock_mhz"]),
        previous_value=None if m["previous_value"] is None else int(m["previous_value"]),
        dry_run=bool(m["dry_run"]),
        status=JournalStatus(m["status"]),
        requested_at=m["requested_at"],
        applied_at=m["applied_at"],
        undone_at=m["undone_at"],
        undo_reason=m["undo_reason"],
        error=m["error"],
    )


class JournalStore:
    """The settings journal in the store: ``JournalStore(store)`` works through its engine.

    Every method runs in its own transaction and commits before it returns, so an entry
    ``record`` returns is durable before the caller touches the GPU.
    """

    def __init__(self, store: Store) -> None:
        """Work in ``store``'s database (at the latest schema), through its engine."""
        self._engine = store.engine

    @staticmethod
    def _get(conn: Connection, entry_id: int) -> JournalEntry | None:
        row = conn.execute(
            select(settings_journal_table).where(settings_journal_table.c.id == entry_id)
        ).first()
        return None if row is None else _entry(row)

    # -- writes ----------------------------------------------------------------------------------

    def record(
        self,
        *,
        host: str,
        gpu_id: int,
        gpu_index: int,
        job_id: int | None,
        setting: Knob | str,
        value: int,
        at: datetime,
        min_clock_mhz: int | None = None,
        previous_value: int | None = None,
        dry_run: bool = False,
    ) -> JournalEntry:
        """Write a ``pending`` entry and commit it: call before touching the GPU.

        Args:
            host: The node.
            gpu_id / gpu_index: The GPU (store id, NVML index).
            job_id: The job asking (``None``: the node).
            setting: Which setting.
            value: Power limit in mW, or the locked maximum SM clock in MHz.
            at: When it was requested (aware UTC).
            min_clock_mhz: Locked minimum SM clock, MHz (``sm_clocks`` only).
            previous_value: What was in force before, same unit as ``value``, if known.
            dry_run: Nothing will be set; the entry says what would have been.

        Returns:
            The stored entry.

        Raises:
            ValueError: ``at`` is naive or ``setting`` unknown.
            StoreWriteError: Nothing was written (the GPU must not be touched).
        """
        to_epoch_us(at)
        kind = Knob(setting)
        values = {
            "host": host,
            "gpu_id": gpu_id,
            "gpu_index": gpu_index,
            "job_id": job_id,
            "setting": kind.value,
            "value": int(value),
            "min_clock_mhz": None if min_clock_mhz is None else int(min_clock_mhz),
            "previous_value": None if previous_value is None else int(previous_value),
            "dry_run": dry_run,
            "status": JournalStatus.PENDING.value,
            "requested_at": at,
        }
        try:
            with write_transaction(self._engine) as conn:
                result = conn.execute(settings_journal_table.insert().values(**values))
                entry = self._get(conn, inserted_id(result))
                assert entry is not None
                return entry
        except SQLAlchemyError as exc:
            raise write_error(f"journaling GPU {gpu_index} {kind} for job {job_id}", exc) from exc

    def _move(self, entry_id: int, to: JournalStatus, **values: Any) -> JournalEntry:
        allowed = _FROM[to]
        c = settings_journal_table.c
        try:
            with write_transaction(self._engine) as conn:
                result = conn.execute(
                    update(settings_journal_table)
                    .where(c.id == entry_id, c.status.in_([s.value for s in allowed]))
                    .values(status=to.value, **values)
                )
                entry = self._get(conn, entry_id)
                if entry is None:
                    raise JournalEntryNotFoundError(f"no settings journal entry {entry_id}")
                if result.rowcount == 0:
                    raise InvalidJournalTransitionError(
                        f"settings journal entry {entry_id} cannot go from {entry.status} to {to}"
                    )
                return entry
        except SQLAlchemyError as exc:
            raise write_error(f"marking settings journal entry {entry_id} {to}", exc) from exc

    def mark_applied(self, entry_id: int, at: datetime) -> JournalEntry:
        """A pending entry's setting is in force (or, in a dry run, would be) since ``at``.

        Raises:
            JournalEntryNotFoundError / InvalidJournalTransitionError: Nothing was written.
            ValueError: ``at`` is naive.
            StoreWriteError: Nothing was written.
        """
        to_epoch_us(at)
        return self._move(entry_id, JournalStatus.APPLIED, applied_at=at)

    def mark_failed(self, entry_id: int, error: str) -> JournalEntry:
        """A pending entry's setting was refused and is not in force; ``error`` says why.

        Raises:
            JournalEntryNotFoundError / InvalidJournalTransitionError: Nothing was written.
            StoreWriteError: Nothing was written.
        """
        return self._move(entry_id, JournalStatus.FAILED, error=error)

    def mark_undone(self, entry_id: int, at: datetime, reason: str) -> JournalEntry:
        """An outstanding entry's setting was put back to the GPU's default at ``at``.

        Raises:
            JournalEntryNotFoundError / InvalidJournalTransitionError: Nothing was written.
            ValueError: ``at`` is naive.
            StoreWriteError: Nothing was written.
        """
        to_epoch_us(at)
        return self._move(entry_id, JournalStatus.UNDONE, undone_at=at, undo_reason=reason)

    def mark_undo_failed(self, entry_id: int, error: str) -> JournalEntry:
        """Undoing an outstanding entry failed; it stays outstanding, to be tried again.

        Raises:
            JournalEntryNotFoundError / InvalidJournalTransitionError: Nothing was written.
            StoreWriteError: Nothing was written.
        """
        return self._move(entry_id, JournalStatus.UNDO_FAILED, error=error)

    # -- reads -----------------------------------------------------------------------------------

    def get(self, entry_id: int) -> JournalEntry | None:
        """The entry with id ``entry_id``, or ``None``."""
        with self._engine.connect() as conn:
            return self._get(conn, entry_id)

    def outstanding(
        self, host: str, *, job_id: int | None = None, gpu_index: int | None = None
    ) -> list[JournalEntry]:
        """Entries of ``host`` whose setting may be in force (pending, applied, undo failed).

        Args:
            host: The node.
            job_id: Only this job's entries.
            gpu_index: Only this GPU's entries.

        Returns:
            The entries, oldest first.
        """
        c = settings_journal_table.c
        query = select(settings_journal_table).where(
            c.host == host, c.status.in_([s.value for s in OUTSTANDING])
        )
        if job_id is not None:
            query = query.where(c.job_id == job_id)
        if gpu_index is not None:
            query = query.where(c.gpu_index == gpu_index)
        return self._select(query.order_by(c.id))

    def entries(
        self, host: str, since: datetime | None = None, job_id: int | None = None
    ) -> list[JournalEntry]:
        """Every entry of ``host`` requested at or after ``since`` (of one job, if given).

        Returns:
            The entries, oldest first.
        """
        c = settings_journal_table.c
        query = select(settings_journal_table).where(c.host == host)
        if since is not None:
            query = query.where(c.requested_at >= since)
        if job_id is not None:
            query = query.where(c.job_id == job_id)
        return self._select(query.order_by(c.requested_at, c.id))

    def _select(self, query: Any) -> list[JournalEntry]:
        with self._engine.connect() as conn:
            return [_entry(row) for row in conn.execute(query)]


def group_by_gpu(entries: Iterable[JournalEntry]) -> dict[int, list[JournalEntry]]:
    """Entries keyed by GPU index, in index order, each list in the given order."""
    out: dict[int, list[JournalEntry]] = {}
    for entry in sorted(entries, key=lambda e: e.gpu_index):
        out.setdefault(entry.gpu_index, []).append(entry)
    return out
