"""The report's charts, drawn with matplotlib's Agg canvas (no pyplot, no global state).

Each chart has a pure function that computes its numbers (tested) and one that draws them:
power over time per GPU with job spans and budgets, energy by group, throughput against power per
job, and J/token over each job's life.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from reports.queries import IDLE_KEY, GpuTimeline, JobLife, Report

MAX_BARS = 25
_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3",
           "#8C8C8C", "#CCB974", "#64B5CD")
_IDLE_COLOR = "#B0B0B0"


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar of the energy chart: a group, its energy and the unit's scale.

    Attributes:
        label: The group as shown (``job 3: name``, ``alice``, ``2026-01-01``, ``idle``).
        energy_j: The group's energy, J.
        idle: Whether the bar is idle energy.
    """

    label: str
    energy_j: float
    idle: bool


def energy_bars(report: Report, *, limit: int = MAX_BARS) -> list[Bar]:
    """The bars of the energy chart: the report's groups, biggest first for jobs and users
    (beyond ``limit``, the rest add up to one ``others`` bar), in time order for periods; idle
    energy last, as its own bar."""
    by = report.request.by
    rows = [r for r in report.rows if r.key != IDLE_KEY]
    idle = [r for r in report.rows if r.key == IDLE_KEY]
    if by in ("job", "user"):
        rows.sort(key=lambda r: -r.energy_j)

    def label(key: str, name: str) -> str:
        if by == "job":
            return f"job {key}: {name}"
        if by == "gpu":
            return f"GPU {key}"
        return key

    bars = [Bar(label(r.key, r.label), r.energy_j, False) for r in rows[:limit]]
    rest = rows[limit:]
    if rest:
        bars.append(Bar(f"{len(rest)} others", sum(r.energy_j for r in rest), False))
    bars.extend(Bar("idle", r.energy_j, True) for r in idle)
    return bars


def energy_unit(max_j: float) -> tuple[str, float]:
    """The unit for an energy axis whose largest value is ``max_j``: (name, joules per unit)."""
    if max_j >= 3.6e6:
        return "kWh", 3.6e6
    if max_j >= 3.6e3:
        return "Wh", 3.6e3
    return "J", 1.0


def _dates(times_s: list[float]) -> list[datetime]:
    return [datetime.fromtimestamp(t, tz=UTC) for t in times_s]


def _date_axis(ax: Axes) -> None:
    locator = AutoDateLocator()  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]


def power_figure(timelines: list[GpuTimeline]) -> Figure:
    """Power over time, one panel per GPU; each job's span shaded, its budget a dashed line."""
    n = max(1, len(timelines))
    fig = Figure(figsize=(11, 1.2 + 1.9 * n), dpi=100, layout="constrained")
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    fig.suptitle("Power per GPU (jobs shaded, budgets dashed)", fontsize=13)
    colors: dict[int, str] = {}
    for ax, tl in zip(axes, timelines, strict=False):
        ax.plot(_dates(tl.times_s), tl.mean_w, color="#222222", linewidth=1.0)
        for job_id, name, start_s, end_s, budget_w in tl.jobs:
            color = colors.setdefault(job_id, _COLORS[len(colors) % len(_COLORS)])
            t0, t1 = _dates([start_s, end_s])
            ax.axvspan(t0, t1, color=color, alpha=0.18, linewidth=0)
            ax.text(t0, 1.0, f" job {job_id}: {name}"[:40], transform=ax.get_xaxis_transform(),
                    va="top", ha="left", fontsize=8, color=color, clip_on=True)
            if budget_w is not None:
                ax.hlines(budget_w, t0, t1, colors=color, linestyles="dashed", linewidth=1.4)
        ax.set_ylabel(f"GPU {tl.gpu_key}\npower (W)", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        _date_axis(ax)
    axes[-1].set_xlabel("time (UTC)")
    return fig


def energy_figure(bars: list[Bar], by: str) -> Figure:
    """Horizontal bars of energy per group, idle in grey."""
    what = {"job": "job", "gpu": "GPU", "user": "user", "day": "day", "hour": "hour"}[by]
    fig = Figure(figsize=(11, 1.5 + 0.32 * max(1, len(bars))), dpi=100, layout="constrained")
    ax = fig.subplots()
    unit, scale = energy_unit(max((b.energy_j for b in bars), default=0.0))
    labels = [b.label[:60] for b in bars][::-1]
    values = [b.energy_j / scale for b in bars][::-1]
    colors = [_IDLE_COLOR if b.idle else _COLORS[0] for b in bars][::-1]
    ax.barh(range(len(bars)), values, color=colors)
    ax.set_yticks(range(len(bars)), labels, fontsize=9)
    ax.set_xlabel(f"energy ({unit})")
    ax.set_title(f"Energy by {what}", fontsize=13)
    ax.grid(axis="x", alpha=0.3)
    return fig


def throughput_figure(lives: list[JobLife]) -> Figure:
    """Throughput against power per job: one point per window between progress reports."""
    fig = Figure(figsize=(11, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for i, life in enumerate(lives):
        ax.scatter(life.power_w, life.tokens_per_s, s=18, color=_COLORS[i % len(_COLORS)],
                   label=f"job {life.job_id}: {life.name}"[:50], alpha=0.8)
    ax.set_xlabel("power of the job's GPUs (W)")
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_title("Throughput against power (each point a window between progress reports)",
                 fontsize=13)
    ax.grid(alpha=0.3)
    if lives:
        ax.legend(fontsize=8, loc="best")
    return fig


def j_per_token_figure(lives: list[JobLife]) -> Figure:
    """J/token over each job's life: per window (points) and since the start (line)."""
    fig = Figure(figsize=(11, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for i, life in enumerate(lives):
        color = _COLORS[i % len(_COLORS)]
        t0 = life.times_s[0] if life.times_s else 0.0
        minutes = [(t - t0) / 60 for t in life.times_s]
        window = [(m, v) for m, v in zip(minutes, life.j_per_token, strict=True) if v is not None]
        cum = [(m, v) for m, v in zip(minutes, life.cum_j_per_token, strict=True) if v is not None]
        if window:
            ax.scatter([m for m, _ in window], [v for _, v in window], s=10, color=color,
                       alpha=0.5)
        if cum:
            ax.plot([m for m, _ in cum], [v for _, v in cum], color=color, linewidth=1.6,
                    label=f"job {life.job_id}: {life.name}"[:50])
    ax.set_xlabel("minutes since the job's first progress report in the range")
    ax.set_ylabel("energy per token (J/token)")
    ax.set_title("J/token over each job's life (line: since the start; points: per window)",
                 fontsize=13)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if lives:
        ax.legend(fontsize=8, loc="best")
    return fig


def png_bytes(fig: Figure) -> bytes:
    """Render a figure to PNG with the Agg canvas, then clear it (frees its artists)."""
    FigureCanvasAgg(fig)  # attaches itself to the figure
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    fig.clear()
    return buffer.getvalue()
