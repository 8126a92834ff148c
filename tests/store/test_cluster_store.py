"""The cluster cap's rows: one leader at a time by lease, terms that fence a deposed leader's
writes, and lifting the cap clears the division (on SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from scheduler.store.cluster import NODE_CAP, ClusterStore
from telemetry.store import Store

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def test_one_leader_at_a_time_and_a_dead_ones_lease_runs_out(store: Store) -> None:
    cluster = ClusterStore(store.engine)
    assert cluster.state().leader is None and cluster.state().term == 0
    assert cluster.lead("a", at=at(0), lease_s=6) == 1
    assert cluster.lead("b", at=at(1), lease_s=6) is None
    assert cluster.lead("a", at=at(5), lease_s=6) == 1  # renewed: same term
    assert cluster.lead("b", at=at(10), lease_s=6) is None  # a's lease holds until 11
    assert cluster.lead("b", at=at(11.5), lease_s=6) == 2  # a stopped renewing
    assert cluster.lead("a", at=at(12), lease_s=6) is None
    state = cluster.state()
    assert (state.leader, state.term, state.lease_until) == ("b", 2, at(17.5))
    assert state.leader_since == at(11.5)
    cluster.lead("b", at=at(13), lease_s=6)  # a renewal keeps when it began to lead
    assert cluster.state().leader_since == at(11.5)
    cluster.resign("b")
    assert cluster.lead("a", at=at(14), lease_s=6) == 3  # at once, no lease to wait out


def test_a_deposed_leader_writes_nothing(store: Store) -> None:
    cluster = ClusterStore(store.engine)
    cluster.set_cap(1000, by="root", at=at(0))
    term_a = cluster.lead("a", at=at(0), lease_s=6)
    assert term_a == 1
    assert cluster.write_division("a", 1, {("a", NODE_CAP): (600.0, 500.0, None),
                                           ("a", 7): (250.0, 480.0, 0.9)}, at=at(1))
    term_b = cluster.lead("b", at=at(20), lease_s=6)
    assert term_b == 2
    assert not cluster.write_division("a", 1, {("a", NODE_CAP): (999.0, 0.0, None)}, at=at(21))
    assert [(s.node, s.job_id, s.watts) for s in cluster.shares()] == [
        ("a", NODE_CAP, 600.0), ("a", 7, 250.0)]
    assert cluster.write_division("b", 2, {("b", NODE_CAP): (1000.0, 0.0, None)}, at=at(22))
    assert [(s.node, s.watts) for s in cluster.shares()] == [("b", 1000.0)]
    assert cluster.shares("a") == []


def test_lifting_the_cap_clears_the_division(store: Store) -> None:
    cluster = ClusterStore(store.engine)
    cluster.set_cap(800, by="root", at=at(0))
    cluster.lead("a", at=at(0), lease_s=6)
    cluster.write_division("a", 1, {("a", NODE_CAP): (800.0, 0.0, None)}, at=at(1))
    cluster.set_cap(None, by="alice", at=at(2))
    state = cluster.state()
    assert (state.cap_w, state.set_by) == (None, "alice")
    assert cluster.shares() == []


def test_racing_daemons_elect_exactly_one(store: Store) -> None:
    cluster = ClusterStore(store.engine)
    cluster.set_cap(500, by="root", at=at(0))  # the row exists: the race is for the lease
    won: list[str] = []
    start = threading.Barrier(4)

    def race(node: str) -> None:
        start.wait()
        if cluster.lead(node, at=at(1), lease_s=6) is not None:
            won.append(node)

    threads = [threading.Thread(target=race, args=(n,)) for n in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and cluster.state().leader == won[0]
