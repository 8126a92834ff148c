"""The one settings object (``POWERTRAIN_*``), built in the entry point and passed down."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from telemetry.backends.choose import BackendKind
from telemetry.paths import default_home, default_url

BackendName = BackendKind
"""Which GPUs: the backend kinds ``telemetry.backends.choose`` opens."""


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) as (host, port).

    Raises:
        ValueError: Not of that form, or the port is not 1-65535.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address without brackets is ambiguous
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (or [IPv6]:PORT), got {text!r}")
    return host, int(port)


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
        listen: ``HOST:PORT`` where the daemon also serves its API over TCP, every request with
            a token (``[::1]:PORT`` for IPv6); unset, the API is on the Unix socket only.
        tls_cert / tls_key: Certificate chain and private key (PEM) for HTTPS on ``listen``.
        url: For the CLI: talk to the daemon at this ``http(s)://HOST:PORT`` instead of the
            socket, with the token in ``POWERTRAIN_TOKEN``.
        ca_cert: For the CLI over HTTPS: the CA (PEM) to trust for the daemon's certificate,
            beside the system's.
        metrics_address: ``HOST:PORT`` where the daemon serves Prometheus metrics at
            ``/metrics`` (``[::1]:PORT`` for IPv6; docs/metrics.md suggests port 9488); unset,
            no metrics are served.
        ray_address: The Ray cluster (``HOST:PORT`` of its head) in which the daemon keeps its
            node's ``watts`` equal to its headroom (docs/ray.md); unset, the daemon leaves Ray
            alone.
        slurm_default: For ``powertrain slurm prolog``: the budgets of every Slurm job, in the
            comment's syntax (``powertrain:watts=400,mode=auto``); a job's comment overrides
            them one by one (docs/slurm.md). Unset, a job without budgets in its comment has none.
        slurm_strict: For ``powertrain slurm prolog``: a job whose budgets cannot be registered
            or applied (the daemon is down, refuses, or is too slow) fails the prolog, and Slurm
            drains the node and requeues the job; off (the default), the job runs without them
            and the prolog says why in the job's AdminComment and its log.
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
    listen: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    url: str | None = None
    ca_cert: Path | None = None
    metrics_address: str | None = None
    ray_address: str | None = Field(default=None, min_length=1, pattern=r"^[^\s\x00-\x1f\x7f]+$")
    slurm_default: str | None = None
    slurm_strict: bool = False

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

    @field_validator("listen", "metrics_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            host_port(value)
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            scheme, sep, rest = value.partition("://")
            if scheme not in ("http", "https") or not sep or not rest.strip("/"):
                raise ValueError(f"expected http://HOST:PORT or https://HOST:PORT, got {value!r}")
            return value.rstrip("/")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_cert is not None and self.listen is None:
            raise ValueError("tls_cert and tls_key serve the API over TCP: give listen too")
        return self

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """``listen`` as (host, port), or ``None``."""
        return None if self.listen is None else host_port(self.listen)

    @property
    def tls(self) -> tuple[Path, Path] | None:
        """(certificate, key) for HTTPS on ``listen``, or ``None`` for plain HTTP."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return self.tls_cert, self.tls_key

    @field_validator("slurm_default")
    @classmethod
    def _budget_words(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            from scheduler.cluster.budgets import parse_budgets

            parse_budgets(value)  # its ValueError names what is wrong
            return value.strip()
        return None

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
