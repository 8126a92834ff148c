"""The numbers behind every chart (not the pixels), and that each chart renders with its title
and units."""

from __future__ import annotations

from pathlib import Path

import pytest

from reports.charts import (
    energy_bars,
    energy_figure,
    energy_unit,
    j_per_token_figure,
    png_bytes,
    power_figure,
    throughput_figure,
)
from reports.queries import Report, ReportRequest, build_report, job_life, timeline
from telemetry.store import Store, open_store
from tests.reports.conftest import Rig, RigJob, rel_err


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> tuple[Rig, RigJob, RigJob]:
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('charts') / 'store.db'}")
    r = Rig(store, gpus=2)
    r.run(30)
    a = r.start_job("a", (0,), watts=450.0, tokens_per_s=10_000.0)
    r.run(60)
    b = r.start_job("b", (1,), tokens_per_s=2_500.0)
    r.run(240)
    r.end_job(a)
    r.run(60)
    r.end_job(b)
    r.run(30)
    return r, a, b


def report_of(r: Rig, by: str = "job") -> Report:
    return build_report(r.store, ReportRequest(since=r.start, until=r.now(), now=r.now(),
                                               by=by))  # type: ignore[arg-type]


def test_energy_bars_are_the_rows_biggest_first_idle_last(
    rig: tuple[Rig, RigJob, RigJob],
) -> None:
    r, a, b = rig
    report = report_of(r)
    bars = energy_bars(report)
    rows = {row.key: row for row in report.rows}
    jobs = sorted((rows[str(j.id)] for j in (a, b)), key=lambda row: -row.energy_j)
    assert [bar.label for bar in bars] == [f"job {row.key}: {row.label}" for row in jobs] + [
        "idle"]
    assert [bar.energy_j for bar in bars] == [row.energy_j for row in jobs] + [
        rows["idle"].energy_j]
    assert [bar.idle for bar in bars] == [False, False, True]
    assert len(energy_bars(report, limit=1)) == 3  # one job, "1 others", idle
    assert energy_bars(report, limit=1)[1].energy_j == jobs[1].energy_j
    assert energy_unit(5e6) == ("kWh", 3.6e6) and energy_unit(5e4) == ("Wh", 3.6e3)


def test_power_timeline_integrates_to_each_gpus_energy(rig: tuple[Rig, RigJob, RigJob]) -> None:
    r, a, _ = rig
    report = report_of(r, "gpu")
    lines = timeline(r.store, report, max_points=100)
    assert [tl.gpu_key for tl in lines] == ["0", "1"]
    for tl, row in zip(lines, report.rows, strict=True):
        assert len(tl.times_s) <= 101
        width = tl.times_s[1] - tl.times_s[0]
        # bucket means of 1 Hz power readings times the bucket width: close to the counter
        assert rel_err(sum(w * width for w in tl.mean_w), row.energy_j) < 0.03
    [(job_id, name, start_s, end_s, budget)] = lines[0].jobs
    assert (job_id, name, budget) == (a.id, "a", 450.0)
    assert start_s == pytest.approx(a.started_s) and end_s == pytest.approx(a.ended_s)


def test_job_life_points_are_the_jobs_throughput_power_and_energy_per_token(
    rig: tuple[Rig, RigJob, RigJob],
) -> None:
    r, a, b = rig
    report = report_of(r)
    lives = {life.job_id: life for life in job_life(r.store, report)}
    assert set(lives) == {a.id, b.id}
    rows = {row.key: row for row in report.rows}
    for job in (a, b):
        life, row = lives[job.id], rows[str(job.id)]
        assert life.tokens_per_s == pytest.approx([job.tokens_per_s] * len(life.times_s),
                                                  rel=0.02)
        assert row.mean_power_w is not None
        assert all(rel_err(p, row.mean_power_w) < 0.05 for p in life.power_w)
        assert life.cum_j_per_token[-1] is not None and row.j_per_token is not None
        assert rel_err(life.cum_j_per_token[-1], row.j_per_token) < 0.02
        assert life.j_per_token[0] == pytest.approx(life.power_w[0] / life.tokens_per_s[0])


def test_every_chart_renders_with_a_title_and_units(
    rig: tuple[Rig, RigJob, RigJob], tmp_path: Path
) -> None:
    r, _, _ = rig
    report = report_of(r)
    store: Store = r.store
    lives = job_life(store, report)
    figures = {
        "power": power_figure(timeline(store, report)),
        "energy": energy_figure(energy_bars(report), "job"),
        "throughput": throughput_figure(lives),
        "j_per_token": j_per_token_figure(lives),
    }
    labels = {name: [ax.get_xlabel() + "|" + ax.get_ylabel() for ax in fig.axes]
              for name, fig in figures.items()}
    assert "(W)" in labels["power"][0] and "(UTC)" in labels["power"][-1]
    assert "(Wh)" in labels["energy"][0] or "(kWh)" in labels["energy"][0]
    assert "(W)" in labels["throughput"][0] and "tokens/s" in labels["throughput"][0]
    assert "J/token" in labels["j_per_token"][0]
    assert figures["energy"].axes[0].get_title() == "Energy by job"
    for fig in figures.values():
        data = png_bytes(fig)
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert fig.axes == []  # cleared after rendering
