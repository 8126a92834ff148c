"""The ``powertrain`` command line.

User mistakes and domain errors end in one ``error: ...`` line on stderr and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from energy.times import parse_when
from energy.units import j_to_kj, j_to_wh, mj_to_j, mw_to_w
from scheduler.settings import BackendName, Settings
from telemetry.backends.base import (
    READING_FIELDS,
    GpuBackend,
    GpuError,
    GpuReading,
    ThrottleReason,
)

if TYPE_CHECKING:
    from scheduler.apiclient import DaemonClient

try:  # Typer 0.2x carries its own copy of Click, whose exceptions are these
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older Typer on the public Click
    from click import exceptions as click_errors  # type: ignore[no-redef]



class _OneLineErrors(typer.core.TyperGroup):
    """The command group, with every usage mistake said in one ``error:`` line (exit 2).

    Click and Typer would draw a boxed, multi-line message with the usage above it; a script
    reading stderr, and a person, need one line that names the mistake and where help is.
    """

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name or "powertrain", complete_var,
                              standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:  # a bare group: show its help
            err.print(escape(exc.ctx.get_help() if exc.ctx else exc.format_message()),
                      highlight=False)
            rv = EXIT_USAGE
        except click_errors.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            message = " ".join(exc.format_message().split())
            err.print(f"[bold red]error:[/] {escape(message + where)}", highlight=False,
                      soft_wrap=True)
            rv = EXIT_USAGE
        except click_errors.ClickException as exc:
            message = " ".join(exc.format_message().split())
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            rv = exc.exit_code
        except typer.Abort:
            err.print("[bold red]error:[/] aborted", highlight=False)
            rv = EXIT_ERROR
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="powertrain: energy-aware GPU training scheduler and monitor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Manage the store's schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

out = Console()
err = Console(stderr=True)

EXIT_ERROR = 1
EXIT_USAGE = 2

T = TypeVar("T")

# Options shared by the commands that open GPUs or the store.
HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Data folder (store, simulated GPU state). Env: POWERTRAIN_HOME."),
]
DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="SQLAlchemy URL of the store (default: SQLite under --home). Env: POWERTRAIN_DB.",
    ),
]
BackendOpt = Annotated[
    BackendName | None,
    typer.Option(
        "--backend",
        help="auto: NVML when an NVIDIA driver is present, else simulated. replay: GPUs that "
        "play a measured power trace (--trace). Env: POWERTRAIN_BACKEND.",
    ),
]
SimGpusOpt = Annotated[
    int | None,
    typer.Option("--sim-gpus", help="Number of simulated or replayed GPUs (default 4)."),
]
TraceOpt = Annotated[
    str | None,
    typer.Option(
        "--trace",
        metavar="NAME|PATH",
        help="Trace for --backend replay (required there): a bundled one (a40, p100) or a "
        "trace file's path. Env: POWERTRAIN_TRACE.",
    ),
]
TraceWorkloadOpt = Annotated[
    str | None,
    typer.Option(
        "--trace-workload",
        help="Workload of the trace to replay: dataset/network, or a dataset or network that is "
        "unique (default: the file's first). Env: POWERTRAIN_TRACE_WORKLOAD.",
    ),
]
TraceBatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--trace-batch-size",
        help="Batch size of that workload to replay (default: the largest the trace has for "
        "it). Env: POWERTRAIN_TRACE_BATCH_SIZE.",
    ),
]
SimSkuOpt = Annotated[
    str | None,
    typer.Option("--sim-sku", help="Simulated GPU model: H100-SXM, A100-SXM, A40, V100, P100."),
]


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print one error line and exit."""
    # Rich would read brackets in the message ("[0, 1]") as markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def invalid(exc: ValidationError, prefix: str = "") -> NoReturn:
    """Say the first thing a request or settings model refused, as the option it came from."""
    first = exc.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    field = str(first["loc"][0]) if first["loc"] else ""
    # the command itself is the argument after --, not an option
    where = "command" if field == "argv" else f"--{field.replace('_', '-')}" if field else ""
    fail(f"{prefix}{where}: {message}" if where else f"{prefix}{message}", EXIT_USAGE)


