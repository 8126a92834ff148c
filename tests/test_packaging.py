"""energy, scheduler, telemetry and reports are also names of unrelated PyPI projects: make sure the
ones imported are this repository's own."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["energy", "scheduler", "telemetry", "reports"])
def test_package_is_ours(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == REPO / name

