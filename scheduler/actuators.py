"""Actuators: the one module that changes GPU settings, each change journaled before it is made.

Hard actuators (power limit, locked SM clocks) go through the ``GpuBackend`` and the settings
journal (``scheduler.store.journal``): an entry is committed ``pending`` before the GPU is touched,
then marked ``applied`` or ``failed``. Undoing puts a setting back to the GPU's *default*
(``reset_power_limit`` / ``reset_sm_clocks``), never to a remembered value, so overlapping changes
cannot leave a stale one behind. Soft actuators (pace per step, micro-batch size) are instructions
the training client reads in its progress responses; they live in memory and touch no GPU.

Journal rules kept here:

- At most one live entry per GPU and setting: applying a new value closes the entries it replaced
  (``undone``, reason ``superseded by journal entry N``).
- Undoing a GPU setting closes every outstanding entry of it, whichever job wrote them; a job
  still holding that GPU gets its value back at its controller's next request.
- A request equal to what the same job already has in force on that GPU writes nothing.
- In a dry run no backend setter is ever called: entries are written with ``dry_run`` and status
  ``applied`` meaning "would have", and every would-be change and undo is logged at INFO.
  A dry run leaves entries of a real daemon outstanding (their settings really are in force);
  a real daemon closes a dry run's entries without touching the GPU (nothing was set).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Final

from energy.optimizer import Knob
from energy.units import mw_to_w
from scheduler.jobs import Directive
from scheduler.store import JournalEntry, JournalStore, group_by_gpu
from telemetry.backends.base import (
    GpuBackend,
    GpuError,
    GpuInfo,
    GpuLostError,
    GpuNotFoundError,
    GpuPermissionError,
    InvalidSettingError,
    NotSupportedError,
)
from telemetry.clock import Clock, WallClock, to_datetime
from telemetry.store import Store, StoreError

__all__ = [
    "RECOVERY_REASON",
    "Actuators",
    "applied_settings",
]

_log = logging.getLogger(__name__)

RECOVERY_REASON: Final = "recovered at daemon start: left by a previous daemon"
"""``undo_reason`` of the entries ``Actuators.recover`` undoes."""

# Errors after which the setting is known not to be in force: the entry is marked failed.
# Anything else (a timeout, a bug) leaves it pending, so that it is undone later.
_REFUSED = (
    GpuPermissionError,
    NotSupportedError,
    InvalidSettingError,
    GpuNotFoundError,
    GpuLostError,
)

_CAP_SYS_ADMIN: Final = 21
"""Bit of ``CAP_SYS_ADMIN`` in ``/proc/self/status``'s ``CapEff`` mask."""


_NO_DIRECTIVES: Final = Directive()
"""A job's soft directives when none were set: full speed, the loop's own micro-batch."""


def _who(job_id: int | None) -> str:
    return "the node" if job_id is None else f"job {job_id}"


def _what(setting: Knob, value: int, min_mhz: int | None) -> str:
    if setting is Knob.POWER_LIMIT:
        return f"power limit to {mw_to_w(value):g} W"
    return f"SM clocks to {min_mhz}..{value} MHz"


def _name(setting: Knob) -> str:
    return "power limit" if setting is Knob.POWER_LIMIT else "SM clocks"


def _has_cap_sys_admin(status_path: Path = Path("/proc/self/status")) -> bool:
    """Whether this process's effective capabilities include ``CAP_SYS_ADMIN`` (Linux)."""
    try:
        for line in status_path.read_text(encoding="ascii").splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def applied_settings(store: Store, host: str) -> dict[int, list[JournalEntry]]:
    """Settings powertrain has in force on ``host``'s GPUs, for ``powertrain gpus``.

    Args:
        store: The store.
        host: The node.

    Returns:
        GPU index to its outstanding journal entries (pending, applied or undo failed), oldest
        first; GPUs with none are absent. Each entry says the setting (``describe()``), the job
        (``job_id``), whether it was a dry run, and since when (``applied_at``).
    """
    return group_by_gpu(JournalStore(store).outstanding(host))


