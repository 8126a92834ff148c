"""Fixtures shared by the test modules."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short, world-traversable folder for an API socket (tmp_path is deep and private)."""
    path = Path(tempfile.mkdtemp(prefix="pt-sock-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
