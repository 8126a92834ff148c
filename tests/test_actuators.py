"""Actuators on simulated GPUs (state file, virtual clock) and a real SQLite store.

The simulated GPUs' settings live in their state file and outlive any one backend object, the
way a real node's outlive the daemon: a "crash" here is dropping the objects without undoing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

import scheduler.actuators as actuators_module
from energy.optimizer import Knob
from scheduler.actuators import RECOVERY_REASON, Actuators, applied_settings
from scheduler.jobs import Directive
from scheduler.store import JobStore, JournalStatus, JournalStore, NewJob
from telemetry.backends.base import (
    BackendCapabilities,
    GpuInfo,
    GpuNotFoundError,
    GpuPermissionError,
    GpuReading,
    InvalidSettingError,
    NotSupportedError,
)
from telemetry.backends.simulated import FaultKind, SimulatedBackend
from telemetry.clock import VirtualClock
from telemetry.store import Store, StoreError, open_store
from tests.import_contracts import setter_calls

HOST = "node-a"
DEFAULT_MW = 700_000  # H100 SXM
MIN_MHZ, MAX_MHZ = 345, 1980
REPO = Path(__file__).resolve().parents[1]



@dataclass
class Spy:
    """A ``GpuBackend`` in front of a simulated one: counts setter calls, may forbid them."""

    inner: SimulatedBackend
    name: str = "simulated"
    forbid: bool = False
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    before: Callable[[str], None] | None = None

    def devices(self) -> list[GpuInfo]:
        return self.inner.devices()

    def capabilities(self) -> BackendCapabilities:
        # A spy named "nvml" stands for real GPUs, whose settings need privileges.
        real = self.name == "nvml"
        return replace(self.inner.capabilities(), simulated=not real, settings_need_privilege=real)

    def read(self, index: int) -> GpuReading:
        return self.inner.read(index)

    def _call(self, method: str, *args: int) -> None:
        if self.forbid:
            raise AssertionError(f"{method}{args} called in a dry run")
        self.calls.append((method, *args))
        if self.before is not None:
            self.before(method)
        getattr(self.inner, method)(*args)

    def set_power_limit(self, index: int, limit_mw: int) -> None:
        self._call("set_power_limit", index, limit_mw)

    def reset_power_limit(self, index: int) -> None:
        self._call("reset_power_limit", index)

    def lock_sm_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        self._call("lock_sm_clocks", index, min_mhz, max_mhz)

    def reset_sm_clocks(self, index: int) -> None:
        self._call("reset_sm_clocks", index)

    def close(self) -> None:
        self.inner.close()


@dataclass
class Node:
    """One test node: simulated GPUs on a state file, a store, its GPU ids, a virtual clock."""

    tmp: Path
    clock: VirtualClock
    store: Store
    gpu_ids: dict[int, int]

    @property
    def state_path(self) -> Path:
        return self.tmp / "simulated-gpus.json"

    def sim(self) -> SimulatedBackend:
        """A fresh backend object on the node's state file (what a restarted daemon opens)."""
        return SimulatedBackend(2, clock=self.clock, state_path=self.state_path)

    def actuators(self, backend: Any = None, *, dry_run: bool = False) -> Actuators:
        return Actuators(
            backend if backend is not None else self.sim(),
            self.store,
            host=HOST,
            gpu_ids=self.gpu_ids,
            dry_run=dry_run,
            clock=self.clock,
        )

    def job(self, name: str = "train") -> int:
        new = NewJob(name=name, user="alice", uid=1001, gid=1001, argv=("t",), cwd="/", host=HOST)
        return JobStore(self.store).create(new, at=self.now()).id

    def now(self) -> Any:
        from telemetry.clock import to_datetime

        return to_datetime(self.clock.now())

    def settings(self, index: int) -> tuple[int, tuple[int, int] | None]:
        """(power limit mW, locked clocks or None) as the simulated GPU's state file holds them."""
        gpu = json.loads(self.state_path.read_text())["gpus"][index]
        lock = gpu["lock"]
        return int(gpu["limit_mw"]), None if lock is None else (int(lock[0]), int(lock[1]))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    clock = VirtualClock()
    state = tmp_path / "simulated-gpus.json"
    sim = SimulatedBackend(2, clock=clock, state_path=state)
    store = open_store(f"sqlite:///{tmp_path / 'powertrain.db'}")
    ids = store.register_gpus(sim.devices(), host=HOST, backend="simulated")
    try:
        yield Node(tmp_path, clock, store, ids)
    finally:
        store.close()


