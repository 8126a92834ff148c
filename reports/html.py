"""One self-contained HTML report: summary first, then tables, then the charts as inline PNGs.

Every value that comes from users or the store (job names, commands, user names, GPU names) goes
through ``html.escape``; the page loads nothing (no external URL, a Content-Security-Policy that
allows only inline styles and ``data:`` images).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import UTC, datetime
from html import escape

from energy.units import g_to_kg, j_to_wh
from reports.optimizer import summary_lines
from reports.queries import IDLE_KEY, Report, ReportRow
from reports.ranks import RunRanks
from reports.render import (
    fmt_energy,
    fmt_num,
    fmt_share,
    fmt_small,
    headline,
    optimizer_summaries,
)

CHART_TITLES = {
    "power": "Power per GPU",
    "energy": "Energy by group",
    "throughput": "Throughput against power",
    "j_per_token": "J/token over each job's life",
}

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1180px; color: #1d1d1f; padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; }
h3 { font-size: 15px; margin: 20px 0 4px; }
.sub { color: #666; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 10px 16px; min-width: 150px; }
.card .v { font-size: 22px; font-weight: 600; } .card .l { color: #666; font-size: 12px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid #e5e5e5; padding: 4px 8px; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.idle td { color: #777; font-style: italic; }
code { font-size: 12px; word-break: break-all; }
.rules { color: #555; font-size: 12px; }
img { max-width: 100%; border: 1px solid #eee; margin: 8px 0; }
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _cards(report: Report) -> str:
    s = report.summary
    cards = [
        ("Total energy", f"{fmt_energy(s.energy_j)}", f"{j_to_wh(s.energy_j):,.1f} Wh"),
        ("Cost", "-" if s.cost is None else f"{s.cost:,.2f}", s.price or "no price given"),
        ("CO2", "-" if s.co2_g is None else f"{g_to_kg(s.co2_g):,.2f} kg",
         s.co2 or "no carbon intensity given"),
        ("Idle share", fmt_share(s.idle_share), f"{fmt_energy(s.idle_energy_j)} idle"),
        ("J/token", fmt_small(s.j_per_token), f"{fmt_num(s.tokens)} tokens"),
    ]
    return "".join(
        f'<div class="card"><div class="l">{_e(label)}</div><div class="v">{_e(value)}</div>'
        f'<div class="l">{_e(note)}</div></div>'
        for label, value, note in cards
    )


def _group_table(report: Report) -> str:
    by = report.request.by
    head = ["Group", "Name", "Energy", "Idle", "Mean power", "Peak power", "Tokens", "J/token",
            "tokens/Wh", "Cost", "CO2", "Method"]
    numeric = {"Energy", "Idle", "Mean power", "Peak power", "Tokens", "J/token", "tokens/Wh",
               "Cost", "CO2"}
    out = ["<table><thead><tr>"]
    out += [f'<th class="{"n" if h in numeric else ""}">{_e(h)}</th>' for h in head]
    out.append("</tr></thead><tbody>")
    for row in report.rows:
        key = row.key if by != "job" or row.key == IDLE_KEY else f"job {row.key}"
        cells = [
            (key, False),
            ("(no job)" if row.key == IDLE_KEY else row.label, False),
            (fmt_energy(row.energy_j), True),
            (fmt_energy(row.idle_j), True),
            (fmt_num(row.mean_power_w, 0, "W"), True),
            (fmt_num(row.peak_power_w, 0, "W"), True),
            (fmt_num(row.tokens), True),
            (fmt_small(row.j_per_token), True),
            (fmt_num(row.tokens_per_wh, 0), True),
            (fmt_num(row.cost, 2), True),
            (fmt_num(row.co2_g, 0, "g"), True),
            (row.method, False),
        ]
        cls = ' class="idle"' if row.key == IDLE_KEY else ""
        out.append(f"<tr{cls}>" + "".join(
            f'<td class="{"n" if n else ""}">{_e(v)}</td>' for v, n in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _job_rows(report: Report) -> list[ReportRow]:
    return [r for r in report.rows if "job_id" in r.extra]


def _jobs_table(report: Report) -> str:
    """Every job in the report with who ran what, where, under which budget."""
    by_id = {int(r.extra["job_id"]): r for r in _job_rows(report)}
    out = ["<table><thead><tr><th>Job</th><th>Name</th><th>User</th><th>State</th>"
           "<th>Command</th><th>GPUs</th><th>Start</th><th>End</th>"
           '<th class="n">Budget</th><th class="n">Energy</th><th class="n">J/token</th>'
           "</tr></thead><tbody>"]
    for job_id, job in sorted(report.jobs.items()):
        row = by_id.get(job_id)
        budget = []
        if job.watts_per_gpu is not None:
            budget.append(f"{job.watts_per_gpu:g} W/GPU")
        if job.energy_budget_wh is not None:
            budget.append(f"{job.energy_budget_wh:g} Wh")
        cells = [
            (str(job_id), False, False),
            (job.name, False, False),
            (job.user, False, False),
            (str(job.state), False, False),
            (" ".join(job.argv), False, True),
            (", ".join(str(g) for g in job.gpus), False, False),
            (_time(job.started_at) if job.started_at else "-", False, False),
            (_time(job.ended_at) if job.ended_at else "running", False, False),
            (", ".join(budget) or "-", True, False),
            (fmt_energy(row.energy_j) if row else "-", True, False),
            (fmt_small(row.j_per_token) if row else "-", True, False),
        ]
        out.append("<tr>" + "".join(
            f'<td class="{"n" if n else ""}">' + (f"<code>{_e(v)}</code>" if code else _e(v))
            + "</td>" for v, n, code in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _ranks_table(ranks: RunRanks) -> str:
    """A distributed run's ranks: node, own steps, step rate (an ended rank's last known) and
    state, the slowest marked."""
    slowest = None if ranks.view is None else ranks.view.slowest_rank
    out = ["<table><thead><tr><th>Rank</th><th>Node</th><th>GPUs</th>"
           '<th class="n">Steps</th><th class="n">Steps/s</th><th>State</th>'
           "</tr></thead><tbody>"]
    for m in ranks.members:
        cells = [
            (f"{m.rank} (slowest)" if m.rank == slowest else str(m.rank), False),
            (m.host, False),
            (", ".join(str(g) for g in m.gpus) or "-", False),
            (fmt_num(m.steps), True),
            (fmt_num(m.steps_per_s, 2), True),
            (m.state, False),
        ]
        out.append("<tr>" + "".join(
            f'<td class="{"n" if n else ""}">{_e(v)}</td>' for v, n in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _ranks_section(report: Report) -> str:
    if not report.ranks:
        return ""
    out = ["<h2>Ranks of distributed runs</h2>"]
    for job_id in sorted(report.ranks):
        ranks = report.ranks[job_id]
        job = report.jobs.get(job_id)
        name = f"Job {job_id}" + (f" ({job.name})" if job else "")
        out.append(f"<h3>{_e(name)}</h3><p>{_e(ranks.sentence())}</p>{_ranks_table(ranks)}")
    return "".join(out)


def render_html(report: Report, charts: Mapping[str, bytes], *, title: str = "") -> str:
    """The whole report as one HTML document.

    Args:
        report: The computed report.
        charts: Chart name (``power``, ``energy``, ``throughput``, ``j_per_token``) to PNG
            bytes; embedded as ``data:`` URIs in that order.
        title: Page title (escaped); a default names the range.
    """
    s = report.summary
    page_title = title or f"powertrain energy report, {_time(s.since)} to {_time(s.until)} UTC"
    figures = []
    for name, caption in CHART_TITLES.items():
        png = charts.get(name)
        if png is None:
            continue
        data = base64.b64encode(png).decode("ascii")
        figures.append(f"<h2>{_e(caption)}</h2>"
                       f'<img alt="{_e(caption)}" src="data:image/png;base64,{data}">')
    facts = "".join(f"<li>{_e(label)}: {_e(value)}</li>" for label, value in headline(report))
    by_label = {"job": "job", "gpu": "GPU", "user": "user", "day": "day (UTC)",
                "hour": "hour (UTC)"}[report.request.by]
    jobs_section = ""
    if report.jobs:
        jobs_section = f"<h2>Jobs</h2>{_jobs_table(report)}"
    optimised = summary_lines(optimizer_summaries(report))
    if optimised:
        jobs_section += "<h2>Energy optimiser</h2>" + "".join(
            f"<p>{_e(line.strip())}</p>" for line in optimised)
    jobs_section += _ranks_section(report)
    on_node = "" if report.request.node is None else f" of node {report.request.node}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<meta name=\"viewport\" content=\"width=device-width\"><title>{_e(page_title)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{_e(page_title)}</h1>"
        f"<p class=\"sub\">{s.n_jobs} job(s) on {s.n_gpus} GPU(s){_e(on_node)}; generated "
        f"{_e(_time(datetime.now(UTC)))} UTC by powertrain</p>"
        f'<div class="cards">{_cards(report)}</div>'
        f"<ul>{facts}</ul>"
        f"<h2>Energy by {_e(by_label)}</h2>{_group_table(report)}"
        f"{jobs_section}"
        f"{''.join(figures)}"
        '<h2>How the figures were found</h2><div class="rules">'
        f"<p>Attribution: {_e(s.attribution_rule)}</p>"
        f"<p>Source: {_e(s.source_rule)}</p>"
        "<p>Mean power is energy over the job's span (the range for GPUs, users and idle; the "
        "period for days and hours). Peak power is the highest single-GPU reading. Idle energy "
        "is what GPUs drew while no job ran on them.</p></div>"
        "</body></html>\n"
    )
