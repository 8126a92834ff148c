"""The bundled measured traces: finding them by name or path, playing them, and shipping them."""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path

import pytest

import telemetry
from telemetry.backends.choose import open_backend
from telemetry.backends.replay import ReplayBackend, default_curve, gpu_name_from_path, load_trace
from telemetry.backends.traces import (
    bundled_trace_paths,
    bundled_traces,
    profile_data_dir,
    resolve_trace,
    traces_dir,
)
from telemetry.clock import VirtualClock

REPO = Path(__file__).resolve().parents[2]
TRACES_PKG = REPO / "telemetry" / "backends" / "traces"


def test_the_bundled_names_come_from_the_files() -> None:
    assert bundled_traces() == ["a40", "p100"]
    for name, path in bundled_trace_paths().items():
        assert path.is_file() and path.parent == traces_dir()
        assert path.name == f"summary_power_{name}.csv"
        assert gpu_name_from_path(path) == name.upper()
        assert path.resolve().is_relative_to(REPO)  # inside the repository, nothing outside


@pytest.mark.parametrize("name", ["a40", "A40", " a40 "])
def test_a_bundled_name_resolves_in_any_case(name: str) -> None:
    assert resolve_trace(name) == traces_dir() / "summary_power_a40.csv"


def test_a_path_resolves_to_itself(tmp_path: Path) -> None:
    mine = tmp_path / "summary_power_h100.csv"
    mine.write_text("dataset\n")
    assert resolve_trace(mine) == mine
    assert resolve_trace(str(mine)) == mine
    bundled = resolve_trace("p100")
    assert resolve_trace(str(bundled)) == bundled


def test_a_path_object_is_never_taken_for_a_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LookupError):
        resolve_trace(Path("a40"))
    Path("a40").write_text("dataset\n")
    assert resolve_trace(Path("a40")) == Path("a40")
    assert resolve_trace("a40") == traces_dir() / "summary_power_a40.csv"  # a name wins


@pytest.mark.parametrize("bad", ["h100", "no/such/file.csv", " "])
def test_an_unknown_trace_is_one_line_naming_the_bundled_ones(bad: str) -> None:
    with pytest.raises(LookupError) as info:
        resolve_trace(bad)
    message = str(info.value)
    assert "\n" not in message and "a40, p100" in message
    assert (repr(bad) if bad.strip() else "no trace given") in message


def test_a_folder_is_not_a_trace(tmp_path: Path) -> None:
    with pytest.raises(LookupError, match="is a folder"):
        resolve_trace(tmp_path)


def test_the_replay_backend_takes_a_name_like_its_file() -> None:
    by_name = ReplayBackend("A40", "imagenet/resnet50", 256, clock=VirtualClock(), seed=3)
    by_path = ReplayBackend(
        resolve_trace("a40"), "imagenet/resnet50", 256, clock=VirtualClock(), seed=3
    )
    assert by_name.curve == by_path.curve and by_name.curve.gpu == "A40"
    assert by_name.devices() == by_path.devices()
    assert by_name.run_steps(50) == by_path.run_steps(50)  # same file, same noise
    with pytest.raises(LookupError, match="a40, p100"):
        ReplayBackend("h100", "imagenet/resnet50", 256)


def test_defaults_are_the_first_workload_and_its_largest_batch() -> None:
    path = resolve_trace("a40")
    with path.open(newline="", encoding="utf-8") as f:
        first = next(csv.DictReader(f))
    workload = f"{first['dataset']}/{first['network']}"
    largest = max(c.batch_size for c in load_trace(path) if c.workload == workload)
    assert default_curve("a40") == (workload, largest)
    assert default_curve("a40", "imagenet") == ("imagenet", 512)
    assert default_curve("a40", "imagenet/resnet50", 256) == ("imagenet/resnet50", 256)
    with pytest.raises(LookupError, match="ambiguous"):
        default_curve("a40", "bert_base_uncased")  # squad and sentiment140 both use it
    with pytest.raises(LookupError, match="not in the trace"):
        default_curve("a40", "mnist")


def test_open_backend_says_what_it_replays() -> None:
    backend, why = open_backend(
        "replay", trace="a40", trace_workload="imagenet/resnet50", trace_batch_size=256,
        clock=VirtualClock(),
    )
    try:
        assert why == "replaying a40 (imagenet/resnet50 bs=256): 4 × A40"
        assert len(backend.devices()) == 4
    finally:
        backend.close()
    backend, why = open_backend("replay", trace="p100", sim_gpus=2, clock=VirtualClock())
    backend.close()
    assert why.startswith("replaying p100 (") and why.endswith("): 2 × P100")
    with pytest.raises(ValueError, match="needs a trace"):
        open_backend("replay")


def test_the_profile_sweeps_are_bundled() -> None:
    logs = sorted(profile_data_dir().glob("*.csv"))
    assert logs, f"no sweep logs in {profile_data_dir()}"
    for path in logs:
        gpu, _model, _ids = path.stem.split("+")
        assert gpu in {"A40", "V100"}
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert rows
        assert all(r["window_name"].startswith("__GlobalPowerLimitOptimizer_") for r in rows)


def test_the_licence_and_notice_travel_with_the_data() -> None:
    zeus = TRACES_PKG / "zeus"
    assert "Apache License" in (zeus / "LICENSE").read_text(encoding="utf-8")[:200]
    notice = (zeus / "NOTICE").read_text(encoding="utf-8")
    for fact in ("github.com/ml-energy/zeus", "75a8b93", "Apache License", "NSDI"):
        assert fact in notice


def test_package_data_globs_cover_every_bundled_file() -> None:
    """An installed (non-editable) wheel has exactly what pyproject's package-data lists, so
    every file beside the trace module must match one of the ``telemetry`` globs."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    globs = config["tool"]["setuptools"]["package-data"]["telemetry"]
    package_root = Path(telemetry.__file__).resolve().parent
    listed = {p for g in globs for p in package_root.glob(g) if p.is_file()}
    data = {
        p for p in TRACES_PKG.rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    }
    assert len(data) >= 18  # 3 summaries, 12 sweep logs, LICENSE, NOTICE, README.md
    assert sorted(map(str, data - listed)) == []
