"""The store's layering: telemetry and reports load no scheduler module, and the store's URL is
resolved as the daemon's settings resolve it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.settings import Settings
from telemetry.store import default_url

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["telemetry.store", "reports.files", "reports.queries"])
def test_importing_telemetry_or_reports_loads_no_scheduler_module(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'scheduler')))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == ""


def test_default_url_resolves_like_the_daemons_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("POWERTRAIN_DB", raising=False)
    monkeypatch.delenv("POWERTRAIN_HOME", raising=False)
    assert default_url() == Settings().db_url
    assert default_url(home=tmp_path) == Settings(home=tmp_path).db_url
    assert default_url(db="sqlite:///x.db", home=tmp_path) == "sqlite:///x.db"

    monkeypatch.setenv("POWERTRAIN_HOME", str(tmp_path / "env-home"))
    env_db = tmp_path / "env-home" / "powertrain.db"
    assert default_url() == Settings().db_url == f"sqlite:///{env_db}"
    assert default_url(home=tmp_path) == Settings(home=tmp_path).db_url

    monkeypatch.setenv("POWERTRAIN_DB", "postgresql://db/powertrain")
    assert default_url() == Settings().db_url == "postgresql://db/powertrain"
    assert default_url(home=tmp_path) == Settings(home=tmp_path).db_url
    assert default_url(db="sqlite:///x.db") == Settings(db="sqlite:///x.db").db_url
