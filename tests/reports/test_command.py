"""``powertrain report`` end to end through Typer: outputs, escaping, and bad input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from reports.files import write_demo_report
from scheduler.report_command import report
from scheduler.store import JobStore, ProbeRecord, SearchRecord
from telemetry.store import open_store
from tests.reports.conftest import Rig

SCRIPT_NAME = "<script>alert(1)</script>"
EVIL_USER = "<b>eve</b>"
EVIL_ARG = '"><img src=x onerror=alert(2)>'

app = typer.Typer()
app.command("report")(report)


@app.command("other")
def _other() -> None:  # a second command keeps "report" a subcommand, as in the real CLI
    """Unused."""


runner = CliRunner()


@pytest.fixture(scope="module")
def store_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with two finished jobs, one with a hostile name, user and command."""
    path = tmp_path_factory.mktemp("cmd") / "powertrain.db"
    store = open_store(f"sqlite:///{path}")
    try:
        rig = Rig(store, gpus=2)
        rig.run(20)
        a = rig.start_job(SCRIPT_NAME, (0,), user=EVIL_USER, watts=450.0)
        JobStore(store).set_fields(a.id, argv=["python", EVIL_ARG])
        rig.run(40)
        b = rig.start_job("plain", (1,), tokens_per_s=3_000.0)
        rig.run(120)
        rig.end_job(a)
        rig.run(30)
        rig.end_job(b)
        rig.run(20)
        # The energy optimiser's search of job b: 250 W chosen, against the 700 W default.
        JobStore(store).save_search(SearchRecord(
            job_id=b.id, number=1, at=rig.now(), objective="energy", knob="power_limit",
            setting=250_000, top_setting=700_000, feasible=True, reason="walked down",
            revisions=1, profiling_steps=300, profiling_time_s=48.0, profiling_energy_j=9_000.0,
            probes=(ProbeRecord(700_000, 40, 6.0, 3_930.0),
                    ProbeRecord(250_000, 200, 55.0, 13_000.0)),
        ))
    finally:
        store.close()
    return path


def invoke(*args: str) -> object:
    return runner.invoke(app, ["report", *args], env={"COLUMNS": "200"})


def db(path: Path) -> list[str]:
    return ["--db", f"sqlite:///{path}", "--since", "2025-12-31T23:00Z", "--until",
            "2026-01-01T01:00Z"]


def test_json_rows_have_the_documented_fields(store_file: Path) -> None:
    result = invoke(*db(store_file), "--json", "--price-kwh", "0.25", "--co2-g-per-kwh", "400")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    rows = json.loads(result.stdout)  # type: ignore[attr-defined]
    assert [r["key"] for r in rows] == ["1", "2", "idle"]
    for row in rows:
        for field in ("key", "energy_j", "mean_power_w", "peak_power_w", "tokens",
                      "j_per_token", "cost", "co2_g"):
            assert field in row
        assert row["cost"] == pytest.approx(row["energy_j"] / 3.6e6 * 0.25)
        assert row["co2_g"] == pytest.approx(row["energy_j"] / 3.6e6 * 400)
    assert rows[0]["name"] == SCRIPT_NAME and rows[0]["user"] == EVIL_USER
    assert rows[1]["tokens"] > 0 and rows[1]["j_per_token"] > 0


def test_the_optimisers_choice_against_the_default(store_file: Path) -> None:
    result = invoke(*db(store_file), "--json")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    rows = json.loads(result.stdout)  # type: ignore[attr-defined]
    assert rows[0]["optimizer"] == []
    (search,) = rows[1]["optimizer"]
    tokens_per_step = rows[1]["tokens"] / rows[1]["steps"]
    chosen, default = search["chosen"], search["default"]
    assert chosen["setting"] == 250_000 and default["setting"] == 700_000
    assert chosen["j_per_step"] == pytest.approx(13_000 / 200)
    assert chosen["steps_per_s"] == pytest.approx(200 / 55)
    assert chosen["j_per_token"] == pytest.approx(13_000 / 200 / tokens_per_step)
    assert default["tokens_per_s"] == pytest.approx(40 / 6 * tokens_per_step)
    assert search["energy_change"] == pytest.approx((13_000 / 200) / (3_930 / 40) - 1)
    assert search["throughput_change"] == pytest.approx((200 / 55) / (40 / 6) - 1)

    text = invoke(*db(store_file)).stdout  # type: ignore[attr-defined]
    assert ("Job 2, energy optimiser (energy): power limit 250 W, from 2 settings probed in "
            "48 s, revised 1x as it ran.") in text
    assert (f"250 W: {13_000 / 200 / tokens_per_step:.3g} J/token at "
            f"{200 / 55 * tokens_per_step:,.0f} tokens/s; default 700 W:") in text
    assert "energy per token -34 %, throughput -45 %." in text


