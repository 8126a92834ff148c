"""Writing a report to files: each one atomically (a temporary name renamed into place, so none
is ever left half written), the charts as PNG bytes, and the demo's HTML report."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from reports.html import render_html
from reports.queries import By, Report, ReportRequest, build_report, job_life, timeline
from telemetry.store import Store, open_store

__all__ = ["render_charts", "write_atomic", "write_demo_report", "write_files"]


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    Raises:
        OSError: Nothing is left behind (the temporary file is removed).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_files(files: Mapping[Path, bytes]) -> None:
    """Write several files atomically; if one fails, remove those this call created."""
    created: list[Path] = []
    try:
        for path, data in files.items():
            existed = path.exists()
            write_atomic(path, data)
            if not existed:
                created.append(path)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise


def render_charts(store: Store, report: Report) -> dict[str, bytes]:
    """Every chart of the report as PNG bytes, by name (``power``, ``energy``, ...)."""
    # matplotlib loads only when charts are drawn, not with every `powertrain` command.
    from reports.charts import (
        energy_bars,
        energy_figure,
        j_per_token_figure,
        png_bytes,
        power_figure,
        throughput_figure,
    )

    lives = job_life(store, report)
    charts = {
        "power": png_bytes(power_figure(timeline(store, report))),
        "energy": png_bytes(energy_figure(energy_bars(report), report.request.by)),
    }
    if lives:
        charts["throughput"] = png_bytes(throughput_figure(lives))
        charts["j_per_token"] = png_bytes(j_per_token_figure(lives))
    return charts


def write_demo_report(store_url: str, path: Path, *, by: By = "job") -> Path:
    """Write the HTML report of everything in a store (``make demo`` calls this at the end).

    Args:
        store_url: SQLAlchemy URL of the store.
        path: The HTML file to write (its directory must exist).
        by: Grouping of the report's main table.

    Returns:
        ``path``, resolved.

    Raises:
        StoreError / OSError: The store could not be read or the file written (no partial
            file is left).
    """
    store = open_store(store_url)
    try:
        result = build_report(store, ReportRequest(by=by))
        charts = render_charts(store, result)
    finally:
        store.close()
    write_atomic(path, render_html(result, charts).encode())
    return path.resolve()