def build_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the command line's flags on top."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        invalid(exc, "invalid ")


def guarded(action: Callable[[], T]) -> T:
    """Run ``action``, turning domain errors into one line and a non-zero exit."""
    from telemetry.store import SchemaOutdatedError, StoreError

    try:
        return action()
    except SchemaOutdatedError as exc:
        fail(str(exc))
    except (GpuError, StoreError, ValueError, OSError) as exc:
        fail(str(exc) or type(exc).__name__)


def setup_logging(verbose: bool) -> None:
    """Log to stderr: timestamped lines, or, when stderr is the journal (under systemd), lines
    with their syslog priority and no time of their own (``scheduler.systemd``)."""
    from scheduler.systemd import JournalFormatter, to_journal

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JournalFormatter() if to_journal()
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def check_backend_options(settings: Settings) -> None:
    """End with a usage error (exit 2) for ``replay`` without a trace or with an unknown one."""
    if settings.backend != "replay":
        return
    from telemetry.backends.traces import bundled_traces, resolve_trace

    if not settings.trace:
        fail(
            "--backend replay needs --trace NAME|PATH (bundled traces: "
            + ", ".join(bundled_traces())
            + ")",
            EXIT_USAGE,
        )
    try:
        resolve_trace(settings.trace)
    except LookupError as exc:
        fail(f"--trace: {exc}", EXIT_USAGE)


