"""The nodes registry: each daemon registers its node in the store, heartbeats, and says when it
stops, so that ``powertrain nodes`` can tell which nodes of a shared store are up.

A node is up while it is not stopped and its latest heartbeat is at most ``DOWN_AFTER_S`` old
(three missed heartbeats); a daemon that died without stopping (SIGKILL, a lost node) shows as
down once that time has passed. Times are aware UTC; the heartbeats are the daemons' clocks, so a
reader on another node judges their age across the clock skew between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Engine, Row, select, update
from sqlalchemy.exc import SQLAlchemyError

from telemetry.store.errors import write_error
from telemetry.store.models import nodes_table, to_epoch_us
from telemetry.store.sql import write_transaction

HEARTBEAT_INTERVAL_S = 5.0
"""Seconds between a daemon's heartbeats."""

DOWN_AFTER_S = 3 * HEARTBEAT_INTERVAL_S
"""A node whose latest heartbeat is older than this many seconds is down."""

NodeState = Literal["up", "down", "stopped"]

_node = nodes_table.c


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A registered node: the daemon that last registered it and its latest heartbeat.

    Attributes:
        name: The node's name (the daemon's host name); the registry's key.
        gpu_count: How many GPUs its daemon samples.
        backend: The daemon's GPU backend (``nvml``, ``simulated``, ``replay``).
        version: The powertrain version the daemon runs.
        pid: The daemon's process id on that node.
        started_at: When the daemon registered the node (aware UTC).
        heartbeat_at: The daemon's latest heartbeat (aware UTC).
        stopped_at: When the daemon stopped cleanly; ``None`` while it has not.
    """

    name: str
    gpu_count: int
    backend: str
    version: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None

    def state(self, now: datetime) -> NodeState:
        """``stopped`` once its daemon stopped cleanly; else ``up`` while the latest heartbeat
        is at most ``DOWN_AFTER_S`` before ``now`` (aware UTC), ``down`` after that."""
        if self.stopped_at is not None:
            return "stopped"
        if now - self.heartbeat_at <= timedelta(seconds=DOWN_AFTER_S):
            return "up"
        return "down"

    def is_up(self, now: datetime) -> bool:
        """Whether the node is up at ``now`` (see ``state``)."""
        return self.state(now) == "up"


def _check_time(at: datetime) -> None:
    to_epoch_us(at)  # ValueError for a naive time, before anything is written


def register_node(
    engine: Engine,
    *,
    name: str,
    gpu_count: int,
    backend: str,
    version: str,
    pid: int,
    at: datetime,
) -> None:
    """Register a node as started at ``at``: a new row, or the node's row overwritten (a
    restarted daemon), its heartbeat set to ``at`` and its stop cleared.

    Args:
        engine: The store's engine.
        name: The node's name (the daemon's host name).
        gpu_count: How many GPUs the daemon samples.
        backend: The GPU backend's name.
        version: The powertrain version the daemon runs.
        pid: The daemon's process id.
        at: When it started (aware UTC).

    Raises:
        ValueError: ``at`` is naive.
        StoreWriteError: Nothing was written.
    """
    _check_time(at)
    values = {
        "gpu_count": gpu_count,
        "backend": backend,
        "version": version,
        "pid": pid,
        "started_at": at,
        "heartbeat_at": at,
        "stopped_at": None,
    }
    try:
        with write_transaction(engine) as conn:
            # update, else insert: portable across SQLite and PostgreSQL (no dialect upsert)
            result = conn.execute(update(nodes_table).where(_node.name == name).values(**values))
            if result.rowcount == 0:
                conn.execute(nodes_table.insert().values(name=name, **values))
    except SQLAlchemyError as exc:
        raise write_error(f"registering node {name!r}", exc) from exc


def heartbeat(engine: Engine, name: str, at: datetime) -> bool:
    """Record a heartbeat of a registered node that has not stopped.

    Args:
        engine: The store's engine.
        name: The node's name.
        at: When (aware UTC).

    Returns:
        Whether the node was registered and not stopped (else nothing was written, and its
        daemon registers it again).

    Raises:
        ValueError: ``at`` is naive.
        StoreWriteError: Nothing was written.
    """
    _check_time(at)
    try:
        with write_transaction(engine) as conn:
            result = conn.execute(
                update(nodes_table)
                .where(_node.name == name, _node.stopped_at.is_(None))
                .values(heartbeat_at=at)
            )
    except SQLAlchemyError as exc:
        raise write_error(f"heartbeat of node {name!r}", exc) from exc
    return result.rowcount > 0


def node_stopped(engine: Engine, name: str, at: datetime) -> bool:
    """Mark a node stopped at ``at`` (its daemon stopped cleanly).

    Args:
        engine: The store's engine.
        name: The node's name.
        at: When (aware UTC).

    Returns:
        Whether the node was registered (an unknown one is not added).

    Raises:
        ValueError: ``at`` is naive.
        StoreWriteError: Nothing was written.
    """
    _check_time(at)
    try:
        with write_transaction(engine) as conn:
            result = conn.execute(
                update(nodes_table).where(_node.name == name).values(stopped_at=at)
            )
    except SQLAlchemyError as exc:
        raise write_error(f"marking node {name!r} stopped", exc) from exc
    return result.rowcount > 0


def _record(row: Row[Any]) -> NodeRecord:
    return NodeRecord(
        name=row.name,
        gpu_count=row.gpu_count,
        backend=row.backend,
        version=row.version,
        pid=row.pid,
        started_at=row.started_at,
        heartbeat_at=row.heartbeat_at,
        stopped_at=row.stopped_at,
    )


def list_nodes(engine: Engine) -> list[NodeRecord]:
    """Every registered node, by name."""
    with engine.connect() as conn:
        rows = conn.execute(select(nodes_table).order_by(_node.name)).all()
    return [_record(row) for row in rows]
