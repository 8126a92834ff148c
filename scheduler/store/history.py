"""The control history of jobs in the store: control decisions and the optimiser's searches.

Every controller, guard, node-cap and optimiser decision is stored with the power and steps/s
before it and, once its change has settled, after it; every search of the energy optimiser is
stored with what each setting it probed measured (``reports`` reads both back).
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError

from energy.optimizer import Knob
from scheduler.store.records import DecisionRecord, ProbeRecord, SearchRecord
from telemetry.store import Store
from telemetry.store.errors import write_error
from telemetry.store.models import (
    control_decisions_table,
    optimizer_probes_table,
    optimizer_searches_table,
)
from telemetry.store.sql import write_transaction


class ControlHistory:
    """Control decisions and optimiser searches in the store (each call in its own transaction).

    ``JobStore`` is one too; build this alone where only the history is needed.
    """

    def __init__(self, store: Store) -> None:
        """Work in ``store``'s database (at the latest schema), through its engine."""
        self._store = store
        self._engine = store.engine

    # -- control decisions -----------------------------------------------------------------------

    def add_decision(
        self,
        job_id: int,
        *,
        at: datetime,
        source: str,
        what: str,
        why: str,
        power_before_w: float | None,
        steps_per_s_before: float | None,
    ) -> int:
        """Store a control decision; returns its id (for ``complete_decision``).

        Raises:
            StoreWriteError: Nothing was written.
        """
        try:
            with self._engine.begin() as conn:
                result = conn.execute(
                    control_decisions_table.insert().values(
                        job_id=job_id, at=at, source=source, what=what, why=why,
                        power_before_w=power_before_w, steps_per_s_before=steps_per_s_before,
                    )
                )
                key = result.inserted_primary_key
        except SQLAlchemyError as exc:
            raise write_error(f"storing a decision for job {job_id}", exc) from exc
        assert key is not None
        return int(key[0])

    def complete_decision(
        self, decision_id: int, *, power_after_w: float | None, steps_per_s_after: float | None
    ) -> None:
        """Record the power and throughput once a decision's change has settled."""
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    update(control_decisions_table)
                    .where(control_decisions_table.c.id == decision_id)
                    .values(power_after_w=power_after_w, steps_per_s_after=steps_per_s_after)
                )
        except SQLAlchemyError as exc:
            raise write_error(f"completing decision {decision_id}", exc) from exc

    def save_search(self, search: SearchRecord) -> None:
        """Store an optimiser search, replacing what was stored for the same job and number.

        Raises:
            StoreWriteError: Nothing was written (the previous version stays).
        """
        s = optimizer_searches_table.c
        values = {
            "at": search.at, "objective": search.objective, "knob": Knob(search.knob).value,
            "setting": search.setting, "top_setting": search.top_setting,
            "feasible": search.feasible, "reason": search.reason, "revisions": search.revisions,
            "profiling_steps": search.profiling_steps,
            "profiling_time_s": search.profiling_time_s,
            "profiling_energy_j": search.profiling_energy_j,
            "micro_batch": search.micro_batch, "default_micro_batch": search.default_micro_batch,
        }
        try:
            # It reads, then writes: the write lock is taken up front (a read lock upgraded while
            # another connection writes would fail at once rather than wait).
            with write_transaction(self._engine) as conn:
                search_id = conn.execute(
                    select(s.id).where(s.job_id == search.job_id, s.number == search.number)
                ).scalar()
                if search_id is None:
                    result = conn.execute(optimizer_searches_table.insert().values(
                        job_id=search.job_id, number=search.number, **values))
                    key = result.inserted_primary_key
                    assert key is not None
                    search_id = int(key[0])
                else:
                    conn.execute(update(optimizer_searches_table)
                                 .where(s.id == search_id).values(**values))
                    conn.execute(delete(optimizer_probes_table)
                                 .where(optimizer_probes_table.c.search_id == search_id))
                if search.probes:
                    conn.execute(optimizer_probes_table.insert(), [
                        {"search_id": search_id, "setting": p.setting, "steps": p.steps,
                         "time_s": p.time_s, "energy_j": p.energy_j,
                         "micro_batch": p.micro_batch}
                        for p in search.probes
                    ])
        except SQLAlchemyError as exc:
            raise write_error(f"storing optimiser search {search.number} of job "
                             f"{search.job_id}", exc) from exc

    def searches(self, job_ids: Iterable[int]) -> dict[int, builtins.list[SearchRecord]]:
        """The optimiser searches of these jobs, by job id, oldest first."""
        ids = sorted(set(job_ids))
        if not ids:
            return {}
        s, p = optimizer_searches_table.c, optimizer_probes_table.c
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(optimizer_searches_table).where(s.job_id.in_(ids))
                .order_by(s.job_id, s.number)
            ).mappings().all()
            probes: dict[int, builtins.list[ProbeRecord]] = {}
            if rows:
                for r in conn.execute(
                    select(p.search_id, p.setting, p.steps, p.time_s, p.energy_j,
                           p.micro_batch)
                    .where(p.search_id.in_([row["id"] for row in rows]))
                    .order_by(p.search_id, p.setting.desc(), p.micro_batch.desc())
                ):
                    probes.setdefault(r.search_id, []).append(ProbeRecord(
                        r.setting, r.steps, r.time_s, r.energy_j, r.micro_batch))
        out: dict[int, builtins.list[SearchRecord]] = {}
        for row in rows:
            out.setdefault(row["job_id"], []).append(SearchRecord(
                job_id=row["job_id"], number=row["number"], at=row["at"],
                objective=row["objective"], knob=Knob(row["knob"]), setting=row["setting"],
                top_setting=row["top_setting"], feasible=row["feasible"], reason=row["reason"],
                revisions=row["revisions"], profiling_steps=row["profiling_steps"],
                profiling_time_s=row["profiling_time_s"],
                profiling_energy_j=row["profiling_energy_j"],
                probes=tuple(probes.get(row["id"], ())),
                micro_batch=row["micro_batch"], default_micro_batch=row["default_micro_batch"],
            ))
        return out

    def decisions(self, job_id: int) -> builtins.list[DecisionRecord]:
        """A job's control decisions, oldest first."""
        c = control_decisions_table.c
        query = select(control_decisions_table).where(c.job_id == job_id).order_by(c.at, c.id)
        with self._engine.connect() as conn:
            return [DecisionRecord(*row) for row in conn.execute(query)]
