"""Fixtures of the backend contract: every GPU backend, so one suite proves they all behave alike.

``node`` is each backend with its virtual clock (see ``tests/backends/nodes.py``); ``faulty_node``
and ``field_fault`` are the backends that can have faults, ``NO_FAULTS`` says why the others cannot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends.nodes import FIELD_FAULTS, KINDS, NO_FAULTS, Node, open_node

#: The trace the replay backend plays (a bundled one).
REPLAY_TRACE = "a40"


@contextlib.contextmanager
def _open(kind: str, tmp_path: Path) -> Iterator[Node]:
    node = open_node(kind, tmp_path, REPLAY_TRACE)
    try:
        yield node
    finally:
        node.backend.close()


@pytest.fixture(params=KINDS)
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    """Each backend, with two busy GPUs."""
    with _open(request.param, tmp_path) as opened:
        yield opened


@pytest.fixture(params=[kind for kind in KINDS if kind not in NO_FAULTS])
def faulty_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    """Each backend that can have faults (``NO_FAULTS`` names the others and why)."""
    with _open(request.param, tmp_path) as opened:
        yield opened


@pytest.fixture(
    params=[(kind, how) for kind, hows in FIELD_FAULTS.items() for how in hows],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def field_fault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Node, str]]:
    """Each backend that can have faults, with each field fault it can inject."""
    kind, how = request.param
    with _open(kind, tmp_path) as opened:
        yield opened, how
