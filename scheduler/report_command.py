"""``powertrain report``: energy per job, GPU, user or period as a table, JSON, CSV, HTML, PNGs.

``report`` is a Typer command function (the CLI registers it with ``app.command("report")``).
Bad input (an unknown job, ``--since`` after ``--until``, an unparseable time, an unwritable
output) ends in one ``error: ...`` line on stderr and a non-zero exit, before anything is written;
files are written to a temporary name and renamed into place (``reports.files``), so none is ever
left half written.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from energy.cost import FlatRate, Rate, parse_series, parse_time_of_use
from energy.times import parse_when
from reports.files import render_charts, write_files
from reports.html import render_html
from reports.queries import (
    BY_CHOICES,
    By,
    ReportInputError,
    ReportRequest,
    UnknownJobError,
    build_report,
)
from reports.render import table, to_csv, to_json
from scheduler.store_access import EXIT_ERROR, EXIT_USAGE, fail, open_or_fail, store_url
from scheduler.store_access import UsageError as ReportUsageError


def _when(text: str, now: datetime) -> datetime:
    try:
        return parse_when(text, now)
    except ValueError as exc:
        raise ReportUsageError(str(exc)) from None


def _writable_file(path: Path, what: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ReportUsageError(f"cannot write {what} {path}: it is a directory")
    if not parent.is_dir():
        raise ReportUsageError(f"cannot write {what} {path}: no directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ReportUsageError(f"cannot write {what} {path}: {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ReportUsageError(f"cannot write {what} {path}: permission denied")


def _writable_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ReportUsageError(f"cannot write charts to {path}: not a directory")
    target = path if path.exists() else path.parent
    if not target.is_dir():
        raise ReportUsageError(f"cannot write charts to {path}: no directory {target}")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ReportUsageError(f"cannot write charts to {path}: {target} is not writable")


def _rate(
    value: float | None, path: Path | None, parse: Callable[[str], Rate], flat_opt: str,
    file_opt: str,
) -> Rate | None:
    if value is not None and path is not None:
        raise ReportUsageError(f"give {flat_opt} or {file_opt}, not both")
    if value is not None:
        try:
            return FlatRate(value)
        except ValueError as exc:
            raise ReportUsageError(f"{flat_opt}: {exc}") from None
    if path is not None:
        try:
            return parse(path.read_text())
        except OSError as exc:
            raise ReportUsageError(f"{file_opt} {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ReportUsageError(f"{file_opt} {path}: {exc}") from None
    return None


def report(
    job: Annotated[int | None, typer.Option("--job", help="Only this job (range: its span).")]
    = None,
    user: Annotated[str | None, typer.Option("--user", help="Only this user's jobs.")] = None,
    gpu: Annotated[int | None, typer.Option("--gpu", help="Only the GPU with this index.")]
    = None,
    node: Annotated[str | None, typer.Option(
        "--node", help="Only this node's GPUs (its daemon's --node name), when several daemons "
        "share the store. A run on several nodes counts its energy on this node's GPUs and the "
        "tokens its ranks here reported.")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", help="Start: ISO 8601 (naive = UTC) or relative (24h, 7d, 30m).")] = None,
    until: Annotated[str | None, typer.Option(
        "--until", help="End: ISO 8601 or relative (default: now).")] = None,
    by: Annotated[str, typer.Option("--by", help="Group by job, gpu, user, day or hour.")]
    = "job",
    db: Annotated[str | None, typer.Option(
        "--db", help="SQLAlchemy URL of the store. Env: POWERTRAIN_DB.")] = None,
    home: Annotated[Path | None, typer.Option(
        "--home", help="Data folder (store). Env: POWERTRAIN_HOME.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the rows as a JSON list (or write them to --output).")] = False,
    as_csv: Annotated[bool, typer.Option(
        "--csv", help="Print the rows as CSV (or write them to --output).")] = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the --json or --csv output to this file.")] = None,
    html: Annotated[Path | None, typer.Option(
        "--html", help="Write one self-contained HTML report (charts embedded).")] = None,
    png: Annotated[Path | None, typer.Option(
        "--png", help="Write the charts as PNG files into this directory.")] = None,
    price_kwh: Annotated[float | None, typer.Option(
        "--price-kwh", help="Electricity price per kWh (flat).")] = None,
    tou: Annotated[Path | None, typer.Option(
        "--tou", help="Time-of-use prices: CSV start (HH:MM UTC), price_per_kwh.")] = None,
    co2_g_per_kwh: Annotated[float | None, typer.Option(
        "--co2-g-per-kwh", help="Carbon intensity, gCO2/kWh (constant).")] = None,
    co2_csv: Annotated[Path | None, typer.Option(
        "--co2-csv", help="Carbon intensity over time: CSV time (ISO 8601), g_per_kwh.")] = None,
) -> None:
    """Where the energy went: per job, GPU, user, day or hour, with cost, CO2 and J/token.

    Short ranges (up to 6 h) read raw samples; longer ones read rollups. A shared GPU's energy is
    split evenly among its jobs; energy of GPUs without a job is reported as idle. A distributed
    run's ranks are shown with its slowest rank and how far the ranks' step rates spread.
    """
    now = datetime.now(UTC)
    try:
        if by not in BY_CHOICES:
            raise ReportUsageError(f"--by must be one of {', '.join(BY_CHOICES)} (got {by!r})")
        if as_json and as_csv:
            raise ReportUsageError("give --json or --csv, not both")
        if output is not None and not (as_json or as_csv):
            raise ReportUsageError("--output needs --json or --csv")
        since_t = _when(since, now) if since is not None else None
        until_t = _when(until, now) if until is not None else None
        if since_t is not None and until_t is not None and since_t >= until_t:
            raise ReportUsageError(
                f"--since ({since_t.isoformat()}) must be before --until ({until_t.isoformat()})"
            )
        price = _rate(price_kwh, tou, parse_time_of_use, "--price-kwh", "--tou")
        co2 = _rate(co2_g_per_kwh, co2_csv,
                    lambda text: parse_series(text, label="gCO2/kWh series"),
                    "--co2-g-per-kwh", "--co2-csv")
        if output is not None:
            _writable_file(output, "output")
        if html is not None:
            _writable_file(html, "HTML report")
        if png is not None:
            _writable_dir(png)
        url = store_url(db, home)
    except ReportUsageError as exc:
        fail(str(exc), EXIT_USAGE)

    by_value: By = by  # narrowed by the BY_CHOICES check above
    request = ReportRequest(since=since_t, until=until_t, by=by_value, job_id=job, user=user,
                            gpu_index=gpu, node=node, price=price, co2=co2, now=now)
    store = open_or_fail(url)
    try:
        try:
            result = build_report(store, request)
        except UnknownJobError as exc:
            fail(str(exc.args[0]), EXIT_ERROR)
        except ReportInputError as exc:
            fail(str(exc), EXIT_USAGE)
        charts = render_charts(store, result) if (html or png) else {}
    finally:
        store.close()

    files: dict[Path, bytes] = {}
    text_out: str | None = None
    if as_json or as_csv:
        text_out = to_json(result) if as_json else to_csv(result)
        if output is not None:
            files[output] = text_out.encode()
            text_out = None
    if html is not None:
        files[html] = render_html(result, charts).encode()
    if png is not None:
        for name, data in charts.items():
            files[png / f"{name}.png"] = data
    try:
        if png is not None:
            png.mkdir(exist_ok=True)
        write_files(files)
    except OSError as exc:
        fail(f"cannot write {getattr(exc, 'filename', None) or 'output'}: "
              f"{exc.strerror or exc}", EXIT_ERROR)

    console = Console()
    if text_out is not None:
        sys.stdout.write(text_out)
        sys.stdout.flush()
    elif not (as_json or as_csv):
        console.print(table(result))
    for path in files:
        Console(stderr=text_out is not None).print(f"wrote {path}", highlight=False)