class Actuators:
    """Changes GPU settings for jobs, journaling each change first; hands out soft directives.

    Thread-safe: the API thread and the control loop may call it at once (one lock serialises
    every change, its journal writes and the backend call).

    Args:
        backend: The GPUs.
        store: The store holding the settings journal.
        host: This node's name (journal entries are per host).
        gpu_ids: GPU index to store ``gpus.id`` (``Store.register_gpus``).
        dry_run: Log every change that would be made and make none.
        clock: Time source for the journal's timestamps; the wall clock by default.
    """

    def __init__(
        self,
        backend: GpuBackend,
        store: Store,
        *,
        host: str,
        gpu_ids: Mapping[int, int],
        dry_run: bool = False,
        clock: Clock | None = None,
    ) -> None:
        self._backend = backend
        self._journal = JournalStore(store)
        self._host = host
        self._gpu_ids = dict(gpu_ids)
        self._dry_run = dry_run
        self._clock: Clock = clock or WallClock()
        self._infos: dict[int, GpuInfo] = {info.index: info for info in backend.devices()}
        self._lock = threading.RLock()
        # (index, setting) -> the entry this instance applied and that is still in force
        self._in_force: dict[tuple[int, Knob], JournalEntry] = {}
        self._directives: dict[int, Directive] = {}

    @property
    def dry_run(self) -> bool:
        """Whether changes are only logged."""
        return self._dry_run

    @property
    def host(self) -> str:
        """The node whose GPUs these are."""
        return self._host

    # -- hard actuators --------------------------------------------------------------------------

    def set_power_limit(
        self, job_id: int | None, index: int, limit_mw: int, *, reapply: bool = False
    ) -> JournalEntry:
        """Set a GPU's power limit for a job (``nvidia-smi -pl``), journaled first.

        The same request again sets nothing (a controller may ask every tick), unless
        ``reapply`` says the GPU lost the limit: then it is set again under the same entry.

        Args:
            job_id: The job asking (``None``: the node).
            index: GPU index.
            limit_mw: Power limit, mW.
            reapply: The GPU lost this job's limit (someone reset it): set it again.

        Returns:
            The applied entry (the one already in force, when nothing changed).

        Raises:
            GpuNotFoundError: No GPU with that index (nothing journaled).
            InvalidSettingError: Outside the GPU's range (journaled as failed).
            GpuPermissionError / NotSupportedError / GpuLostError: The GPU refused (journaled
                as failed); the caller falls back, e.g. from ``hw`` to ``soft``.
            StoreError: The journal could not be written; the GPU was not touched.
        """
        return self._change(job_id, index, Knob.POWER_LIMIT, int(limit_mw), None, reapply)

    def lock_sm_clocks(
        self, job_id: int | None, index: int, max_mhz: int, min_mhz: int | None = None, *,
        reapply: bool = False,
    ) -> JournalEntry:
        """Lock a GPU's SM clocks to ``[min_mhz, max_mhz]`` for a job (``nvidia-smi -lgc``).

        Args:
            job_id: The job asking (``None``: the node).
            index: GPU index.
            max_mhz: Highest SM clock, MHz.
            min_mhz: Lowest SM clock, MHz; the GPU's minimum by default.
            reapply: The GPU lost this job's lock (someone reset it): lock it again.

        Returns:
            The applied entry (the one already in force, when nothing changed).

        Raises:
            GpuNotFoundError: No GPU with that index (nothing journaled).
            InvalidSettingError: ``min_mhz > max_mhz``, outside the GPU's range (journaled as
                failed), or no ``min_mhz`` for a GPU that reports no clock range (not journaled).
            GpuPermissionError / NotSupportedError / GpuLostError: The GPU refused (journaled
                as failed).
            StoreError: The journal could not be written; the GPU was not touched.
        """
        if min_mhz is None:
            info = self._info(index)
            if info.min_sm_clock_mhz is None:
                raise InvalidSettingError(
                    f"GPU {index} does not report its SM clock range: give the minimum clock"
                )
            min_mhz = info.min_sm_clock_mhz
        return self._change(
            job_id, index, Knob.SM_CLOCKS, int(max_mhz), int(min_mhz), reapply
        )

    def reset_gpu(self, index: int, reason: str) -> list[JournalEntry]:
        """Undo every outstanding setting on one GPU: back to the GPU's defaults.

        Args:
            index: GPU index.
            reason: Why, stored as each entry's ``undo_reason``.

        Returns:
            The entries closed (``undone``) or that could not be undone (``undo_failed``).
        """
        with self._lock:
            return self._undo(self._journal.outstanding(self._host, gpu_index=index), reason)

    def reset_setting(self, index: int, setting: Knob, reason: str) -> list[JournalEntry]:
        """Undo one kind of setting (power limit or SM clocks) on one GPU: back to its default.

        Returns:
            The entries closed or that could not be undone.
        """
        with self._lock:
            entries = self._journal.outstanding(self._host, gpu_index=index)
            return self._undo([e for e in entries if e.setting == setting], reason)

    def undo_job(self, job_id: int, reason: str) -> list[JournalEntry]:
        """Undo every setting a job has in force, and drop its soft directives (the job ended).

        Each GPU setting the job holds goes back to the GPU's default; every outstanding entry of
        that GPU setting is closed, whichever job wrote it.

        Args:
            job_id: The job.
            reason: Why, e.g. ``job 4 ended``.

        Returns:
            The entries closed or that could not be undone.
        """
        with self._lock:
            self.clear_directives(job_id)
            mine = self._journal.outstanding(self._host, job_id=job_id)
            keys = {(e.gpu_index, e.setting) for e in mine}
            if not keys:
                return []
            everyone = self._journal.outstanding(self._host)
            return self._undo([e for e in everyone if (e.gpu_index, e.setting) in keys], reason)

    def undo_all(self, reason: str) -> list[JournalEntry]:
        """Undo every outstanding setting of this host (the daemon is stopping).

        Returns:
            The entries closed or that could not be undone.
        """
        with self._lock:
            return self._undo(self._journal.outstanding(self._host), reason)

    def recover(self) -> list[JournalEntry]:
        """At daemon start, undo whatever a previous (crashed) daemon left in force.

        Pending entries count: the crash may have come between journaling and applying.
        The reason stored is ``RECOVERY_REASON``. In a dry run the settings of a real daemon are
        only logged and stay outstanding for the next real daemon.

        Returns:
            The entries closed or that could not be undone.
        """
        with self._lock:
            left = self._journal.outstanding(self._host)
            if left:
                _log.info(
                    "journal: %d setting(s) left in force by a previous daemon on %s",
                    len(left),
                    self._host,
                )
            return self._undo(left, RECOVERY_REASON)

    def applied(self, index: int) -> list[JournalEntry]:
        """Outstanding journal entries of one GPU (what powertrain has in force), oldest first."""
        return self._journal.outstanding(self._host, gpu_index=index)

    def probe_power_limit_permission(self, index: int) -> tuple[bool, str]:
        """Whether this daemon may set power limits on a GPU, and why (for ``auto`` mode).

        Outside a dry run the current enforced limit is set again (a write that changes nothing,
        so it is not journaled); ``GpuPermissionError`` or ``NotSupportedError`` mean no. A dry
        run writes nothing and decides from the GPU's capabilities and the process's privileges
        (root or ``CAP_SYS_ADMIN``); modelled GPUs need none.

        Args:
            index: GPU index.

        Returns:
            ``(permitted, reason)``; the reason is one line for logs and ``mode_reason``.
        """
        if self._dry_run:
            note = "dry run: not tested by a write"
            caps = self._backend.capabilities()
            if not caps.gpu(index).can_set_power_limit:
                return False, f"GPU {index} does not support setting power limits ({note})"
            if not caps.settings_need_privilege:
                return True, f"{self._backend.name} GPUs need no privileges ({note})"
            if os.geteuid() == 0:
                return True, f"running as root ({note})"
            if _has_cap_sys_admin():
                return True, f"the daemon has CAP_SYS_ADMIN ({note})"
            return False, f"setting power limits needs root or CAP_SYS_ADMIN ({note})"
        try:
            limit_mw = self._backend.read(index).power_limit_mw
        except GpuError as exc:
            return False, f"cannot read GPU {index}: {exc}"
        if limit_mw is None:
            return False, f"GPU {index} does not report its power limit"
        with self._lock:
            try:
                self._backend.set_power_limit(index, limit_mw)
            except GpuPermissionError as exc:
                return False, f"no permission to set power limits on GPU {index}: {exc}"
            except NotSupportedError as exc:
                return False, f"GPU {index} does not support setting power limits: {exc}"
            except GpuError as exc:
                return False, f"setting the power limit of GPU {index} failed: {exc}"
        return True, f"GPU {index} accepted its current power limit {mw_to_w(limit_mw):g} W again"

    # -- soft actuators --------------------------------------------------------------------------

    def set_directives(
        self,
        job_id: int,
        *,
        pace_s: float | None = None,
        micro_batch: int | None = None,
        duty: float | None = None,
    ) -> Directive:
        """Replace a job's soft directives (all of them: ``None`` clears one).

        Args:
            job_id: The job.
            pace_s: Extra time per step, s (``None`` or 0: full speed).
            micro_batch: Micro-batch size (``None``: the job's own).
            duty: Share of wall time the loop may compute, in (0, 1] (``None``: all).

        Returns:
            The directives the client will read (the soft fields of a ``Directive``; the
            service adds the rest). A dry run hands them out too: they change the training
            loop, not the card, and the soft mode is what a dry run validates.

        Raises:
            ValueError: ``pace_s`` negative or not finite, ``micro_batch < 1``, or ``duty``
                outside (0, 1].
        """
        if pace_s is not None and not 0.0 <= pace_s < float("inf"):
            raise ValueError(f"pace must be a finite number of seconds >= 0, got {pace_s}")
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro-batch must be at least 1, got {micro_batch}")
        if duty is not None and not 0.0 < duty <= 1.0:
            raise ValueError(f"duty must be in (0, 1], got {duty}")
        new = Directive(
            pace_s=0.0 if pace_s is None else float(pace_s),
            micro_batch=micro_batch,
            duty=1.0 if duty is None or duty >= 1.0 else float(duty),
        )
        with self._lock:
            if self._directives.get(job_id, _NO_DIRECTIVES) != new:
                _log.info("set directives of job %d: %s", job_id, _describe(new))
            if new == _NO_DIRECTIVES:
                self._directives.pop(job_id, None)
            else:
                self._directives[job_id] = new
            return self.directives(job_id)

    def directives(self, job_id: int) -> Directive:
        """A job's soft directives (a neutral ``Directive()`` when none are set)."""
        with self._lock:
            return self._directives.get(job_id, _NO_DIRECTIVES)

    def clear_directives(self, job_id: int) -> None:
        """Forget a job's soft directives (it ended, or returned to full speed)."""
        with self._lock:
            self._directives.pop(job_id, None)

    # -- internals -------------------------------------------------------------------------------

    def _info(self, index: int) -> GpuInfo:
        info = self._infos.get(index)
        if info is None or index not in self._gpu_ids:
            raise GpuNotFoundError(
                f"no GPU {index} on {self._host} (known: {sorted(self._gpu_ids)})"
            )
        return info

    def _check(self, info: GpuInfo, setting: Knob, value: int, min_mhz: int | None) -> None:
        """Refuse a value outside the GPU's range (a dry run must refuse what NVML would)."""
        if setting is Knob.POWER_LIMIT:
            lo, hi = info.min_limit_mw, info.max_limit_mw
            if value <= 0 or (lo is not None and value < lo) or (hi is not None and value > hi):
                raise InvalidSettingError(
                    f"power limit {mw_to_w(value):g} W for GPU {info.index} is outside the allowed "
                    f"range {_range(lo, hi, 1000)} W"
                )
            return
        lo, hi = info.min_sm_clock_mhz, info.max_sm_clock_mhz
        low = value if min_mhz is None else min_mhz
        if (
            low > value
            or low <= 0
            or (lo is not None and low < lo)
            or (hi is not None and value > hi)
        ):
            raise InvalidSettingError(
                f"locked clocks {low}..{value} MHz for GPU {info.index}: need min <= max within "
                f"the allowed range {_range(lo, hi, 1)} MHz"
            )

    def _previous(self, index: int, setting: Knob) -> int | None:
        """What is in force before a change, when known (same unit as the new value)."""
        known = self._in_force.get((index, setting))
        if known is not None:
            return known.value
        if setting is Knob.SM_CLOCKS:
            return None  # NVML reports no locked-clock range
        try:
            return self._backend.read(index).power_limit_mw
        except GpuError:
            return None

    def _change(
        self, job_id: int | None, index: int, setting: Knob, value: int, min_mhz: int | None,
        reapply: bool = False,
    ) -> JournalEntry:
        with self._lock:
            info = self._info(index)
            key = (index, setting)
            current = self._in_force.get(key)
            if (
                current is not None
                and current.job_id == job_id
                and current.value == value
                and current.min_clock_mhz == min_mhz
            ):
                # In force by the journal. Asked for again because the GPU lost it (someone
                # else reset it, a GPU fault), its entry is still the right record: the GPU
                # gets the setting back under it.
                if reapply and not self._dry_run:
                    self._set(index, setting, value, min_mhz)
                    _log.info("re-applied GPU %d %s for %s", index,
                              _what(setting, value, min_mhz), _who(job_id))
                return current
            entry = self._journal.record(
                host=self._host,
                gpu_id=self._gpu_ids[index],
                gpu_index=index,
                job_id=job_id,
                setting=setting,
                value=value,
                min_clock_mhz=min_mhz,
                previous_value=self._previous(index, setting),
                dry_run=self._dry_run,
                at=to_datetime(self._clock.now()),
            )
            what = f"GPU {index} {_what(setting, value, min_mhz)} for {_who(job_id)}"
            try:
                self._check(info, setting, value, min_mhz)
                if not self._dry_run:
                    self._set(index, setting, value, min_mhz)
            except _REFUSED as exc:
                _log.warning("could not set %s: %s", what, exc)
                try:
                    self._journal.mark_failed(entry.id, f"{type(exc).__name__}: {exc}")
                except StoreError as store_exc:
                    _log.error("journal entry %d stays pending: %s", entry.id, store_exc)
                raise
            except BaseException as exc:
                # the outcome is unknown: the entry stays pending, so it is undone later
                self._in_force.pop(key, None)
                _log.error("setting %s: outcome unknown (%s); it will be undone later", what, exc)
                raise
            now = to_datetime(self._clock.now())
            applied = self._journal.mark_applied(entry.id, now)
            self._in_force[key] = applied
            if self._dry_run:
                _log.info("dry run: would set %s", what)
            else:
                _log.info("set %s (journal entry %d)", what, entry.id)
            self._supersede(applied, now)
            return applied

    def _set(self, index: int, setting: Knob, value: int, min_mhz: int | None) -> None:
        """Write one setting to the GPU."""
        if setting is Knob.POWER_LIMIT:
            self._backend.set_power_limit(index, value)
        else:
            assert min_mhz is not None
            self._backend.lock_sm_clocks(index, min_mhz, value)

    def _supersede(self, new: JournalEntry, at: datetime) -> None:
        """Close the entries ``new`` replaced (same GPU and setting; a dry run only its own)."""
        for old in self._journal.outstanding(self._host, gpu_index=new.gpu_index):
            if old.id == new.id or old.setting is not new.setting:
                continue
            if new.dry_run and not old.dry_run:
                continue  # a real setting stays in force under a dry run
            self._close(old.id, at, f"superseded by journal entry {new.id}")

    def _undo(self, entries: Sequence[JournalEntry], reason: str) -> list[JournalEntry]:
        """Put each GPU setting among ``entries`` back to its default and close the entries."""
        groups: dict[tuple[int, Knob], list[JournalEntry]] = {}
        for entry in sorted(entries, key=lambda e: (e.gpu_index, e.setting.value, e.id)):
            groups.setdefault((entry.gpu_index, entry.setting), []).append(entry)
        done: list[JournalEntry] = []
        for (index, setting), group in groups.items():
            self._in_force.pop((index, setting), None)
            done.extend(self._undo_one(index, setting, group, reason))
        return done

    def _undo_one(
        self, index: int, setting: Knob, group: list[JournalEntry], reason: str
    ) -> list[JournalEntry]:
        what = f"GPU {index} {_name(setting)} to its default ({reason})"
        real = [e for e in group if not e.dry_run]
        dry = [e for e in group if e.dry_run]
        now = to_datetime(self._clock.now())
        done = [self._close(e.id, now, reason) for e in dry]
        if dry and not real:
            prefix = "dry run: would reset" if self._dry_run else "nothing to reset (dry run):"
            _log.info("%s %s", prefix, what)
        if not real:
            return done
        if self._dry_run:
            _log.info(
                "dry run: would reset %s; left outstanding: journal entries %s were set by a "
                "daemon that was not a dry run",
                what,
                ", ".join(str(e.id) for e in real),
            )
            return done
        try:
            if setting is Knob.POWER_LIMIT:
                self._backend.reset_power_limit(index)
            else:
                self._backend.reset_sm_clocks(index)
        except GpuError as exc:
            _log.error("could not reset %s: %s", what, exc)
            error = f"{type(exc).__name__}: {exc}"
            return done + [self._journal.mark_undo_failed(e.id, error) for e in real]
        _log.info("reset %s (journal entries %s)", what, ", ".join(str(e.id) for e in real))
        now = to_datetime(self._clock.now())
        return done + [self._close(e.id, now, reason) for e in real]

    def _close(self, entry_id: int, at: datetime, reason: str) -> JournalEntry:
        return self._journal.mark_undone(entry_id, at, reason)


def _range(lo: int | None, hi: int | None, scale: int) -> str:
    def fmt(v: int | None) -> str:
        return "?" if v is None else f"{v / scale:g}"

    return f"{fmt(lo)}..{fmt(hi)}"


def _describe(d: Directive) -> str:
    if d == _NO_DIRECTIVES:
        return "none (full speed, own micro-batch)"
    parts = []
    if d.pace_s != _NO_DIRECTIVES.pace_s:
        parts.append(f"pace {d.pace_s:g} s per step")
    if d.micro_batch is not None:
        parts.append(f"micro-batch {d.micro_batch}")
    if d.duty != _NO_DIRECTIVES.duty:
        parts.append(f"duty {d.duty:.3f}")
    return ", ".join(parts)