def open_gpus(settings: Settings) -> tuple[GpuBackend, str]:
    """Open the settings' GPU backend, and say which and why.

    A replay trace, workload or batch size that does not exist is a usage error (exit 2).
    """
    from telemetry.backends.choose import open_backend

    check_backend_options(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    try:
        return open_backend(
            settings.backend,
            sim_gpus=settings.sim_gpus,
            sim_sku=settings.sim_sku,
            sim_state_path=settings.sim_state_path,
            trace=settings.trace,
            trace_workload=settings.trace_workload,
            trace_batch_size=settings.trace_batch_size,
        )
    except LookupError as exc:
        # only replay's choices fail this way; a missing GPU is not the user's typing
        if settings.backend != "replay" or isinstance(exc, GpuError):
            raise
        fail(str(exc), EXIT_USAGE)


@app.command()
def daemon(
    backend: BackendOpt = None,
    sim_gpus: SimGpusOpt = None,
    sim_sku: SimSkuOpt = None,
    trace: TraceOpt = None,
    trace_workload: TraceWorkloadOpt = None,
    trace_batch_size: TraceBatchSizeOpt = None,
    db: DbOpt = None,
    home: HomeOpt = None,
    interval_ms: Annotated[
        int | None,
        typer.Option("--interval-ms", help="Sampling period in ms (default 100 = 10 Hz)."),
    ] = None,
    socket: Annotated[
        Path | None,
        typer.Option(
            "--socket", help="API socket (default <home>/powertrain.sock). Env: POWERTRAIN_SOCKET."
        ),
    ] = None,
    socket_group: Annotated[
        str | None, typer.Option("--socket-group", help="Group allowed to use the API socket.")
    ] = None,
    admin_group: Annotated[
        str | None, typer.Option("--admin-group", help="Group that may act on any job.")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Log every GPU setting it would change; change none."),
    ] = False,
    node_cap_w: Annotated[
        float | None,
        typer.Option("--node-cap-w", help="Node power cap, W, held at run time (default: "
                     "none; placement then checks against the sum of max limits)."),
    ] = None,
    runner_python: Annotated[
        str | None,
        typer.Option("--runner-python", help="Python 3.11+ that starts each job's runner; the "
                     "socket's users must be able to execute it (default: the first of this "
                     "interpreter, its target and the system python3 that they can). Env: "
                     "POWERTRAIN_RUNNER_PYTHON."),
    ] = None,
    node: Annotated[
        str | None,
        typer.Option("--node", help="This node's name in the store (default: the host name); "
                     "daemons sharing one store need distinct names. Env: POWERTRAIN_NODE."),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option("--listen", help="Also serve the API over TCP at HOST:PORT ([::1]:PORT for "
                     "IPv6), every request with a token (`powertrain token create`); plain HTTP "
                     "unless --tls-cert and --tls-key are given. Env: POWERTRAIN_LISTEN."),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option("--tls-cert", help="Certificate chain (PEM) for HTTPS on --listen."),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option("--tls-key", help="Private key (PEM) of --tls-cert."),
    ] = None,
    metrics_address: Annotated[
        str | None,
        typer.Option("--metrics-address", help="Serve Prometheus metrics at "
                     "http://HOST:PORT/metrics ([::1]:PORT for IPv6; suggested port 9488; "
                     "docs/metrics.md). Default: off. Env: POWERTRAIN_METRICS_ADDRESS."),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="Keep this node's `watts` in the Ray cluster at "
                     "HOST:PORT equal to its power headroom (needs powertrain[ray]; "
                     "docs/ray.md). Default: off. Env: POWERTRAIN_RAY_ADDRESS."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run the daemon in the foreground (systemd style): sample GPUs, run jobs, serve the API.

    SIGTERM or SIGINT flushes buffered samples and exits 0. A fresh database is created; an
    outdated one is refused until `powertrain db upgrade` has run.
    """
    settings = build_settings(
        backend=backend,
        sim_gpus=sim_gpus,
        sim_sku=sim_sku,
        trace=trace,
        trace_workload=trace_workload,
        trace_batch_size=trace_batch_size,
        db=db,
        home=home,
        interval_ms=interval_ms,
        socket=socket,
        socket_group=socket_group,
        admin_group=admin_group,
        node_cap_w=node_cap_w,
        runner_python=runner_python,
        dry_run=dry_run or None,
        node=node,
        listen=listen,
        tls_cert=tls_cert,
        tls_key=tls_key,
        metrics_address=metrics_address,
        ray_address=ray_address,
    )
    check_backend_options(settings)  # before the store is opened or created
    setup_logging(verbose)
    log = logging.getLogger("powertrain")

    from scheduler.daemon import Daemon, DaemonAlreadyRunningError, home_lock
    from telemetry.store import open_store

    def run() -> int:
        with home_lock(settings.home):
            store = open_store(settings.db_url)
            try:
                gpus, why = open_gpus(settings)
            except BaseException:
                store.close()
                raise
            log.info(why)
            return Daemon(settings, gpus, store, host=settings.node).run()

    try:
        code = guarded(run)
    except DaemonAlreadyRunningError as exc:
        fail(str(exc))
    raise typer.Exit(code)


# A reading field's NVML unit, named by its suffix, and the unit the JSON gives it in.
_JSON_UNITS: tuple[tuple[str, str, Callable[[int], float]], ...] = (
    ("_mw", "_w", lambda mw: round(mw_to_w(mw), 3)),
    ("_mj", "_j", mj_to_j),
    ("_bytes", "_mib", lambda n: n // 2**20),
)
# ``power_w`` means the 1 s average in every output (the API, ``jobs``, this): NVML's plainly
# named ``power_mw`` is the instant power, which gets a name of its own.
_JSON_NAMES = {"power_mw": "power_instant_w", "power_avg_mw": "power_w"}


def _json_field(name: str, value: int | None) -> tuple[str, Any]:
    """A reading field's JSON name and value (W, J and MiB for NVML's mW, mJ and bytes)."""
    for suffix, unit, convert in _JSON_UNITS:
        if name.endswith(suffix):
            key = _JSON_NAMES.get(name, name.removesuffix(suffix) + unit)
            return key, None if value is None else convert(value)
    return name, value


def _reading_json(
    info_name: str, uuid: str, r: GpuReading, mem_total: int | None
) -> dict[str, Any]:
    """One GPU for ``gpus --json``: every ``READING_FIELDS`` value, in the units above."""
    row: dict[str, Any] = {"index": r.index, "uuid": uuid, "name": info_name}
    row.update(_json_field(name, getattr(r, name)) for name in READING_FIELDS)
    row["throttle_reasons"] = (  # names, not bits
        None
        if r.throttle_reasons is None
        else [str(f.name).lower() for f in ThrottleReason if f and r.throttle_reasons & f]
    )
    row["memory_total_mib"] = None if mem_total is None else mem_total // 2**20
    row["processes"] = [
        {"pid": p.pid, "used_memory_bytes": p.used_memory_bytes} for p in r.processes
    ]
    row["sampled_at"] = r.sampled_at.isoformat()
    return row


@app.command()
def gpus(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list for scripts.")] = False,
    backend: BackendOpt = None,
    sim_gpus: SimGpusOpt = None,
    sim_sku: SimSkuOpt = None,
    trace: TraceOpt = None,
    trace_workload: TraceWorkloadOpt = None,
    trace_batch_size: TraceBatchSizeOpt = None,
    home: HomeOpt = None,
    db: DbOpt = None,
) -> None:
    """Show every GPU's live state, read from the backend directly, and the settings powertrain
    applied to it (from the store's settings journal), with the job they are for."""
    settings = build_settings(
        backend=backend,
        sim_gpus=sim_gpus,
        sim_sku=sim_sku,
        trace=trace,
        trace_workload=trace_workload,
        trace_batch_size=trace_batch_size,
        home=home,
        db=db,
    )

    def read_all() -> tuple[list[dict[str, Any]], str]:
        gpu_backend, why = open_gpus(settings)
        try:
            rows = []
            for info in gpu_backend.devices():
                try:
                    reading = gpu_backend.read(info.index)
                except GpuError as exc:
                    rows.append(
                        {
                            "index": info.index,
                            "uuid": info.uuid,
                            "name": info.name,
                            "error": str(exc),
                        }
                    )
                    continue
                rows.append(_reading_json(info.name, info.uuid, reading, info.memory_total_bytes))
            return rows, why
        finally:
            gpu_backend.close()

    rows, why = guarded(read_all)
    from telemetry.store import StoreError

    try:
        applied = _applied_settings(settings)
    except (StoreError, OSError) as exc:  # the GPUs are still worth showing
        err.print(f"[yellow]warning:[/] settings journal not read: {exc}", highlight=False)
        applied = {}
    for row in rows:
        row["applied"] = applied.get(row["index"], [])
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    err.print(f"[dim]{why}[/]", highlight=False)
    table = Table(
        "GPU",
        "Name",
        "Power",
        "Limit",
        "Energy",
        "SM",
        "Mem",
        "Util",
        "Temp",
        "Memory",
        "Throttle",
        "Set by powertrain",
        box=box.SIMPLE_HEAD,
    )

    def cell(value: Any, fmt: str = "{}") -> str:
        return "n/a" if value is None else fmt.format(value)

    for row in rows:
        name = row["name"].removeprefix("NVIDIA ")
        if "error" in row:
            table.add_row(str(row["index"]), name, f"[red]{row['error']}[/]")
            continue
        energy_kj = None if row["energy_j"] is None else j_to_kj(row["energy_j"])
        used, total = row["memory_used_mib"], row["memory_total_mib"]
        table.add_row(
            str(row["index"]),
            name,
            cell(row["power_w"], "{:.0f} W"),
            cell(row["power_limit_w"], "{:.0f} W"),
            cell(energy_kj, "{:,.1f} kJ"),
            cell(row["sm_clock_mhz"], "{} MHz"),
            cell(row["mem_clock_mhz"], "{} MHz"),
            cell(row["gpu_util_pct"], "{}%"),
            cell(row["temperature_c"], "{}°C"),
            f"{cell(used and used / 1024, '{:.1f}')}/{cell(total and total / 1024, '{:.0f}')} GiB",
            ", ".join(r.replace("_", " ") for r in row["throttle_reasons"] or []) or "-",
            "; ".join(
                f"{a['setting']} for job {a['job']}" + (" (dry run)" if a["dry_run"] else "")
                for a in row["applied"]
            ) or "-",
        )
    out.print(table)


SocketOpt = Annotated[
    Path | None,
    typer.Option("--socket", help="The daemon's API socket. Env: POWERTRAIN_SOCKET."),
]
UrlOpt = Annotated[
    str | None,
    typer.Option("--url", help="Talk to a daemon over TCP (started with --listen) at "
                 "http(s)://HOST:PORT, with the token in POWERTRAIN_TOKEN. Env: POWERTRAIN_URL."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def daemon_client(socket: Path | None, url: str | None) -> DaemonClient:
    """A client of the daemon at ``url`` (with ``POWERTRAIN_TOKEN``), else on its socket."""
    from scheduler.apiclient import DaemonClient

    settings = build_settings(socket=socket, url=url)
    try:
        return DaemonClient(settings.socket_path, url=settings.url,
                            token=os.environ.get("POWERTRAIN_TOKEN"), ca_cert=settings.ca_cert)
    except (ValueError, OSError) as exc:  # no token; a CA file that cannot be read
        fail(str(exc), EXIT_USAGE)


def talk(socket: Path | None, url: str | None, action: Callable[[DaemonClient], T]) -> T:
    """Run ``action`` against the daemon; its refusals become one line and exit 1."""
    from scheduler.apiclient import DaemonError

    with daemon_client(socket, url) as client:
        try:
            return action(client)
        except DaemonError as exc:
            fail(str(exc))


def _parse_gpu_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fail(f"--gpu-ids: expected indices like 0,2 (got {text!r})", EXIT_USAGE)
    if not ids:
        fail("--gpu-ids: no GPU given", EXIT_USAGE)
    return ids


def _parse_deadline(text: str) -> str:
    """A deadline as an aware ISO 8601 string: ISO 8601 itself, or a duration from now."""
    try:
        return parse_when(text, datetime.now(UTC), ahead=True).isoformat()
    except ValueError as exc:
        fail(f"--deadline: {exc}", EXIT_USAGE)


@app.command(context_settings={"allow_interspersed_args": False})
def submit(
    command: Annotated[
        list[str], typer.Argument(help="The command to run, after --.", show_default=False)
    ],
    name: Annotated[str | None, typer.Option(help="Job name (default: the command).")] = None,
    gpus: Annotated[int | None, typer.Option(help="How many GPUs (default 1).")] = None,
    gpu_ids: Annotated[
        str | None, typer.Option("--gpu-ids", help="Exactly these GPUs, e.g. 0,2.")
    ] = None,
    watts: Annotated[float | None, typer.Option(help="Wattage budget per GPU, W.")] = None,
    energy_wh: Annotated[
        float | None, typer.Option("--energy-wh", help="Energy budget of the whole job, Wh.")
    ] = None,
    mode: Annotated[
        str, typer.Option(help="How the wattage budget is held: auto, hw, clock or soft.")
    ] = "auto",
    on_exceed: Annotated[
        str,
        typer.Option(
            "--on-exceed", help="When the energy budget runs out: warn, slow, pause or stop."
        ),
    ] = "warn",
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    deadline: Annotated[
        str | None,
        typer.Option(help="When the job must end: ISO 8601 (naive = UTC) or from now, like 6h, "
                     "90m, 2d. The energy forecast runs against it when the script declares no "
                     "total steps or tokens."),
    ] = None,
    objective: Annotated[
        str | None,
        typer.Option(help="Let the energy optimiser pick the power limit or clock: energy, "
                     "cost, throughput (within --watts) or slowdown."),
    ] = None,
    socket: SocketOpt = None,
    url: UrlOpt = None,
) -> None:
    """Queue a training command under budgets; print the job id alone on stdout.

    Example: powertrain submit --gpus 2 --watts 300 -- python train.py --lr 3e-4
    """
    from scheduler.schemas import SubmitRequest

    env = {k: v for k, v in os.environ.items() if k not in {"POWERTRAIN_JOB_ID"}}
    try:
        req = SubmitRequest.model_validate(
            {
                "name": name,
                "argv": command,
                "cwd": os.getcwd(),
                "env": env,
                "gpus": gpus,
                "gpu_ids": _parse_gpu_ids(gpu_ids) if gpu_ids is not None else None,
                "watts": watts,
                "energy_wh": energy_wh,
                "mode": mode,
                "on_exceed": on_exceed,
                "priority": priority,
                "objective": objective,
                "deadline": _parse_deadline(deadline) if deadline is not None else None,
            }
        )
    except ValidationError as exc:
        invalid(exc)
    job = talk(socket, url, lambda c: c.submit(req.model_dump(mode="json")))
    typer.echo(job["id"])


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


@app.command()
def jobs(
    job_id: Annotated[
        int | None, typer.Argument(help="One job (with --ranks: its ranks).", show_default=False)
    ] = None,
    all_jobs: Annotated[bool, typer.Option("--all", help="Include ended jobs.")] = False,
    ranks: Annotated[
        bool,
        typer.Option("--ranks", help="Each rank of JOB: node, steps, step rate; the slowest "
                     "rank and the spread (the straggler view)."),
    ] = False,
    as_json: JsonOpt = False,
    socket: SocketOpt = None,
    url: UrlOpt = None,
) -> None:
    """List jobs: state, GPUs, budget, power now, throughput and energy so far.

    A distributed run is one job whose members are its ranks: its tokens and samples are their sums, its steps the steps every rank has finished.
    """  # noqa: E501 - Rich keeps a docstring's line breaks: one paragraph, one line
    if ranks and job_id is None:
        fail("--ranks needs a JOB id", EXIT_USAGE)
    if job_id is not None:
        job = talk(socket, url, lambda c: c.job(job_id))
        if ranks:
            _print_ranks(job, as_json)
            return
        rows = [job]
    else:
        rows = talk(socket, url, lambda c: c.jobs(include_ended=all_jobs))
    if as_json:
        typer.echo(json.dumps(rows if job_id is None else rows[0], indent=2))
        return
    table = Table(
        "ID",
        "Name",
        "User",
        "State",
        "Ranks",
        "GPUs",
        "Budget",
        "Power",
        "Tokens/s",
        "Energy",
        "J/token",
        box=box.SIMPLE_HEAD,
    )
    for row in rows:
        energy_j = row["energy_j"]
        members = row.get("members") or []
        running = sum(1 for m in members if m["state"] == "running")
        table.add_row(
            str(row["id"]),
            row["name"],
            row["user"],
            row["state"],
            f"{running}/{row['world_size']}" if row.get("world_size") else str(len(members)),
            _gpus_cell(row),
            _fmt(row["watts"], "{:.0f} W/GPU"),
            _fmt(row["power_w"], "{:.0f} W"),
            _fmt(row["tokens_per_s"], "{:,.0f}"),
            "-" if energy_j is None else f"{j_to_wh(energy_j):.2f} Wh",
            _fmt(row["j_per_token"], "{:.4f}"),
        )
    out.print(table)


def _gpus_cell(row: dict[str, Any]) -> str:
    """GPU indices; a run on several nodes names each GPU's node (``a:0,a:1,b:0``)."""
    nodes = row.get("gpu_nodes") or []
    if len(set(nodes)) > 1:
        return ",".join(f"{n}:{i}" for n, i in zip(nodes, row["gpus"], strict=True))
    return ",".join(map(str, row["gpus"])) or _fmt(row["gpu_count"], "({} wanted)")


def _print_ranks(job: dict[str, Any], as_json: bool) -> None:
    from reports.ranks import stragglers

    members = job.get("members") or []
    view = stragglers([(m["rank"], m["steps_per_s"]) for m in members
                       if m["state"] == "running"])
    if as_json:
        summary = None if view is None else {
            "slowest_rank": view.slowest_rank, "slowest_steps_per_s": view.slowest_steps_per_s,
            "fastest_rank": view.fastest_rank, "fastest_steps_per_s": view.fastest_steps_per_s,
            "spread": view.spread,
        }
        typer.echo(json.dumps({"job": job["id"], "members": members, "stragglers": summary},
                              indent=2))
        return
    table = Table("Rank", "Node", "Local", "PID", "GPUs", "State", "Steps", "Steps/s",
                  "Step time", "Tokens", box=box.SIMPLE_HEAD,
                  title=f"job {job['id']} ({escape(job['name'])}): {len(members)} members")
    for m in members:
        slow = view is not None and m["rank"] == view.slowest_rank and m["state"] == "running"
        table.add_row(
            f"{m['rank']}{' (slowest)' if slow else ''}", escape(m["node"]),
            str(m["local_rank"]), str(m["pid"]), ",".join(map(str, m["gpus"])) or "-",
            m["state"], f"{m['steps']:,}", _fmt(m["steps_per_s"], "{:.2f}"),
            _fmt(m["step_time_s"], "{:.3f} s"), f"{m['tokens']:,}",
        )
    out.print(table)
    out.print(view.sentence() if view else "no step rates yet (fewer than two ranks reporting)")


@app.command()
def cancel(
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    socket: SocketOpt = None,
    url: UrlOpt = None,
) -> None:
    """Cancel a job: a queued one at once. A running one's ranks stop together at one step (those using the client); what is left then gets SIGTERM, and SIGKILL after the grace period."""  # noqa: E501 - one paragraph, one line (Rich keeps line breaks)
    job = talk(socket, url, lambda c: c.cancel(job_id))
    if job["state"] == "cancelled":
        out.print(f"job {job_id} cancelled")
    elif job.get("hold_step") is not None:
        out.print(f"job {job_id}: every rank stops at step {job['hold_step']}")
    else:
        out.print(f"job {job_id}: stopping (SIGTERM now, SIGKILL after the grace period)")


@app.command()
def checkpoint(
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    socket: SocketOpt = None,
    url: UrlOpt = None,
) -> None:
    """Have every rank of a running job call its checkpoint hook at one step, and go on."""
    job = talk(socket, url, lambda c: c.checkpoint(job_id))
    out.print(f"job {job_id}: every rank checkpoints at step {job['hold_step']}")


@app.command()
def resume(
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    socket: SocketOpt = None,
    url: UrlOpt = None,
) -> None:
    """Let a paused job run again."""
    job = talk(socket, url, lambda c: c.resume(job_id))
    out.print(f"job {job_id} {job['state']}")


@app.command()
def budget(
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    watts: Annotated[float | None, typer.Option(help="New wattage budget per GPU, W.")] = None,
    energy_wh: Annotated[
        float | None, typer.Option("--energy-wh", help="New energy budget, Wh.")
    ] = None,
    socket: SocketOpt = None,
    url: UrlOpt = None,
) -> None:
    """Change a job's budgets."""
    from scheduler.schemas import UpdateRequest

    if watts is None and energy_wh is None:
        fail("give --watts and/or --energy-wh", EXIT_USAGE)
    try:
        req = UpdateRequest(watts=watts, energy_wh=energy_wh)
    except ValidationError as exc:
        invalid(exc)
    job = talk(socket, url, lambda c: c.update(job_id, req.model_dump(exclude_none=True)))
    out.print(
        f"job {job_id}: {_fmt(job['watts'], '{:.0f} W/GPU')}, {_fmt(job['energy_wh'], '{:.1f} Wh')}"
    )


@app.command()
def logs(
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")
    ] = False,
    stderr: Annotated[bool, typer.Option("--stderr", help="The job's stderr.")] = False,
    socket: SocketOpt = None,
    url: UrlOpt = None,
) -> None:
    """Print a job's output (stdout, or --stderr)."""
    stream = "stderr" if stderr else "stdout"
    offset = 0
    with daemon_client(socket, url) as client:
        from scheduler.apiclient import DaemonError

        try:
            while True:
                chunk = client.log(job_id, stream=stream, offset=offset)
                if chunk["data"]:
                    sys.stdout.write(chunk["data"])
                    sys.stdout.flush()
                offset = chunk["next_offset"]
                if not follow or (chunk["ended"] and not chunk["data"]):
                    return
                if not chunk["data"]:
                    time.sleep(0.5)
        except DaemonError as exc:
            fail(str(exc))


def _applied_settings(settings: Settings) -> dict[int, list[dict[str, Any]]]:
    """Outstanding settings-journal entries of this host, by GPU index (none without a store)."""
    import socket as socket_module

    from sqlalchemy import make_url

    from scheduler.actuators import applied_settings
    from telemetry.store import open_store

    url = make_url(settings.db_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").exists():
        return {}
    store = open_store(settings.db_url)
    try:
        by_gpu = applied_settings(store, socket_module.gethostname())
    finally:
        store.close()
    return {
        index: [
            {"setting": e.describe(), "job": e.job_id, "dry_run": e.dry_run,
             "since": e.applied_at.isoformat() if e.applied_at else None}
            for e in entries
        ]
        for index, entries in by_gpu.items()
    }


@db_app.command("upgrade")
def db_upgrade(
    db: DbOpt = None,
    home: HomeOpt = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Bring the store's schema up to date (Alembic migrations)."""
    settings = build_settings(db=db, home=home)
    from telemetry.store import current_revision, upgrade

    def run() -> str | None:
        settings.home.mkdir(parents=True, exist_ok=True)
        upgrade(settings.db_url, revision)
        return current_revision(settings.db_url)

    out.print(f"schema at revision {guarded(run)}")


@db_app.command("current")
def db_current(db: DbOpt = None, home: HomeOpt = None) -> None:
    """Print the store's schema revision and the latest one this version knows."""
    settings = build_settings(db=db, home=home)
    from telemetry.store import current_revision, head_revision

    now = guarded(lambda: current_revision(settings.db_url))
    out.print(f"current: {now or 'empty database'}; latest: {head_revision()}")


@app.command()
def demo(
    home: Annotated[Path, typer.Option(help="Where the demo's store goes (wiped first).")] = Path(
        ".demo"
    ),
    steps: Annotated[
        int | None,
        typer.Option(min=5, help="Training steps per job (default 100 for the budgeted jobs, "
                                 "1800 for the optimiser's pair)."),
    ] = None,
) -> None:
    """Run the daemon on 8 simulated H100s with real training jobs: two under wattage budgets,
    then one job at the default setting beside the same job under --objective energy. Then show
    a per-job summary (energy, mean power, tokens/s, J/token) and what the optimiser saved
    (energy per token and throughput, both measured)."""
    from scheduler.demo import run_demo

    guarded(lambda: run_demo(home=home, steps=steps, console=out))


def _register_command_modules() -> None:
    """The commands kept in modules of their own: the store's readers and the command groups."""
    from scheduler.cluster.slurm import slurm
    from scheduler.cluster_command import cluster
    from scheduler.nodes_command import nodes
    from scheduler.ray_command import ray
    from scheduler.report_command import report
    from scheduler.tokens_command import tokens

    app.command("report")(report)
    app.command("nodes")(nodes)
    for name, group in (("token", tokens), ("cluster", cluster), ("ray", ray), ("slurm", slurm)):
        app.add_typer(group, name=name)


_register_command_modules()


def main() -> None:
    """Console-script entry point."""
    app()
