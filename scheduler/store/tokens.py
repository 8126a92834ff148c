"""Tokens for the daemon's API over TCP, in the store: every daemon sharing the store accepts them.

A token is ``ptk_`` and 43 characters of 256 random bits, shown once when it is made; the store
keeps its SHA-256 digest, never the token. A fast hash is enough for a secret of that entropy (a
slow password hash guards guessable secrets), and it lets a request be checked with one indexed
lookup. A token acts as its user within its scope:

- ``read``: the API's reads (jobs, GPUs, logs, health);
- ``submit``: also everything a user does to jobs through the socket: submit, attach, report
  progress, change budgets, pause, resume, cancel, checkpoint, on the user's own jobs;
- ``admin``: what root or the admin group may do, on any job and the node's settings.

A revoked token is refused from the next request on; its row stays, so ``token list`` shows it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, Row, select, update
from sqlalchemy.exc import SQLAlchemyError

from telemetry.store.errors import write_error
from telemetry.store.models import api_tokens_table
from telemetry.store.sql import inserted_id, write_transaction

TOKEN_PREFIX = "ptk_"
_t = api_tokens_table.c


class Scope(StrEnum):
    """What a token may do, each including the ones before it."""

    READ = "read"
    SUBMIT = "submit"
    ADMIN = "admin"

    def allows(self, needed: Scope) -> bool:
        order = list(Scope)
        return order.index(self) >= order.index(needed)


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A stored token (never the token itself).

    Attributes:
        id: Its number, for ``token revoke``.
        user: The login name it acts as.
        scope: What it may do.
        prefix: Its first characters, to tell tokens apart in ``token list``.
        note: What it is for, as its maker said.
        created_by / created_at: Who made it and when (aware UTC).
        revoked_at: When it was revoked; ``None`` while it is valid.
    """

    id: int
    user: str
    scope: Scope
    prefix: str
    note: str | None
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


def digest(token: str) -> str:
    """The SHA-256 digest, in hex, under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def _record(row: Row[Any]) -> TokenRecord:
    m = row._mapping
    return TokenRecord(
        id=m["id"], user=m["user"], scope=Scope(m["scope"]), prefix=m["prefix"], note=m["note"],
        created_by=m["created_by"], created_at=m["created_at"], revoked_at=m["revoked_at"],
    )


class TokenStore:
    """The API tokens of one store.

    Args:
        engine: The store's engine (at the latest schema).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create(
        self, user: str, scope: Scope, *, created_by: str, at: datetime, note: str | None = None
    ) -> tuple[TokenRecord, str]:
        """Make a token for ``user``; returns its record and the token, which is not kept.

        Raises:
            StoreWriteError: Nothing was written.
        """
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        values = {
            "user": user, "scope": scope.value, "digest": digest(token),
            "prefix": token[: len(TOKEN_PREFIX) + 6], "note": note, "created_by": created_by,
            "created_at": at, "revoked_at": None,
        }
        try:
            with write_transaction(self._engine) as conn:
                token_id = inserted_id(conn.execute(api_tokens_table.insert().values(**values)))
        except SQLAlchemyError as exc:
            raise write_error("creating a token", exc) from exc
        return _record_of(token_id, values), token

    def list(self, *, include_revoked: bool = False) -> list[TokenRecord]:
        """The tokens, oldest first; revoked ones only with ``include_revoked``."""
        query = select(api_tokens_table).order_by(_t.id)
        if not include_revoked:
            query = query.where(_t.revoked_at.is_(None))
        with self._engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def revoke(self, token_id: int, *, at: datetime) -> tuple[TokenRecord, bool] | None:
        """Revoke a token; returns its record and whether this call revoked it (``False``: it
        already was), or ``None`` when there is no such token.

        Raises:
            StoreWriteError: Nothing was written.
        """
        try:
            with write_transaction(self._engine) as conn:
                result = conn.execute(
                    update(api_tokens_table)
                    .where(_t.id == token_id, _t.revoked_at.is_(None))
                    .values(revoked_at=at)
                )
                row = conn.execute(select(api_tokens_table).where(_t.id == token_id)).first()
        except SQLAlchemyError as exc:
            raise write_error(f"revoking token {token_id}", exc) from exc
        return None if row is None else (_record(row), result.rowcount == 1)

    def verify(self, token: str) -> TokenRecord | None:
        """The valid (not revoked) token ``token`` is, or ``None``."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        query = select(api_tokens_table).where(_t.digest == digest(token),
                                               _t.revoked_at.is_(None))
        with self._engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else _record(row)


def _record_of(token_id: int, values: dict[str, Any]) -> TokenRecord:
    return TokenRecord(
        id=token_id, user=values["user"], scope=Scope(values["scope"]), prefix=values["prefix"],
        note=values["note"], created_by=values["created_by"], created_at=values["created_at"],
        revoked_at=None,
    )
