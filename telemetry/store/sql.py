"""SQL helpers the store modules share: transactions, keys, ranges, VALUES lists, compiled SQL.

Time ranges and raw microsecond columns for Core queries, numeric ``VALUES`` lists for the
batched lookups, and statements compiled once and run on the driver for the hot write path.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Connection, CursorResult, Engine, type_coerce

VALUES_CHUNK = 2000
"""Rows per ``VALUES`` list (well under the drivers' statement limits)."""


def write_transaction(engine: Engine) -> AbstractContextManager[Connection]:
    """A write transaction (on SQLite, one that takes the write lock at ``BEGIN``, so that a
    writer that reads first waits on the busy timeout instead of failing to upgrade its lock)."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(sqlite_immediate=True).begin()
    return engine.begin()


def inserted_id(result: CursorResult[Any]) -> int:
    """The primary key a single-row insert gave its row."""
    key = result.inserted_primary_key
    if key is None:
        raise RuntimeError("the insert returned no primary key")
    return int(key[0])


def time_range(column: Any, since: datetime | None, until: datetime | None) -> list[Any]:
    """Conditions ``since <= column < until`` for the bounds given."""
    where = []
    if since is not None:
        where.append(column >= since)
    if until is not None:
        where.append(column < until)
    return where


def raw_us(column: Any) -> ColumnElement[int]:
    """A timestamp column read as raw integer microseconds (skips datetime conversion)."""
    return type_coerce(column, BigInteger)


def values_sql(rows: Sequence[tuple[int | float, ...]]) -> str:
    """Numeric tuples as a SQL ``VALUES`` list (numbers only, formatted here: nothing to inject)."""
    return ", ".join([
        "(" + ", ".join([repr(float(v)) if isinstance(v, float) else str(int(v)) for v in row])
        + ")"
        for row in rows
    ])


class DriverStatement:
    """A Core statement compiled once for one dialect and run with plain DB-API parameters.

    The hot write path skips SQLAlchemy's per-row parameter processing: callers pass values
    already in their stored form (timestamps as epoch microseconds), as tuples in ``keys`` order.
    """

    def __init__(self, statement: Any, dialect: Any, keys: Sequence[str]) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        self.sql = str(compiled)
        self.keys = tuple(keys)
        self._positional = bool(compiled.positional)
        order = tuple(compiled.positiontup or ()) if self._positional else self.keys
        missing = set(order) - set(self.keys)
        if missing:
            raise RuntimeError(f"statement needs parameters {sorted(missing)} not in {self.keys}")
        # where the compiled order is ours (inserts), tuples pass straight through
        self._same_order = order == self.keys
        self._index = tuple(self.keys.index(name) for name in order)

    def executemany(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        if self._positional:
            if not self._same_order:
                rows = [tuple(row[i] for i in self._index) for row in rows]
            conn.exec_driver_sql(self.sql, rows)
        else:
            conn.exec_driver_sql(self.sql, [dict(zip(self.keys, row, strict=True)) for row in rows])

    def executemany_dicts(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        self.executemany(conn, [tuple(row[k] for k in self.keys) for row in rows])
