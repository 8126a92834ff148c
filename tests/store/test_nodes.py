"""The nodes registry on SQLite and PostgreSQL: registration, restarts, heartbeats, stops, and
when a node counts as up, down or stopped."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from telemetry.store import NodeRecord, Store, StoreWriteError
from telemetry.store.nodes import DOWN_AFTER_S, HEARTBEAT_INTERVAL_S, list_nodes
from tests.store.data import at

US = timedelta(microseconds=1)


def register(store: Store, name: str = "node-a", *, t: float = 0.0, pid: int = 4242,
             gpus: int = 4, version: str = "0.1.0") -> None:
    store.register_node(name=name, gpu_count=gpus, backend="simulated", version=version,
                        pid=pid, at=at(t))


def only(store: Store) -> NodeRecord:
    nodes = store.nodes()
    assert len(nodes) == 1, nodes
    return nodes[0]


def test_a_registered_node_is_listed_up(store: Store) -> None:
    register(store)
    assert store.nodes() == [
        NodeRecord(name="node-a", gpu_count=4, backend="simulated", version="0.1.0", pid=4242,
                   started_at=at(0), heartbeat_at=at(0), stopped_at=None)
    ]
    node = only(store)
    assert node.state(at(1)) == "up" and node.is_up(at(1))


def test_nodes_are_listed_by_name(store: Store) -> None:
    for name in ("node-c", "node-a", "node-b"):
        register(store, name)
    assert [n.name for n in store.nodes()] == ["node-a", "node-b", "node-c"]
    assert [n.name for n in list_nodes(store.engine)] == ["node-a", "node-b", "node-c"]


def test_an_empty_registry_lists_nothing(store: Store) -> None:
    assert store.nodes() == []


def test_a_restarted_daemon_overwrites_its_node(store: Store) -> None:
    register(store, t=0, pid=100, gpus=4, version="0.1.0")
    store.heartbeat("node-a", at(30))
    assert store.node_stopped("node-a", at(40))
    register(store, t=100, pid=200, gpus=8, version="0.2.0")
    assert only(store) == NodeRecord(
        name="node-a", gpu_count=8, backend="simulated", version="0.2.0", pid=200,
        started_at=at(100), heartbeat_at=at(100), stopped_at=None,
    )
    assert only(store).state(at(101)) == "up"


def test_a_heartbeat_moves_only_the_heartbeat(store: Store) -> None:
    register(store, t=0)
    assert store.heartbeat("node-a", at(5)) is True
    assert store.heartbeat("node-a", at(10)) is True
    node = only(store)
    assert (node.started_at, node.heartbeat_at, node.stopped_at) == (at(0), at(10), None)


def test_a_heartbeat_of_an_unknown_node_adds_nothing(store: Store) -> None:
    assert store.heartbeat("ghost", at(5)) is False
    assert store.nodes() == []


def test_a_stopped_node_stays_stopped(store: Store) -> None:
    register(store, t=0)
    assert store.node_stopped("node-a", at(7)) is True
    node = only(store)
    assert node.stopped_at == at(7)
    assert node.state(at(7)) == "stopped" and not node.is_up(at(7))
    # a late heartbeat does not revive it: only registering again does
    assert store.heartbeat("node-a", at(8)) is False
    assert only(store) == node


def test_stopping_an_unknown_node_adds_nothing(store: Store) -> None:
    assert store.node_stopped("ghost", at(1)) is False
    assert store.nodes() == []


def test_up_until_three_heartbeats_are_missed_then_down(store: Store) -> None:
    assert DOWN_AFTER_S == 3 * HEARTBEAT_INTERVAL_S
    register(store, t=0)
    store.heartbeat("node-a", at(20))
    node = only(store)
    last = at(20)
    assert node.state(last) == "up"
    assert node.state(last + timedelta(seconds=DOWN_AFTER_S)) == "up"
    assert node.state(last + timedelta(seconds=DOWN_AFTER_S) + US) == "down"
    assert not node.is_up(last + timedelta(seconds=DOWN_AFTER_S) + US)
    # a heartbeat brings it back up
    store.heartbeat("node-a", at(60))
    assert only(store).state(at(61)) == "up"


def test_stopped_wins_over_a_fresh_heartbeat() -> None:
    node = NodeRecord(name="n", gpu_count=1, backend="nvml", version="1", pid=1,
                      started_at=at(0), heartbeat_at=at(10), stopped_at=None)
    assert node.state(at(10)) == "up"
    assert replace(node, stopped_at=at(10)).state(at(10)) == "stopped"


def test_naive_times_are_rejected_before_writing(store: Store) -> None:
    naive = datetime(2026, 1, 1, 12, 0, 0)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.register_node(name="node-a", gpu_count=1, backend="nvml", version="1", pid=1,
                            at=naive)
    assert store.nodes() == []
    register(store)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.heartbeat("node-a", naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.node_stopped("node-a", naive)
    assert only(store).heartbeat_at == at(0) and only(store).stopped_at is None


def test_a_failed_registration_is_a_store_write_error(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE nodes"))
    with pytest.raises(StoreWriteError, match="registering node 'node-a'") as caught:
        register(store)
    assert caught.value.transient is False
    with pytest.raises(StoreWriteError, match="heartbeat of node 'node-a'"):
        store.heartbeat("node-a", at(1))
    with pytest.raises(StoreWriteError, match="marking node 'node-a' stopped"):
        store.node_stopped("node-a", at(1))
