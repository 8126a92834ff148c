"""JournalStore on SQLite and PostgreSQL: record, status changes, queries, migration."""

from __future__ import annotations

import pytest

from energy.optimizer import Knob
from scheduler.store import (
    InvalidJournalTransitionError,
    JobStore,
    JournalEntryNotFoundError,
    JournalStatus,
    JournalStore,
    NewJob,
)
from telemetry.store import Store, current_revision, downgrade, open_store, upgrade
from tests.store.data import at, gpu_info

HOST = "node-a"


def _setup(store: Store) -> tuple[dict[int, int], int]:
    ids = store.register_gpus([gpu_info(i) for i in range(2)], host=HOST, backend="simulated")
    job = JobStore(store).create(
        NewJob(name="j", user="alice", uid=1001, gid=1001, argv=("true",), cwd="/", host=HOST),
        at=at(0),
    )
    return ids, job.id


def test_record_writes_a_pending_entry_with_every_field(store: Store) -> None:
    ids, job_id = _setup(store)
    entry = JournalStore(store).record(
        host=HOST,
        gpu_id=ids[1],
        gpu_index=1,
        job_id=job_id,
        setting=Knob.SM_CLOCKS,
        value=1410,
        min_clock_mhz=345,
        previous_value=None,
        at=at(5),
    )
    assert entry.id > 0
    assert (entry.host, entry.gpu_id, entry.gpu_index, entry.job_id) == (HOST, ids[1], 1, job_id)
    assert (entry.setting, entry.value, entry.min_clock_mhz) == (Knob.SM_CLOCKS, 1410, 345)
    assert entry.status is JournalStatus.PENDING and entry.outstanding
    assert entry.dry_run is False and entry.previous_value is None
    assert entry.requested_at == at(5) and entry.applied_at is None and entry.undone_at is None
    assert entry.describe() == "SM clocks 345..1410 MHz"
    assert JournalStore(store).get(entry.id) == entry


def test_life_of_an_entry_applied_then_undone(store: Store) -> None:
    ids, job_id = _setup(store)
    j = JournalStore(store)
    entry = j.record(
        host=HOST,
        gpu_id=ids[0],
        gpu_index=0,
        job_id=job_id,
        setting="power_limit",
        value=300_000,
        previous_value=700_000,
        at=at(1),
    )
    applied = j.mark_applied(entry.id, at(2))
    assert applied.status is JournalStatus.APPLIED and applied.applied_at == at(2)
    assert applied.describe() == "power limit 300 W"
    assert [e.id for e in j.outstanding(HOST)] == [entry.id]
    undone = j.mark_undone(entry.id, at(9), "job 1 ended")
    assert undone.status is JournalStatus.UNDONE
    assert (undone.undone_at, undone.undo_reason) == (at(9), "job 1 ended")
    assert j.outstanding(HOST) == []
    with pytest.raises(InvalidJournalTransitionError, match="undone to applied"):
        j.mark_applied(entry.id, at(10))
    assert j.get(entry.id) == undone


def test_failed_is_not_outstanding_and_undo_failed_is(store: Store) -> None:
    ids, job_id = _setup(store)
    j = JournalStore(store)

    def rec(value: int) -> int:
        e = j.record(
            host=HOST,
            gpu_id=ids[0],
            gpu_index=0,
            job_id=job_id,
            setting=Knob.POWER_LIMIT,
            value=value,
            at=at(1),
        )
        return e.id

    refused, stuck, pending = rec(250_000), rec(260_000), rec(270_000)
    failed = j.mark_failed(refused, "needs root")
    assert failed.status is JournalStatus.FAILED and failed.error == "needs root"
    j.mark_applied(stuck, at(2))
    assert j.mark_undo_failed(stuck, "GPU lost").status is JournalStatus.UNDO_FAILED
    # pending counts: a crash may have hit between record and apply
    assert [e.id for e in j.outstanding(HOST)] == [stuck, pending]
    with pytest.raises(InvalidJournalTransitionError):
        j.mark_undone(refused, at(3), "nothing to undo")
    assert j.mark_undone(stuck, at(4), "retried").status is JournalStatus.UNDONE
    with pytest.raises(JournalEntryNotFoundError):
        j.mark_applied(10_000, at(1))


def test_outstanding_and_entries_filter_by_host_job_gpu_and_time(store: Store) -> None:
    ids, job_id = _setup(store)
    other_ids = store.register_gpus([gpu_info(7)], host="node-b", backend="simulated")
    j = JournalStore(store)
    a = j.record(
        host=HOST, gpu_id=ids[0], gpu_index=0, job_id=job_id, setting="power_limit",
        value=300_000, at=at(1),
    )  # fmt: skip
    b = j.record(
        host=HOST, gpu_id=ids[1], gpu_index=1, job_id=None, setting="power_limit",
        value=400_000, at=at(5), dry_run=True,
    )  # fmt: skip
    c = j.record(
        host="node-b", gpu_id=other_ids[7], gpu_index=7, job_id=None, setting="sm_clocks",
        value=990, min_clock_mhz=345, at=at(3),
    )  # fmt: skip
    assert [e.id for e in j.outstanding(HOST)] == [a.id, b.id]
    assert [e.id for e in j.outstanding(HOST, job_id=job_id)] == [a.id]
    assert [e.id for e in j.outstanding(HOST, gpu_index=1)] == [b.id]
    assert [e.id for e in j.outstanding("node-b")] == [c.id]
    assert j.get(b.id) is not None and j.get(b.id).dry_run is True  # type: ignore[union-attr]
    assert [e.id for e in j.entries(HOST)] == [a.id, b.id]
    assert [e.id for e in j.entries(HOST, since=at(2))] == [b.id]
    assert [e.id for e in j.entries(HOST, job_id=job_id)] == [a.id]


def test_naive_time_is_refused_before_anything_is_written(store: Store) -> None:
    ids, _ = _setup(store)
    with pytest.raises(ValueError, match="timezone-aware"):
        JournalStore(store).record(
            host=HOST,
            gpu_id=ids[0],
            gpu_index=0,
            job_id=None,
            setting="power_limit",
            value=300_000,
            at=at(0).replace(tzinfo=None),
        )
    assert JournalStore(store).entries(HOST) == []


def test_downgrade_to_0003_drops_only_the_journal_and_upgrade_restores_it(store_url: str) -> None:
    store = open_store(store_url)
    try:
        ids, job_id = _setup(store)
        JournalStore(store).record(
            host=HOST, gpu_id=ids[0], gpu_index=0, job_id=job_id, setting="power_limit",
            value=300_000, at=at(1),
        )  # fmt: skip
    finally:
        store.close()
    downgrade(store_url, "0003")
    assert current_revision(store_url) == "0003"
    upgrade(store_url)
    store = open_store(store_url)
    try:
        assert JournalStore(store).entries(HOST) == []
        assert [j.id for j in JobStore(store).list()] == [job_id]
        assert len(store.gpus(host=HOST)) == 2
    finally:
        store.close()
