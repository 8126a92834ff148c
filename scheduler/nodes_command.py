"""``powertrain nodes``: the nodes whose daemons write to the store, and which of them are up.

``nodes`` is a Typer command function (the CLI registers it with ``app.command("nodes")``). It
reads the store directly, as ``report`` does, so it works from any machine that reaches a shared
store, with no daemon of its own. A store that cannot be opened or read ends in one
``error: ...`` line on stderr and a non-zero exit.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from scheduler.store_access import (
    EXIT_ERROR,
    EXIT_USAGE,
    UsageError,
    fail,
    open_or_fail,
    reason,
    store_url,
)
from telemetry.store import (
    NodeRecord,
)
from telemetry.store.nodes import NodeState

_STATE_STYLE: dict[NodeState, str] = {"up": "green", "down": "bold red", "stopped": "dim"}


def age(seconds: float) -> str:
    """A time this many seconds ago, for people: ``3 s ago``, ``4 min ago``, ``2 h ago``,
    ``5 d ago`` (a time ahead of the reader's clock reads ``0 s ago``)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 86400:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


def node_json(node: NodeRecord, now: datetime) -> dict[str, Any]:
    """One node as the ``--json`` output gives it (times ISO 8601 UTC; ``up`` and ``state`` as
    judged at ``now``)."""
    state = node.state(now)
    return {
        "name": node.name,
        "gpus": node.gpu_count,
        "backend": node.backend,
        "version": node.version,
        "pid": node.pid,
        "started_at": node.started_at.isoformat(),
        "heartbeat_at": node.heartbeat_at.isoformat(),
        "stopped_at": node.stopped_at.isoformat() if node.stopped_at else None,
        "up": state == "up",
        "state": state,
    }


def nodes_table(nodes: list[NodeRecord], now: datetime) -> Table:
    """The nodes as a Rich table: name, GPUs, backend, version, pid, when it started and its
    last heartbeat (as ages), and state."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    table.add_column("Node", overflow="fold")  # a name is never cut short
    for header in ("GPUs", "Backend", "Version", "PID"):
        table.add_column(header, overflow="fold")
    for header in ("Started", "Heartbeat", "State"):
        table.add_column(header, no_wrap=True)
    for node in nodes:
        state = node.state(now)
        table.add_row(
            escape(node.name),
            str(node.gpu_count),
            escape(node.backend),
            escape(node.version),
            str(node.pid),
            age((now - node.started_at).total_seconds()),
            age((now - node.heartbeat_at).total_seconds()),
            f"[{_STATE_STYLE[state]}]{state}[/]",
        )
    return table


def _now() -> datetime:
    """When the nodes' states are judged (the tests fix it)."""
    return datetime.now(UTC)


def _read_nodes(url: str) -> list[NodeRecord]:
    store = open_or_fail(url)
    try:
        return store.nodes()
    except SQLAlchemyError as exc:
        fail(f"cannot read the nodes: {reason(exc)}", EXIT_ERROR)
    finally:
        store.close()


def nodes(
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the nodes as a JSON list: name, gpus, backend, version, pid, "
        "started_at, heartbeat_at, stopped_at (ISO 8601 UTC), up, state.")] = False,
    db: Annotated[str | None, typer.Option(
        "--db", help="SQLAlchemy URL of the store (default: SQLite under --home). "
        "Env: POWERTRAIN_DB.")] = None,
    home: Annotated[Path | None, typer.Option(
        "--home", help="Data folder (store). Env: POWERTRAIN_HOME.")] = None,
) -> None:
    """List the nodes whose daemons write to the store, and whether each is up.

    Each row: GPUs, backend, powertrain version, daemon pid, when it started, last heartbeat.

    A daemon heartbeats every 5 s; its node is up while that is at most 15 s old, else down.

    A node whose daemon stopped cleanly (SIGTERM, SIGINT) is stopped until it starts again.

    Ages are judged by this machine's clock: keep the nodes' clocks in sync.
    """
    try:
        url = store_url(db, home)
    except UsageError as exc:
        fail(str(exc), EXIT_USAGE)
    found = _read_nodes(url)
    now = _now()
    if as_json:
        typer.echo(json.dumps([node_json(node, now) for node in found], indent=2))
        return
    console = Console()
    if not found:
        console.print("no node has registered in this store yet", highlight=False)
        return
    console.print(nodes_table(found, now))

