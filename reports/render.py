"""A report as a Rich table, JSON (a list of row objects) or CSV, with shared number formats."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from energy.units import g_to_kg, j_to_kj, j_to_kwh, j_to_wh
from reports.optimizer import OptimizerSummary, summary_lines
from reports.queries import Report, ReportRow
from reports.ranks import RANK_FIELDS

CSV_FIELDS = (
    "key", "label", "energy_j", "energy_kwh", "idle_j", "shared_j", "mean_power_w",
    "peak_power_w", "tokens", "samples", "steps", "j_per_token", "j_per_sample",
    "tokens_per_wh", "cost", "co2_g", "method", "start", "end",
)


def fmt_energy(joules: float) -> str:
    """Joules in the unit that reads best: J, kJ, MJ below 1 kWh, else kWh."""
    if joules < 1e3:
        return f"{joules:,.0f} J"
    if joules < 1e6:
        return f"{j_to_kj(joules):,.1f} kJ"
    if joules < 3.6e6:
        return f"{joules / 1e6:,.2f} MJ"
    return f"{j_to_kwh(joules):,.2f} kWh"


def fmt_num(value: float | int | None, digits: int = 0, unit: str = "") -> str:
    """A number with thousands separators, or ``-`` for missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip()


def fmt_small(value: float | None, unit: str = "") -> str:
    """A possibly small ratio (J/token) with three significant figures."""
    if value is None:
        return "-"
    return f"{value:.3g} {unit}".rstrip()


def fmt_share(value: float | None) -> str:
    """A fraction as a percentage."""
    return "-" if value is None else f"{100 * value:.1f} %"


def rows_json(report: Report) -> list[dict[str, Any]]:
    """The report's rows as JSON-ready dicts (``key``, ``energy_j``, ``mean_power_w``, ...)."""
    return [row.to_json() for row in report.rows]


def to_json(report: Report) -> str:
    """The rows as a JSON list, one row object per line (the ``--json`` output).

    One line per row reads well with ``grep`` and ``jq -c``, and keeps the output's cost to
    the C encoder's (an indented dump goes through the pure-Python one, several times slower).
    """
    rows = rows_json(report)
    if not rows:
        return "[]\n"
    encode = json.JSONEncoder(ensure_ascii=True, allow_nan=True).encode
    return "[\n" + ",\n".join(encode(row) for row in rows) + "\n]\n"