# -- applying, journal first ---------------------------------------------------------------------


def test_set_power_limit_is_journaled_applied_and_in_force(node: Node) -> None:
    act = node.actuators()
    job = node.job()
    entry = act.set_power_limit(job, 0, 300_000)
    assert node.settings(0) == (300_000, None)
    assert node.settings(1) == (DEFAULT_MW, None)
    assert entry.status is JournalStatus.APPLIED and entry.applied_at is not None
    assert (entry.job_id, entry.gpu_index, entry.gpu_id) == (job, 0, node.gpu_ids[0])
    assert (entry.setting, entry.value, entry.previous_value) == (
        Knob.POWER_LIMIT,
        300_000,
        DEFAULT_MW,
    )
    assert not entry.dry_run
    assert act.applied(0) == [entry]


def test_lock_sm_clocks_defaults_min_to_the_gpus_minimum(node: Node) -> None:
    act = node.actuators()
    entry = act.lock_sm_clocks(node.job(), 1, 1410)
    assert node.settings(1) == (DEFAULT_MW, (MIN_MHZ, 1410))
    assert (entry.value, entry.min_clock_mhz, entry.previous_value) == (1410, MIN_MHZ, None)
    act.lock_sm_clocks(entry.job_id, 1, 1500, 900)
    assert node.settings(1) == (DEFAULT_MW, (900, 1500))


def test_entry_is_committed_pending_before_the_gpu_is_touched(node: Node) -> None:
    seen: list[list[JournalStatus]] = []
    spy = Spy(node.sim())
    # what another connection sees at the moment the backend is called
    spy.before = lambda _: seen.append([e.status for e in JournalStore(node.store).entries(HOST)])
    act = node.actuators(spy)
    act.set_power_limit(node.job(), 0, 400_000)
    assert seen == [[JournalStatus.PENDING]]


def test_permission_denied_is_journaled_failed_and_reraised(node: Node) -> None:
    sim = node.sim()
    sim.inject_fault(0, FaultKind.PERMISSION_DENIED)
    act = node.actuators(sim)
    job = node.job()
    with pytest.raises(GpuPermissionError):
        act.set_power_limit(job, 0, 300_000)
    with pytest.raises(GpuPermissionError):
        act.lock_sm_clocks(job, 0, 1200)
    (p, c) = JournalStore(node.store).entries(HOST)
    assert (p.setting, p.status, c.setting, c.status) == (
        Knob.POWER_LIMIT,
        JournalStatus.FAILED,
        Knob.SM_CLOCKS,
        JournalStatus.FAILED,
    )
    assert p.error is not None and p.error.startswith("GpuPermissionError")
    assert node.settings(0) == (DEFAULT_MW, None)
    assert act.applied(0) == []  # failed entries are not outstanding


def test_not_supported_and_invalid_values_are_journaled_failed(node: Node) -> None:
    sim = node.sim()
    sim.inject_fault(1, FaultKind.NOT_SUPPORTED, fields=["power_limit_mw"])
    act = node.actuators(sim)
    job = node.job()
    with pytest.raises(NotSupportedError):
        act.set_power_limit(job, 1, 300_000)
    with pytest.raises(InvalidSettingError, match=r"allowed range 200\.\.700 W"):
        act.set_power_limit(job, 0, 100_000)
    with pytest.raises(InvalidSettingError, match="min <= max"):
        act.lock_sm_clocks(job, 0, 1000, 1200)
    statuses = [e.status for e in JournalStore(node.store).entries(HOST)]
    assert statuses == [JournalStatus.FAILED] * 3
    assert node.settings(0) == node.settings(1) == (DEFAULT_MW, None)


def test_unknown_gpu_is_refused_without_a_journal_entry(node: Node) -> None:
    act = node.actuators()
    with pytest.raises(GpuNotFoundError):
        act.set_power_limit(None, 7, 300_000)
    assert JournalStore(node.store).entries(HOST) == []


def test_no_journal_no_change_when_the_store_cannot_write(node: Node) -> None:
    act = node.actuators()
    job = node.job()
    with node.store.engine.begin() as conn:
        conn.execute(text("DROP TABLE settings_journal"))
    with pytest.raises(StoreError):
        act.set_power_limit(job, 0, 300_000)
    assert node.settings(0) == (DEFAULT_MW, None)