def test_csv_to_a_file_and_by_gpu(store_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    result = invoke(*db(store_file), "--csv", "--by", "gpu", "--output", str(out))
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["key"] for r in rows] == ["0", "1"]
    assert float(rows[0]["idle_j"]) > 0


def test_table_is_the_default_and_shows_names_as_typed(store_file: Path) -> None:
    result = invoke(*db(store_file), "--tou", str(_tou(store_file.parent)))
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert "<script>" in result.stdout  # type: ignore[attr-defined]  # as typed (may wrap)
    assert "Idle" in result.stdout and "Cost" in result.stdout  # type: ignore[attr-defined]


def _tou(folder: Path) -> Path:
    path = folder / "tou.csv"
    path.write_text("start,price_per_kwh\n00:00,0.10\n00:02,0.40\n07:00,0.20\n")
    return path


def test_html_is_self_contained_and_escapes_user_text(store_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = invoke(*db(store_file), "--html", str(out), "--png", str(tmp_path / "png"))
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    page = out.read_text()
    assert SCRIPT_NAME not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert EVIL_USER not in page and "&lt;b&gt;eve&lt;/b&gt;" in page
    assert "<img src=x" not in page
    assert "http://" not in page and "https://" not in page and "src=\"//" not in page
    assert page.count('src="data:image/png;base64,') == 4
    assert "<h2>Energy optimiser</h2><p>Job 2, energy optimiser (energy): power limit 250 W" in page
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "energy.png", "j_per_token.png", "power.png", "throughput.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in (tmp_path / "png").iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--job", "999"], "no job 999"),
        (["--since", "2026-01-02", "--until", "2026-01-01"], "must be before --until"),
        (["--since", "yesterday-ish"], "cannot read time"),
        (["--by", "week"], "--by must be one of"),
        (["--html", "/nonexistent-dir/r.html"], "cannot write HTML report"),
        (["--co2-csv", "/nonexistent.csv"], "--co2-csv"),
        (["--gpu", "7"], "no GPU with index 7"),
        (["--node", "gpu-9"], "no GPU of node 'gpu-9' in the store: the nodes with GPUs are test"),
        (["--node", "test", "--gpu", "7"], "no GPU with index 7 on node test"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(
    store_file: Path, args: list[str], message: str
) -> None:
    result = invoke("--db", f"sqlite:///{store_file}", *args)
    assert result.exit_code != 0
    err = result.stderr.strip()  # type: ignore[attr-defined]
    assert message in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output  # type: ignore[attr-defined]


def test_a_node_filter_in_every_output(store_file: Path, tmp_path: Path) -> None:
    """One node in the store: its report is the whole store's, in JSON, CSV, table and HTML."""
    whole = json.loads(invoke(*db(store_file), "--json").stdout)  # type: ignore[attr-defined]
    result = invoke(*db(store_file), "--node", "test", "--json")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    rows = json.loads(result.stdout)  # type: ignore[attr-defined]
    assert [(r["key"], r["energy_j"]) for r in rows] == [(r["key"], r["energy_j"]) for r in whole]
    assert all(r["ranks"] is None for r in rows if r["key"] != "idle")
    out = tmp_path / "r.csv"
    result = invoke(*db(store_file), "--node", "test", "--csv", "-o", str(out), "--html",
                    str(tmp_path / "r.html"))
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    header = out.read_text().splitlines()[0].split(",")
    assert "ranks_slowest_rank" in header and "ranks_spread" in header and "ranks" not in header
    assert "GPU(s) of node test; generated" in (tmp_path / "r.html").read_text()
    text = invoke(*db(store_file), "--node", "test").stdout  # type: ignore[attr-defined]
    assert "(node test)" in text


def test_unwritable_outputs_leave_nothing_behind(store_file: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    result = invoke(*db(store_file), "--html", str(tmp_path / "r.html"), "--png", str(a_file))
    assert result.exit_code != 0 and "not a directory" in result.stderr  # type: ignore[attr-defined]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-dir"]
    result = invoke(*db(store_file), "--html", str(tmp_path))
    assert result.exit_code != 0 and "is a directory" in result.stderr  # type: ignore[attr-defined]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-dir"]


def test_a_missing_store_is_not_created(tmp_path: Path) -> None:
    result = invoke("--db", f"sqlite:///{tmp_path / 'none.db'}")
    assert result.exit_code != 0 and "no store at" in result.stderr  # type: ignore[attr-defined]
    assert not (tmp_path / "none.db").exists()


def test_write_demo_report(store_file: Path, tmp_path: Path) -> None:
    path = write_demo_report(f"sqlite:///{store_file}", tmp_path / "demo.html")
    assert path == (tmp_path / "demo.html").resolve()
    assert "Energy by job" in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["demo.html"]
