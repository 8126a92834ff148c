"""The cluster power cap in the store: the cap, the leader's lease, and what it gave nodes and jobs.

One row of ``cluster_state`` holds the cap and the lease. A daemon leads while its lease holds:
``lead`` takes the lease when it is free or has run out, or renews it when it is the daemon's
own, in one conditional UPDATE, so two daemons racing for it cannot both win (on SQLite and on
PostgreSQL alike). Each new leader gets a new term, and a division is written only under the
term it was computed in: a leader that lost its lease while dividing writes nothing. Leases are
judged by the daemons' clocks: keep the nodes' clocks in sync, as for heartbeats.

``cluster_shares`` holds the latest division: each node's cap (``job_id`` 0) and each job's
per-GPU watts on each node it runs on. A node keeps holding the last shares it read when no
leader writes new ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from telemetry.store.errors import write_error
from telemetry.store.models import cluster_shares_table, cluster_state_table
from telemetry.store.sql import write_transaction

NODE_CAP = 0
"""The ``job_id`` of a node's own cap in ``cluster_shares``."""

_s = cluster_state_table.c
_sh = cluster_shares_table.c


@dataclass(frozen=True, slots=True)
class ClusterState:
    """The cap and who leads.

    Attributes:
        cap_w: The cluster cap, W; ``None``: none is set.
        set_by / set_at: Who set it and when.
        leader / leader_since / lease_until: The leading node, since when it leads, and when
            its lease runs out (aware UTC).
        term: Counts leaders: each new one gets the next term.
        divided_at: When the leader last wrote a division.
    """

    cap_w: float | None
    set_by: str | None
    set_at: datetime | None
    leader: str | None
    leader_since: datetime | None
    lease_until: datetime | None
    term: int
    divided_at: datetime | None


@dataclass(frozen=True, slots=True)
class ShareRecord:
    """What the leader gave a node (``job_id`` 0, ``watts`` its cap) or a job on a node
    (``watts`` per GPU), with the draw it expected (W, all of them) and the job's relative
    throughput it expected there."""

    node: str
    job_id: int
    watts: float
    expected_w: float
    rate_rel: float | None
    term: int


class ClusterStore:
    """The cluster cap's rows in one store.

    Args:
        engine: The store's engine (at the latest schema).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def state(self) -> ClusterState:
        """The cap and the lease (no cap, no leader, term 0 before anyone set one)."""
        with self._engine.connect() as conn:
            row = conn.execute(select(cluster_state_table).where(_s.id == 1)).first()
        if row is None:
            return ClusterState(None, None, None, None, None, None, 0, None)
        m = row._mapping
        return ClusterState(m["cap_w"], m["set_by"], m["set_at"], m["leader"], m["leader_since"],
                            m["lease_until"], m["term"], m["divided_at"])

    def set_cap(self, cap_w: float | None, *, by: str, at: datetime) -> None:
        """Set the cap (``None`` lifts it; the shares go with it).

        Raises:
            StoreWriteError: Nothing was written.
        """
        try:
            with write_transaction(self._engine) as conn:
                self._ensure_row(conn)
                conn.execute(update(cluster_state_table).where(_s.id == 1)
                             .values(cap_w=cap_w, set_by=by, set_at=at))
                if cap_w is None:
                    conn.execute(delete(cluster_shares_table))
        except SQLAlchemyError as exc:
            raise write_error("setting the cluster cap", exc) from exc

    def lead(self, node: str, *, at: datetime, lease_s: float) -> int | None:
        """Take or renew the lease for ``node``; its term while it leads, else ``None``.

        Raises:
            StoreWriteError: Nothing was written (the caller does not lead).
        """
        until = at + timedelta(seconds=lease_s)
        try:
            with write_transaction(self._engine) as conn:
                self._ensure_row(conn)
                renewed = conn.execute(
                    update(cluster_state_table)
                    .where(_s.id == 1, _s.leader == node, _s.lease_until >= at)
                    .values(lease_until=until)
                )
                if renewed.rowcount == 1:
                    term = conn.execute(select(_s.term).where(_s.id == 1)).scalar_one()
                    return int(term)
                taken = conn.execute(
                    update(cluster_state_table)
                    .where(_s.id == 1, (_s.leader.is_(None)) | (_s.lease_until < at))
                    .values(leader=node, leader_since=at, lease_until=until, term=_s.term + 1)
                )
                if taken.rowcount == 1:
                    return int(conn.execute(select(_s.term).where(_s.id == 1)).scalar_one())
                return None
        except SQLAlchemyError as exc:
            raise write_error("taking the cluster lead", exc) from exc

    def resign(self, node: str) -> None:
        """Give the lease up now (a daemon that stops), so another node leads at once."""
        try:
            with write_transaction(self._engine) as conn:
                conn.execute(update(cluster_state_table).where(_s.id == 1, _s.leader == node)
                             .values(leader=None, leader_since=None, lease_until=None))
        except SQLAlchemyError as exc:
            raise write_error("resigning the cluster lead", exc) from exc

    def write_division(
        self, node: str, term: int, shares: Mapping[tuple[str, int], tuple[float, float,
                                                                           float | None]],
        *, at: datetime,
    ) -> bool:
        """Replace the shares with ``shares`` (``(node, job_id)``: watts, expected draw,
        relative rate), if ``node`` still leads in ``term``; whether it did.

        Raises:
            StoreWriteError: Nothing was written.
        """
        try:
            with write_transaction(self._engine) as conn:
                still = conn.execute(
                    update(cluster_state_table)
                    .where(_s.id == 1, _s.leader == node, _s.term == term)
                    .values(divided_at=at)
                )
                if still.rowcount != 1:
                    return False
                conn.execute(delete(cluster_shares_table))
                if shares:
                    conn.execute(insert(cluster_shares_table), [
                        {"node": n, "job_id": j, "watts": w, "expected_w": e, "rate_rel": r,
                         "term": term}
                        for (n, j), (w, e, r) in shares.items()
                    ])
                return True
        except SQLAlchemyError as exc:
            raise write_error("writing the cluster's division", exc) from exc

    def shares(self, node: str | None = None) -> list[ShareRecord]:
        """The latest division: every share, or one node's."""
        query = select(cluster_shares_table).order_by(_sh.node, _sh.job_id)
        if node is not None:
            query = query.where(_sh.node == node)
        with self._engine.connect() as conn:
            return [ShareRecord(r.node, r.job_id, r.watts, r.expected_w, r.rate_rel, r.term)
                    for r in conn.execute(query)]

    @staticmethod
    def _ensure_row(conn: Connection) -> None:
        """The state row, made on first use (a second daemon racing to make it fails this
        once, and takes it next time)."""
        if conn.execute(select(_s.id).where(_s.id == 1)).first() is None:
            conn.execute(insert(cluster_state_table).values(id=1, term=0))
