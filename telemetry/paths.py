"""Where powertrain keeps its data by default: the home folder and the store's URL.

Light on purpose (no SQLAlchemy): the settings of every command resolve these at start.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["DB_ENV", "DB_FILE", "HOME_ENV", "default_home", "default_url"]

DB_ENV = "POWERTRAIN_DB"
"""Environment variable naming the store's URL (empty or unset: the SQLite file in the home)."""
HOME_ENV = "POWERTRAIN_HOME"
"""Environment variable naming powertrain's data folder (the store, the simulated GPUs, logs)."""
DB_FILE = "powertrain.db"


def default_home() -> Path:
    """The user's data folder for powertrain (without ``POWERTRAIN_HOME``)."""
    return Path(platformdirs.user_data_dir("powertrain", appauthor=False))


def default_url(db: str | None = None, home: Path | None = None) -> str:
    """The store's URL: ``db``, else ``$POWERTRAIN_DB``, else ``sqlite:///<home>/powertrain.db``
    with ``home``, else ``$POWERTRAIN_HOME``, else the user's data folder.

    The daemon's settings resolve the same variables the same way; this is for the commands and
    tools that open a store without them (reports, Alembic).
    """
    url = db or os.environ.get(DB_ENV, "")
    if url:
        return url
    folder = home or Path(os.environ.get(HOME_ENV, "") or default_home())
    return f"sqlite:///{folder / DB_FILE}"
