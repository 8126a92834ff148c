"""The one settings object (``POWERTRAIN_*``), built in the entry point and passed down."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from telemetry.backends.choose import BackendKind
from telemetry.paths import default_home, default_url

BackendName = BackendKind
"""Which GPUs: the backend kinds ``telemetry.backends.choose`` opens."""


class Settings(BaseSettings):
    """Daemon and CLI settings. Every field can be set as ``POWERTRAIN_<NAME>``.

    Attributes:
        home: Where the SQLite store, the simulated GPUs' state and logs live.
        db: SQLAlchemy URL of the store; empty means ``sqlite:///<home>/powertrain.db``.
        backend: ``auto`` uses NVML when a driver is present, else the simulator (and says so);
            ``replay`` plays a measured trace (``trace``).
        sim_gpus / sim_sku: How many simulated GPUs and which SKU profile; unset means the
            simulated node's own (from its state file), else 4 × H100-SXM. ``sim_gpus`` is also
            the number of replayed GPUs (default 4); ``sim_sku`` does not apply to them.
        trace: The trace the ``replay`` backend plays: a bundled name (``a40``, ``p100``) or the
            path of a file in the same format. Required for ``replay``, unused otherwise.
        trace_workload: The trace's workload to play (``dataset/network``, or a unique
            ``dataset`` or ``network``); unset means the file's first.
        trace_batch_size: The batch size to play; unset means the workload's largest.
        interval_ms: Sampling period in milliseconds (100 = 10 Hz).
        flush_interval_s: How often buffered samples are written to the store.
        buffer_max_rows: Rows kept in memory while the store is failing; beyond it the oldest
            rows are dropped and counted.
        retention_days: Raw samples older than this are deleted (rollups stay).
        socket: The API's Unix socket; default ``<home>/powertrain.sock``.
        socket_group: Group given the socket (mode 0660): the users allowed to talk to the
            daemon. Default: the daemon's own group.
        admin_group: Members may act on any job and set node settings, like root.
        node_cap_w: Node power cap, W, held at run time. Unset, nothing is held at run time and
            placement checks against the sum of the GPUs' maximum power limits.
        cancel_grace_s: Time between SIGTERM and SIGKILL when a job is cancelled, s.
        control_interval_s: Period of the control loop (placement, launches, budgets), s.
        dry_run: Log every GPU setting the daemon would change (power limits, locked clocks)
            and change none; soft directives to training loops still apply.
        runner_python: Interpreter that runs each job's small runner process; every job's user
            must be able to execute it. Default: chosen at daemon start
            (``scheduler.launcher.choose_runner_python``).
        node: This node's name in the store (its GPUs, jobs, members and rollups are filed under
            it); default the host name. Distinct daemons on one store need distinct names.
    """

    model_config = SettingsConfigDict(env_prefix="POWERTRAIN_", extra="ignore")

    home: Path = Field(default_factory=default_home)
    db: str = ""
    backend: BackendName = "auto"
    sim_gpus: int | None = Field(default=None, ge=1, le=64)
    sim_sku: str | None = None
    trace: str | None = None
    trace_workload: str | None = None
    trace_batch_size: int | None = Field(default=None, ge=1)
    interval_ms: int = Field(default=100, ge=10, le=60_000)
    flush_interval_s: float = Field(default=1.0, gt=0, le=60)
    buffer_max_rows: int = Field(default=100_000, ge=100)
    retention_days: float = Field(default=14.0, gt=0)
    socket: Path | None = None
    socket_group: str | None = None
    admin_group: str | None = None
    node_cap_w: float | None = Field(default=None, gt=0)
    cancel_grace_s: float = Field(default=10.0, ge=0, le=3600)
    control_interval_s: float = Field(default=1.0, gt=0, le=60)
    runner_python: str | None = None
    dry_run: bool = False
    node: str | None = Field(
        default=None, min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$"
    )

    @field_validator("flush_interval_s", "retention_days", "node_cap_w", "cancel_grace_s")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("sim_sku")
    @classmethod
    def _known_sku(cls, value: str | None) -> str | None:
        if value is not None:
            from telemetry.backends.profiles import get_sku

            get_sku(value)  # its ValueError names the known SKUs
        return value

    @property
    def db_url(self) -> str:
        """The store's URL: ``db`` if set, else a SQLite file under ``home``."""
        return default_url(self.db or None, self.home)

    @property
    def socket_path(self) -> Path:
        """The API's Unix socket."""
        return self.socket or self.home / "powertrain.sock"

    @property
    def sim_state_path(self) -> Path:
        """The simulated node's state file (settings and energy counters outlive the daemon)."""
        return self.home / "simulated-gpus.json"
