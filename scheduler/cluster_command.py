"""``powertrain cluster cap|status``: one power cap over every node of a store.

The commands work on the store directly, as ``nodes`` and ``token`` do: setting the cap takes the
right to write the store (a node's daemon user or root: an admin's), and every daemon of the
store takes it up within seconds (``scheduler.cluster.cap``). Every failure is one
``error: ...`` line and a non-zero exit.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from scheduler.store.cluster import NODE_CAP, ClusterStore
from scheduler.store_access import EXIT_ERROR, EXIT_USAGE, fail, opened_store, reason, who_am_i
from telemetry.store import StoreError

cluster = typer.Typer(
    help="One power cap over every node of the store: a leader elected through the store "
    "divides it into node caps and job budgets, by the throughput each job gains per watt.",
    no_args_is_help=True,
)

DbOpt = Annotated[str | None, typer.Option(
    "--db", help="SQLAlchemy URL of the store (default: SQLite under --home). Env: POWERTRAIN_DB.")]
HomeOpt = Annotated[Path | None, typer.Option(
    "--home", help="Data folder (store). Env: POWERTRAIN_HOME.")]


@cluster.command()
def cap(
    watts: Annotated[str, typer.Argument(help="The cap over all nodes, W; `off` lifts it.")],
    db: DbOpt = None,
    home: HomeOpt = None,
) -> None:
    """Set the cluster's power cap (or lift it with `off`); the daemons hold it within seconds.

    The leader keeps 3 % of it unspent, gives each running job at least its cards' lowest limit, and divides the rest by measured throughput per watt.
    """  # noqa: E501
    if watts.strip().lower() == "off":
        cap_w = None
    else:
        try:
            cap_w = float(watts)
        except ValueError:
            fail(f"WATTS: expected a number of watts or `off`, got {watts!r}", EXIT_USAGE)
        if not math.isfinite(cap_w) or cap_w <= 0:
            fail(f"WATTS: the cap must be a positive number of watts, got {watts}", EXIT_USAGE)
    with opened_store(db, home) as store:
        try:
            ClusterStore(store.engine).set_cap(cap_w, by=who_am_i(), at=datetime.now(UTC))
        except (StoreError, SQLAlchemyError) as exc:
            fail(f"cannot set the cluster cap: {reason(exc)}", EXIT_ERROR)
    Console().print("cluster cap lifted" if cap_w is None else
                    f"cluster cap set to {cap_w:.0f} W", highlight=False)


@cluster.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    db: DbOpt = None,
    home: HomeOpt = None,
) -> None:
    """Show the cap, its leader, each node's cap and each job's share of the latest division."""
    with opened_store(db, home) as store:
        clusters = ClusterStore(store.engine)
        try:
            state, shares = clusters.state(), clusters.shares()
        except SQLAlchemyError as exc:
            fail(f"cannot read the cluster cap: {reason(exc)}", EXIT_ERROR)
    now = datetime.now(UTC)
    leads = state.leader is not None and state.lease_until is not None and state.lease_until >= now
    data = {
        "cap_w": state.cap_w, "set_by": state.set_by,
        "set_at": state.set_at.isoformat() if state.set_at else None,
        "leader": state.leader if leads else None, "term": state.term,
        "leader_since": state.leader_since.isoformat() if leads and state.leader_since else None,
        "divided_at": state.divided_at.isoformat() if state.divided_at else None,
        "nodes": [{"node": s.node, "cap_w": round(s.watts, 1),
                   "expected_w": round(s.expected_w, 1)}
                  for s in shares if s.job_id == NODE_CAP],
        "jobs": [{"node": s.node, "job": s.job_id, "watts_per_gpu": round(s.watts, 1),
                  "expected_w": round(s.expected_w, 1),
                  "rate_rel": None if s.rate_rel is None else round(s.rate_rel, 3)}
                 for s in shares if s.job_id != NODE_CAP],
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    console = Console()
    if state.cap_w is None:
        console.print("no cluster cap is set (`powertrain cluster cap WATTS`)", highlight=False)
        return
    leader = escape(state.leader) if leads and state.leader else "none (no daemon leads now)"
    console.print(f"cluster cap {state.cap_w:.0f} W, set by {escape(state.set_by or '?')}; "
                  f"leader {leader}, term {state.term}", highlight=False)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for header in ("Node", "Job", "Watts", "Expected W", "Rel. throughput"):
        table.add_column(header, overflow="fold")
    for s in shares:
        table.add_row(escape(s.node), "node cap" if s.job_id == NODE_CAP else str(s.job_id),
                      f"{s.watts:.0f}" + ("" if s.job_id == NODE_CAP else " /GPU"),
                      f"{s.expected_w:.0f}", "-" if s.rate_rel is None else f"{s.rate_rel:.2f}")
    console.print(table)

