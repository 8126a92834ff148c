"""Shared by the CLI tests: a runner with none of the caller's POWERTRAIN_* settings, and the
check that a mistake was said in one ``error:`` line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner


def cli_runner(monkeypatch: pytest.MonkeyPatch, home: Path) -> CliRunner:
    """A runner for ``scheduler.cli.app`` whose settings come only from the test: every
    ``POWERTRAIN_*`` variable is cleared, and the home is ``home``."""
    for name in [n for n in os.environ if n.startswith("POWERTRAIN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("POWERTRAIN_HOME", str(home))
    return CliRunner()


def one_error_line(output: str) -> str:
    """The one line of ``output``, which must start with ``error:``."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error:"), output
    return lines[0]