def _flat(data: dict[str, Any]) -> dict[str, Any]:
    """A row's fields with an object's flattened into ``name_field`` columns (``ranks`` into
    ``ranks_members``, ``ranks_spread``, ...) and lists joined by spaces."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            out.update(_flat({f"{name}_{k}": v for k, v in value.items()}))
        elif isinstance(value, list):
            out[name] = " ".join(str(v) for v in value)
        else:
            out[name] = value
    return out


def to_csv(report: Report) -> str:
    """The rows as CSV with a header (the ``--csv`` output); extra per-kind fields appended,
    a distributed run's ``ranks`` as ``ranks_...`` columns (not the energy optimiser's
    searches, which are nested: see ``--json``)."""
    extras: list[str] = []
    flat = []
    for row in report.rows:
        data = row.to_json()
        data.pop("optimizer", None)
        if "ranks" in data and data["ranks"] is None:  # the same columns for every job row
            data["ranks"] = dict.fromkeys(RANK_FIELDS)
        data = _flat(data)
        flat.append(data)
        extras.extend(name for name in data if name not in extras and name not in CSV_FIELDS)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_FIELDS, *extras], lineterminator="\n")
    writer.writeheader()
    for data in flat:
        writer.writerow({k: "" if data.get(k) is None else data.get(k) for k in writer.fieldnames})
    return buffer.getvalue()


def _title(report: Report) -> str:
    r = report.request
    what = {"job": "job", "gpu": "GPU", "user": "user", "day": "day (UTC)", "hour": "hour (UTC)"}
    s = report.summary
    span = f"{s.since:%Y-%m-%d %H:%M:%S} to {s.until:%Y-%m-%d %H:%M:%S} UTC"
    filters = []
    if r.job_id is not None:
        filters.append(f"job {r.job_id}")
    if r.user is not None:
        filters.append(f"user {r.user}")
    if r.node is not None:
        filters.append(f"node {r.node}")
    if r.gpu_index is not None:
        filters.append(f"GPU {r.gpu_index}")
    suffix = f" ({', '.join(filters)})" if filters else ""
    return f"Energy by {what[r.by]}, {span}{suffix}"


def headline(report: Report) -> list[tuple[str, str]]:
    """The summary figures, as (label, formatted value) pairs, in display order."""
    s = report.summary
    out = [
        ("Total energy", f"{fmt_energy(s.energy_j)} ({j_to_wh(s.energy_j):,.1f} Wh)"),
        ("Jobs", f"{fmt_energy(s.job_energy_j)} in {s.n_jobs} job(s) on {s.n_gpus} GPU(s)"),
        ("Idle", f"{fmt_energy(s.idle_energy_j)} ({fmt_share(s.idle_share)} of the total)"),
    ]
    if s.cost is not None:
        out.append(("Cost", f"{s.cost:,.2f} ({s.price})"))
    if s.co2_g is not None:
        out.append(("CO2", f"{g_to_kg(s.co2_g):,.2f} kg ({s.co2})"))
    if s.tokens:
        out.append(("Tokens", f"{s.tokens:,} ({fmt_small(s.j_per_token, 'J/token')})"))
    out.append(("Energy from", f"{s.source} ({s.method})"))
    if s.counter_resets or s.gaps:
        out.append(("Data", f"{s.counter_resets} counter reset(s), {s.gaps} sampling gap(s) "
                    "bridged by trapezoid integration"))
    return out


def table(report: Report) -> Group:
    """The report as a Rich table with the summary above and the rules below."""
    by = report.request.by
    t = Table(title=_title(report), box=box.SIMPLE_HEAD, title_justify="left")
    first = {"job": "Job", "gpu": "GPU", "user": "User", "day": "Day", "hour": "Hour"}[by]
    t.add_column(first, overflow="fold")
    if by in ("job", "gpu"):
        t.add_column("Name" if by == "job" else "Model", overflow="fold", min_width=8)
    if by == "job":
        t.add_column("User", overflow="fold")
    t.add_column("Energy", justify="right", no_wrap=True)
    if by in ("gpu", "day", "hour"):
        t.add_column("Idle", justify="right", no_wrap=True)
    t.add_column("Mean", justify="right", no_wrap=True)
    t.add_column("Peak", justify="right", no_wrap=True)
    t.add_column("Tokens", justify="right", no_wrap=True)
    t.add_column("J/token", justify="right", no_wrap=True)
    t.add_column("tokens/Wh", justify="right", no_wrap=True)
    has_cost = report.summary.cost is not None
    has_co2 = report.summary.co2_g is not None
    if has_cost:
        t.add_column("Cost", justify="right", no_wrap=True)
    if has_co2:
        t.add_column("CO2", justify="right", no_wrap=True)
    t.add_column("Method", no_wrap=True)
    for row in report.rows:
        t.add_row(*_cells(row, by, has_cost, has_co2))
    lines = [Text(f"{label}: {value}") for label, value in headline(report)]
    optimised = [Text(line) for line in summary_lines(optimizer_summaries(report))]
    optimised += [Text(line) for line in rank_lines(report)]
    rules = [
        Text(f"Attribution: {report.summary.attribution_rule}", style="dim"),
        Text(f"Source: {report.summary.source_rule}", style="dim"),
        Text("Peak: highest single-GPU reading. Mean: energy over the job's span (the range for "
             "users, GPUs and idle; the period for days and hours).", style="dim"),
    ]
    return Group(*lines, t, *optimised, *rules)


def rank_lines(report: Report) -> list[str]:
    """One line per distributed run in the report: its ranks and straggler view, by job id."""
    return [report.ranks[job_id].sentence() for job_id in sorted(report.ranks)]


def optimizer_summaries(report: Report) -> list[OptimizerSummary]:
    """The energy optimiser's searches of the report's jobs, by job id."""
    return [s for job_id in sorted(report.optimizer) for s in report.optimizer[job_id]]


def _cells(row: ReportRow, by: str, has_cost: bool, has_co2: bool) -> list[str | Text]:
    # Text objects, so that names like "[bold]" are shown as typed, not as Rich markup
    cells: list[str | Text] = [Text(row.key)]
    if by in ("job", "gpu"):
        cells.append(Text(row.label if row.key != "idle" else "(no job)"))
    if by == "job":
        cells.append(Text(str(row.extra.get("user", ""))))
    cells.append(fmt_energy(row.energy_j))
    if by in ("gpu", "day", "hour"):
        cells.append(fmt_energy(row.idle_j))
    cells.append(fmt_num(row.mean_power_w, 0, "W"))
    cells.append(fmt_num(row.peak_power_w, 0, "W"))
    cells.append(fmt_num(row.tokens))
    cells.append(fmt_small(row.j_per_token))
    cells.append(fmt_num(row.tokens_per_wh, 0))
    if has_cost:
        cells.append(fmt_num(row.cost, 2))
    if has_co2:
        cells.append(fmt_num(row.co2_g, 0, "g"))
    cells.append(row.method)
    return cells