def test_the_same_request_again_writes_nothing_and_sets_nothing(node: Node) -> None:
    spy = Spy(node.sim())
    act = node.actuators(spy)
    job = node.job()
    first = act.set_power_limit(job, 0, 300_000)
    for _ in range(5):  # a controller asking every second
        assert act.set_power_limit(job, 0, 300_000) == first
        act.lock_sm_clocks(job, 0, 1400)
    assert [c[0] for c in spy.calls] == ["set_power_limit", "lock_sm_clocks"]
    assert len(JournalStore(node.store).entries(HOST)) == 2

    second = act.set_power_limit(job, 0, 280_000)  # a real change is written
    assert second.previous_value == 300_000
    old = JournalStore(node.store).get(first.id)
    assert old is not None and old.status is JournalStatus.UNDONE
    assert old.undo_reason == f"superseded by journal entry {second.id}"
    assert [e.id for e in act.applied(0) if e.setting is Knob.POWER_LIMIT] == [second.id]


def test_a_setting_the_gpu_lost_is_set_again_under_the_same_entry(node: Node) -> None:
    sim = node.sim()
    act = node.actuators(sim)
    job = node.job()
    first = act.set_power_limit(job, 0, 300_000)
    sim.reset_power_limit(0)  # someone else resets it behind the daemon's back
    assert act.set_power_limit(job, 0, 300_000) == first  # a plain repeat sets nothing ...
    assert sim.read(0).power_limit_mw != 300_000
    assert act.set_power_limit(job, 0, 300_000, reapply=True) == first  # ... a re-apply does
    assert sim.read(0).power_limit_mw == 300_000
    assert len(JournalStore(node.store).entries(HOST)) == 1


# -- undoing -------------------------------------------------------------------------------------


def test_undo_job_puts_defaults_back_and_says_why(node: Node) -> None:
    act = node.actuators()
    job = node.job()
    act.set_power_limit(job, 0, 300_000)
    act.lock_sm_clocks(job, 0, 1200)
    act.set_power_limit(job, 1, 350_000)
    act.set_directives(job, pace_s=0.1)
    undone = act.undo_job(job, f"job {job} ended")
    assert node.settings(0) == node.settings(1) == (DEFAULT_MW, None)
    assert len(undone) == 3
    assert {e.status for e in undone} == {JournalStatus.UNDONE}
    assert {e.undo_reason for e in undone} == {f"job {job} ended"}
    assert all(e.undone_at is not None for e in undone)
    assert JournalStore(node.store).outstanding(HOST) == []
    assert act.directives(job) == Directive()
    assert act.undo_job(job, "again") == []
    # after an undo the same request is a change again
    again = act.set_power_limit(job, 0, 300_000)
    assert again.id not in {e.id for e in undone} and node.settings(0)[0] == 300_000


def test_overlapping_jobs_leave_no_stale_value(node: Node) -> None:
    act = node.actuators()
    a, b = node.job("a"), node.job("b")
    act.set_power_limit(a, 0, 300_000)
    act.set_power_limit(a, 1, 300_000)
    act.lock_sm_clocks(b, 1, 1200)
    b_limit = act.set_power_limit(b, 1, 250_000)  # b takes over GPU 1's limit from a
    assert b_limit.previous_value == 300_000

    act.undo_job(a, "job a ended")
    # a's GPU 0 is back to its default; GPU 1 keeps what b holds
    assert node.settings(0) == (DEFAULT_MW, None)
    assert node.settings(1) == (250_000, (MIN_MHZ, 1200))
    assert {(e.job_id, e.gpu_index, e.setting) for e in act.applied(1)} == {
        (b, 1, Knob.POWER_LIMIT),
        (b, 1, Knob.SM_CLOCKS),
    }
    act.undo_job(b, "job b ended")
    assert node.settings(1) == (DEFAULT_MW, None)
    assert JournalStore(node.store).outstanding(HOST) == []
    # the journal tells the whole story of a's GPU 1 limit
    (a1,) = [e for e in JournalStore(node.store).entries(HOST, job_id=a) if e.gpu_index == 1]
    assert a1.undo_reason == f"superseded by journal entry {b_limit.id}"


