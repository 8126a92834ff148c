"""Measured GPU power traces shipped with powertrain, and turning a trace name into its file.

The data are unchanged copies of the Zeus project's traces (see ``zeus/NOTICE`` and
``zeus/README.md`` beside this file): ``zeus/nsdi23_trace/summary_power_<name>.csv``, one file per
GPU, is what the replay backend plays and the simulator is calibrated on; ``zeus/profile_data``
holds power-limit sweep logs. A bundled trace is known by the ``<name>`` part of its file name
(``a40``, ``p100``), found by listing the folder, so adding a file adds a name.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import Final

__all__ = [
    "TRACE_PREFIX",
    "bundled_trace_paths",
    "bundled_traces",
    "profile_data_dir",
    "resolve_trace",
    "traces_dir",
]

#: File-name prefix of a power trace; the rest of the stem is the trace's name.
TRACE_PREFIX: Final = "summary_power_"


def _data_root() -> Path:
    """This package's folder on disk.

    Raises:
        RuntimeError: The package is not installed as plain files (e.g. imported from a zip), so
            the traces cannot be opened as paths.
    """
    root = files(__name__)
    # Replay and calibration open the CSVs by path; a zip import would need extraction first,
    # which nothing in powertrain does, so say so instead of failing later on open().
    if not isinstance(root, Path):
        raise RuntimeError(f"{__name__} is not installed as files on disk ({root!r})")
    return root


def traces_dir() -> Path:
    """The folder of the bundled power traces (``summary_power_<name>.csv``)."""
    return _data_root() / "zeus" / "nsdi23_trace"


def profile_data_dir() -> Path:
    """The folder of the bundled Zeus power-limit sweep logs (``<GPU>+<model>+gpu<ids>.csv``)."""
    return _data_root() / "zeus" / "profile_data"


def bundled_trace_paths() -> dict[str, Path]:
    """Every bundled power trace by name (lower case), in name order.

    Returns:
        ``{"a40": .../summary_power_a40.csv, ...}``.
    """
    found = {
        path.stem.removeprefix(TRACE_PREFIX).lower(): path
        for path in traces_dir().glob(f"{TRACE_PREFIX}*.csv")
        if path.is_file()
    }
    return dict(sorted(found.items()))


def bundled_traces() -> list[str]:
    """The names of the bundled power traces (``a40``, ``p100``), sorted."""
    return list(bundled_trace_paths())


def resolve_trace(trace: str | os.PathLike[str]) -> Path:
    """The file of a trace given by bundled name or by path.

    A string that is a bundled name, in any case (``a40``, ``A40``), is that bundled file, even
    when a file of that name exists in the working folder (write ``./a40`` for that one).
    Anything else must be an existing file; a ``PathLike`` is always taken as a path.

    Args:
        trace: A bundled trace name or a path to a trace file.

    Returns:
        The trace file's path.

    Raises:
        LookupError: Neither a bundled name nor an existing file; the one-line message lists the
            bundled names.
    """
    names = ", ".join(bundled_traces()) or "none"
    if isinstance(trace, str):
        if not trace.strip():  # Path("") would be the working folder
            raise LookupError(f"no trace given; give a bundled trace ({names}) or a path")
        bundled = bundled_trace_paths().get(trace.strip().lower())
        if bundled is not None:
            return bundled
    path = Path(trace)
    if path.is_file():
        return path
    what = "is a folder, not" if path.is_dir() else "is neither a bundled trace nor"
    raise LookupError(
        f"trace {os.fspath(trace)!r} {what} a file; give a bundled trace ({names}) or a path"
    )
