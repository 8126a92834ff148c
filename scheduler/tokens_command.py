"""``powertrain token create|list|revoke``: the tokens of the daemon's API over TCP.

The commands work on the store directly, as ``report`` and ``nodes`` do: whoever may write the
store (the daemon's own user, root) manages its tokens, and every daemon on that store accepts
them at once. A token is printed once, when it is made; the store keeps only its digest
(``scheduler.store.tokens``). Every failure is one ``error: ...`` line and a non-zero exit.
"""

from __future__ import annotations

import json
import pwd
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from scheduler.store.tokens import Scope, TokenRecord, TokenStore
from scheduler.store_access import EXIT_ERROR, EXIT_USAGE, fail, opened_store, reason, who_am_i
from telemetry.store import StoreError

tokens = typer.Typer(
    help="Tokens for the daemon's API over TCP (`powertrain daemon --listen`): each acts as "
    "one user, within a scope: read, submit (also change the user's own jobs) or admin.",
    no_args_is_help=True,
)

DbOpt = Annotated[str | None, typer.Option(
    "--db", help="SQLAlchemy URL of the store (default: SQLite under --home). Env: POWERTRAIN_DB.")]
HomeOpt = Annotated[Path | None, typer.Option(
    "--home", help="Data folder (store). Env: POWERTRAIN_HOME.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def token_json(record: TokenRecord) -> dict[str, Any]:
    """A token as ``--json`` gives it (never the token itself; times ISO 8601 UTC)."""
    return {
        "id": record.id, "user": record.user, "scope": record.scope.value,
        "prefix": record.prefix, "note": record.note, "created_by": record.created_by,
        "created_at": record.created_at.isoformat(),
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
    }


@tokens.command()
def create(
    user: Annotated[str, typer.Option("--user", help="The account the token acts as; it must "
                                      "exist on the nodes whose daemons it talks to.")],
    scope: Annotated[Scope, typer.Option(
        "--scope", help="read: see jobs, GPUs and logs; submit: also submit, attach, report and "
        "change the user's own jobs; admin: what root or the admin group may do.")],
    note: Annotated[str | None, typer.Option("--note", help="What the token is for.")] = None,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    home: HomeOpt = None,
) -> None:
    """Make a token and print it once; only its digest is stored, so keep it now.

    Hand it to the user, who sets POWERTRAIN_TOKEN and runs the CLI with --url.
    """
    try:
        pwd.getpwnam(user)
    except KeyError:
        fail(f"--user: no account {user!r} on this machine (a token acts as a local account)",
             EXIT_USAGE)
    with opened_store(db, home) as opened:
        store = TokenStore(opened.engine)
        try:
            record, token = store.create(user, scope, created_by=who_am_i(), at=datetime.now(UTC),
                                         note=note)
        except (StoreError, SQLAlchemyError) as exc:
            fail(f"cannot store the token: {reason(exc)}", EXIT_ERROR)
    if as_json:
        typer.echo(json.dumps(token_json(record) | {"token": token}, indent=2))
        return
    err = Console(stderr=True)
    err.print(f"token {record.id} for {escape(user)}, scope {scope.value}; it is shown only "
              "now: keep it secret (POWERTRAIN_TOKEN)", highlight=False, soft_wrap=True)
    typer.echo(token)


@tokens.command("list")
def list_tokens(
    all_tokens: Annotated[bool, typer.Option("--all", help="Include revoked tokens.")] = False,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    home: HomeOpt = None,
) -> None:
    """List the tokens: number, first characters, user, scope, note, who made it and when."""
    with opened_store(db, home) as opened:
        store = TokenStore(opened.engine)
        try:
            found = store.list(include_revoked=all_tokens)
        except SQLAlchemyError as exc:
            fail(f"cannot read the tokens: {reason(exc)}", EXIT_ERROR)
    if as_json:
        typer.echo(json.dumps([token_json(r) for r in found], indent=2))
        return
    console = Console()
    if not found:
        console.print("no token" + ("" if all_tokens else " (--all shows revoked ones)"),
                      highlight=False)
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for header in ("ID", "Token", "User", "Scope", "Note", "Made by", "Made", "Revoked"):
        table.add_column(header, overflow="fold")
    for r in found:
        table.add_row(
            str(r.id), f"{r.prefix}…", escape(r.user), r.scope.value, escape(r.note or "-"),
            escape(r.created_by), f"{r.created_at:%Y-%m-%d %H:%M}",
            f"{r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "-",
        )
    console.print(table)


@tokens.command()
def revoke(
    token_id: Annotated[int, typer.Argument(help="The token's number (`powertrain token list`).")],
    db: DbOpt = None,
    home: HomeOpt = None,
) -> None:
    """Revoke a token: every daemon on the store refuses it from its next request on."""
    with opened_store(db, home) as opened:
        store = TokenStore(opened.engine)
        try:
            found = store.revoke(token_id, at=datetime.now(UTC))
        except (StoreError, SQLAlchemyError) as exc:
            fail(f"cannot revoke token {token_id}: {reason(exc)}", EXIT_ERROR)
    if found is None:
        fail(f"no token {token_id} (`powertrain token list --all` shows them)", EXIT_ERROR)
    record, now = found
    when = "" if now or record.revoked_at is None else (
        f" (already, at {record.revoked_at:%Y-%m-%d %H:%M})")
    Console().print(f"revoked token {record.id} of {escape(record.user)}, scope "
                    f"{record.scope.value}{when}", highlight=False)