def test_same_value_from_another_job_is_its_own_entry(node: Node) -> None:
    act = node.actuators()
    a, b = node.job("a"), node.job("b")
    first = act.set_power_limit(a, 0, 300_000)
    second = act.set_power_limit(b, 0, 300_000)
    assert second.id != first.id and second.job_id == b
    act.undo_job(a, "job a ended")  # b now holds GPU 0's limit
    assert node.settings(0)[0] == 300_000
    act.undo_job(b, "job b ended")
    assert node.settings(0)[0] == DEFAULT_MW


def test_reset_gpu_and_undo_all(node: Node) -> None:
    act = node.actuators()
    a, b = node.job("a"), node.job("b")
    act.set_power_limit(a, 0, 300_000)
    act.lock_sm_clocks(a, 0, 1000)
    act.set_power_limit(b, 1, 400_000)
    undone = act.reset_gpu(0, "GPU 0 handed back")
    assert {(e.gpu_index, e.status) for e in undone} == {(0, JournalStatus.UNDONE)}
    assert len(undone) == 2
    assert node.settings(0) == (DEFAULT_MW, None) and node.settings(1)[0] == 400_000
    stopped = act.undo_all("daemon stopping")
    assert [(e.job_id, e.undo_reason) for e in stopped] == [(b, "daemon stopping")]
    assert node.settings(1) == (DEFAULT_MW, None)


def test_failed_undo_stays_outstanding_and_is_retried(node: Node) -> None:
    sim = node.sim()
    act = node.actuators(sim)
    job = node.job()
    act.set_power_limit(job, 0, 300_000)
    sim.inject_fault(0, FaultKind.GPU_LOST)
    (failed,) = act.undo_job(job, "job ended")
    assert failed.status is JournalStatus.UNDO_FAILED
    assert failed.error is not None and "lost" in failed.error
    assert [e.id for e in JournalStore(node.store).outstanding(HOST)] == [failed.id]
    sim.clear_faults(0)
    (undone,) = act.undo_all("daemon stopping")
    assert (undone.id, undone.status) == (failed.id, JournalStatus.UNDONE)
    assert node.settings(0) == (DEFAULT_MW, None)


# -- recovery after a crash ----------------------------------------------------------------------


def test_recover_after_a_crash_resets_what_the_dead_daemon_left(node: Node) -> None:
    first = node.actuators()
    a, b = node.job("a"), node.job("b")
    first.set_power_limit(a, 0, 300_000)
    first.lock_sm_clocks(a, 0, 1200)
    first.set_power_limit(b, 1, 450_000)
    # a crash between journaling and applying leaves a pending entry
    pending = JournalStore(node.store).record(
        host=HOST,
        gpu_id=node.gpu_ids[1],
        gpu_index=1,
        job_id=b,
        setting=Knob.SM_CLOCKS,
        value=1100,
        min_clock_mhz=MIN_MHZ,
        at=node.now(),
    )
    del first  # kill -9: nothing undone

    restarted = node.sim()  # the simulated GPUs outlive the process
    assert restarted.read(0).power_limit_mw == 300_000
    assert restarted.read(1).power_limit_mw == 450_000
    node.clock.advance(30)
    store = open_store(str(node.store.engine.url))
    try:
        second = Actuators(restarted, store, host=HOST, gpu_ids=node.gpu_ids, clock=node.clock)
        undone = second.recover()
        assert node.settings(0) == node.settings(1) == (DEFAULT_MW, None)
        assert restarted.read(0).power_limit_mw == DEFAULT_MW
        assert len(undone) == 4 and pending.id in {e.id for e in undone}
        assert {(e.status, e.undo_reason) for e in undone} == {
            (JournalStatus.UNDONE, RECOVERY_REASON)
        }
        assert {e.undone_at for e in undone} == {node.now()}
        assert JournalStore(store).outstanding(HOST) == []
        assert second.recover() == []
    finally:
        store.close()


def test_recover_touches_only_this_hosts_entries(node: Node) -> None:
    other_ids = node.store.register_gpus(
        [node.sim().devices()[0]], host="node-b", backend="simulated"
    )
    JournalStore(node.store).record(
        host="node-b",
        gpu_id=other_ids[0],
        gpu_index=0,
        job_id=None,
        setting="power_limit",
        value=300_000,
        at=node.now(),
    )
    spy = Spy(node.sim())
    assert node.actuators(spy).recover() == []
    assert spy.calls == []
    assert len(JournalStore(node.store).outstanding("node-b")) == 1


# -- dry run -------------------------------------------------------------------------------------


def test_dry_run_never_touches_the_gpus_and_logs_each_change(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    before = node.state_path.read_bytes()
    spy = Spy(node.sim(), forbid=True)
    act = node.actuators(spy, dry_run=True)
    job = node.job()
    with caplog.at_level(logging.INFO, logger="scheduler.actuators"):
        power = act.set_power_limit(job, 0, 300_000)
        clocks = act.lock_sm_clocks(job, 1, 1410)
        act.set_power_limit(job, 0, 300_000)  # unchanged: no second line
        undone = act.undo_job(job, f"job {job} ended")
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count(f"dry run: would set GPU 0 power limit to 300 W for job {job}") == 1
    assert f"dry run: would set GPU 1 SM clocks to 345..1410 MHz for job {job}" in messages
    assert f"dry run: would reset GPU 0 power limit to its default (job {job} ended)" in messages
    assert f"dry run: would reset GPU 1 SM clocks to its default (job {job} ended)" in messages
    assert (power.dry_run, power.status, clocks.dry_run, clocks.status) == (
        True,
        JournalStatus.APPLIED,
        True,
        JournalStatus.APPLIED,
    )
    assert {e.status for e in undone} == {JournalStatus.UNDONE}
    assert node.state_path.read_bytes() == before
    assert node.settings(0) == node.settings(1) == (DEFAULT_MW, None)


def test_dry_run_refuses_what_the_gpu_would_refuse(node: Node) -> None:
    act = node.actuators(Spy(node.sim(), forbid=True), dry_run=True)
    with pytest.raises(InvalidSettingError):
        act.set_power_limit(None, 0, 900_000)
    (entry,) = JournalStore(node.store).entries(HOST)
    assert (entry.dry_run, entry.status) == (True, JournalStatus.FAILED)


def test_dry_run_recovery_leaves_a_real_daemons_settings_for_the_next_real_one(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    real = node.actuators()
    job = node.job()
    real.set_power_limit(job, 0, 300_000)
    del real  # crash
    dry = node.actuators(Spy(node.sim(), forbid=True), dry_run=True)
    with caplog.at_level(logging.INFO, logger="scheduler.actuators"):
        assert dry.recover() == []
        dry.set_power_limit(job, 0, 250_000)  # does not supersede the real entry
    assert any("dry run: would reset GPU 0 power limit" in r.getMessage() for r in caplog.records)
    assert node.settings(0)[0] == 300_000
    assert len(JournalStore(node.store).outstanding(HOST)) == 2
    # a real daemon resets the real cap, and closes the dry run's entry without a second reset
    spy = Spy(node.sim())
    undone = node.actuators(spy).recover()
    assert spy.calls == [("reset_power_limit", 0)]
    assert {(e.dry_run, e.status) for e in undone} == {
        (False, JournalStatus.UNDONE),
        (True, JournalStatus.UNDONE),
    }
    assert node.settings(0)[0] == DEFAULT_MW


def test_dry_run_still_hands_out_directives(node: Node) -> None:
    """Pacing changes the training loop, not the card: a dry run validates the soft mode."""
    act = node.actuators(dry_run=True)
    assert act.set_directives(4, pace_s=0.25, micro_batch=8) == Directive(0.25, micro_batch=8)
    assert act.directives(4) == Directive(0.25, micro_batch=8)


# -- permission probe ----------------------------------------------------------------------------


def test_probe_permitted_writes_the_same_limit_again(node: Node) -> None:
    spy = Spy(node.sim())
    act = node.actuators(spy)
    act.set_power_limit(None, 0, 450_000)
    ok, reason = act.probe_power_limit_permission(0)
    assert ok and "450 W" in reason
    assert spy.calls[-1] == ("set_power_limit", 0, 450_000)
    assert node.settings(0)[0] == 450_000
    assert len(JournalStore(node.store).entries(HOST)) == 1  # the probe changes nothing: no entry


def test_probe_not_permitted_says_why(node: Node) -> None:
    sim = node.sim()
    sim.inject_fault(0, FaultKind.PERMISSION_DENIED)
    sim.inject_fault(1, FaultKind.NOT_SUPPORTED, fields=["power_limit_mw"])
    act = node.actuators(sim)
    ok, reason = act.probe_power_limit_permission(0)
    assert not ok and "no permission" in reason and "needs root" in reason
    ok, reason = act.probe_power_limit_permission(1)
    assert not ok and "does not report its power limit" in reason
    sim.clear_faults(1)
    sim.inject_fault(1, FaultKind.NOT_SUPPORTED, fields=["processes"])
    assert act.probe_power_limit_permission(1)[0]


def test_probe_in_a_dry_run_writes_nothing(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    sim_spy = Spy(node.sim(), forbid=True)
    ok, reason = node.actuators(sim_spy, dry_run=True).probe_power_limit_permission(0)
    assert ok and "simulated" in reason

    hw = Spy(node.sim(), name="nvml", forbid=True)
    act = node.actuators(hw, dry_run=True)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(actuators_module, "_has_cap_sys_admin", lambda: False)
    ok, reason = act.probe_power_limit_permission(0)
    assert not ok and "root or CAP_SYS_ADMIN" in reason
    monkeypatch.setattr(actuators_module, "_has_cap_sys_admin", lambda: True)
    assert act.probe_power_limit_permission(0) == (
        True,
        "the daemon has CAP_SYS_ADMIN (dry run: not tested by a write)",
    )
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert act.probe_power_limit_permission(0)[1].startswith("running as root")


def test_cap_sys_admin_is_read_from_the_effective_mask(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000200000\n")
    assert actuators_module._has_cap_sys_admin(status)
    status.write_text("Name:\tx\nCapEff:\t00000000001fffff\n")
    assert not actuators_module._has_cap_sys_admin(status)
    assert not actuators_module._has_cap_sys_admin(tmp_path / "missing")


# -- soft actuators, display, threads ------------------------------------------------------------


def test_directives_set_replace_and_clear(node: Node) -> None:
    act = node.actuators()
    assert act.directives(3) == Directive()
    assert act.set_directives(3, pace_s=0.5) == Directive(pace_s=0.5)
    assert act.set_directives(3, micro_batch=4) == Directive(micro_batch=4)  # replaces both
    assert act.set_directives(3, duty=0.5) == Directive(duty=0.5)
    assert act.set_directives(3, duty=1.0) == Directive()  # full speed is no directive
    assert act.directives(4) == Directive()
    act.set_directives(3, pace_s=0.5)
    act.clear_directives(3)
    assert act.directives(3) == Directive()
    with pytest.raises(ValueError, match="pace"):
        act.set_directives(3, pace_s=-1.0)
    with pytest.raises(ValueError, match="pace"):
        act.set_directives(3, pace_s=float("inf"))
    with pytest.raises(ValueError, match="micro-batch"):
        act.set_directives(3, micro_batch=0)


def test_applied_settings_lists_what_is_in_force_per_gpu_and_job(node: Node) -> None:
    act = node.actuators()
    a, b = node.job("a"), node.job("b")
    act.set_power_limit(a, 1, 300_000)
    act.lock_sm_clocks(a, 1, 1200)
    act.set_power_limit(b, 0, 500_000)
    shown = applied_settings(node.store, HOST)
    assert list(shown) == [0, 1]
    assert [(e.job_id, e.describe()) for e in shown[0]] == [(b, "power limit 500 W")]
    assert [(e.job_id, e.describe()) for e in shown[1]] == [
        (a, "power limit 300 W"),
        (a, "SM clocks 345..1200 MHz"),
    ]
    act.undo_all("stop")
    assert applied_settings(node.store, HOST) == {}


def test_concurrent_callers_keep_one_live_entry_per_gpu_setting(node: Node) -> None:
    act = node.actuators()
    job = node.job()
    errors: list[BaseException] = []

    def control(index: int) -> None:
        try:
            for i in range(10):
                act.set_power_limit(job, index, 300_000 + 10_000 * (i % 3))
                act.set_directives(job, pace_s=0.01 * i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=control, args=(i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    live = JournalStore(node.store).outstanding(HOST)
    assert sorted(e.gpu_index for e in live) == [0, 1]
    for e in live:
        assert node.settings(e.gpu_index)[0] == e.value


# -- the boundary --------------------------------------------------------------------------------


def test_only_the_actuators_change_gpu_settings() -> None:
    offenders = []
    for package in ("energy", "scheduler", "telemetry", "reports"):
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith("telemetry/backends/") or rel == "scheduler/actuators.py":
                continue
            offenders += [f"{rel}:{line} in {func}" for func, line in setter_calls(path)]
    assert offenders == [], "GPU settings change only through scheduler/actuators.py"
    # the check itself finds calls
    assert list(setter_calls(REPO / "scheduler" / "actuators.py"))
