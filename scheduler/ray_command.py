"""``powertrain ray resources|submit|reserve``: Ray places jobs by each node's power headroom.

``resources`` prints the flags that start a node's Ray node with the node's ``watts``;
``submit`` runs a command as a powertrain job wherever Ray finds its GPUs and watts;
``reserve`` keeps a node's reservation in Ray equal to what jobs outside Ray hold (the daemon
runs it with ``--ray-address``). See docs/ray.md. Ray is imported by ``scheduler.cluster.ray``
only, when a command needs it. Every failure is one ``error: ...`` line and a non-zero exit.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from scheduler.store_access import EXIT_ERROR, EXIT_USAGE, fail

ray = typer.Typer(
    help="Ray places jobs on powertrain's nodes by their power headroom (docs/ray.md): each "
    "node's Ray node advertises `watts`, which its daemon keeps equal to the node's headroom.",
    no_args_is_help=True,
)

SocketOpt = Annotated[Path | None, typer.Option(
    "--socket", help="The node daemon's API socket. Env: POWERTRAIN_SOCKET.")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="The Ray cluster, HOST:PORT of its head (default: RAY_ADDRESS, else the "
    "cluster this machine runs).")]

err = Console(stderr=True, highlight=False, soft_wrap=True)


def _socket_path(socket: Path | None) -> Path:
    from pydantic import ValidationError

    from scheduler.settings import Settings

    try:
        settings = Settings() if socket is None else Settings(socket=socket)
        return settings.socket_path
    except ValidationError as exc:
        fail(f"invalid settings: {exc.errors()[0]['msg']}", EXIT_USAGE)


def _node(socket: Path | None) -> tuple[dict[str, Any], Path]:
    from scheduler.apiclient import DaemonClient, DaemonError

    path = _socket_path(socket)
    with DaemonClient(path) as client:
        try:
            return client.node(), path
        except DaemonError as exc:
            fail(str(exc), EXIT_ERROR)


@ray.command("resources")
def resources(
    socket: SocketOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Print the `ray start` flags of this node: --num-gpus and --resources with `watts` (the sum of the GPUs' max limits: the daemon holds back what is not headroom) and `powertrain-node:NAME`. Start the node's Ray with them, and with POWERTRAIN_SOCKET set so that Ray's workers find the daemon: POWERTRAIN_SOCKET=SOCKET ray start --address HEAD $(powertrain ray resources)"""  # noqa: E501 - one paragraph, one line (Rich keeps line breaks)
    from scheduler.cluster.ray.headroom import WATTS, node_resource

    info, path = _node(socket)
    capacity = float(info["ray"]["capacity_w"])
    res: dict[str, float] = {WATTS: int(capacity) if capacity.is_integer() else capacity,
                             node_resource(str(info["node"])): 1}
    if as_json:
        typer.echo(json.dumps({"node": info["node"], "num_gpus": info["gpus"], "resources": res,
                               "env": {"POWERTRAIN_SOCKET": str(path)}}))
        return
    typer.echo(f"--num-gpus {info['gpus']} --resources {shlex.quote(json.dumps(res))}")


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            fail(f"--env: expected NAME=VALUE, got {pair!r}", EXIT_USAGE)
        env[name] = value
    return env


@ray.command("submit", context_settings={"allow_interspersed_args": False})
def submit(
    command: Annotated[
        list[str], typer.Argument(help="The command to run, after --.", show_default=False)
    ],
    watts: Annotated[float, typer.Option(
        help="Wattage budget per GPU, W: Ray holds GPUs × this of a node's `watts`.",
        show_default=False)],
    gpus: Annotated[int, typer.Option(help="How many GPUs.")] = 1,
    energy_wh: Annotated[
        float | None, typer.Option("--energy-wh", help="Energy budget of the whole job, Wh.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Job name (default: the command).")] = None,
    cwd: Annotated[
        str | None, typer.Option(help="The job's folder on its node (default: this one).")
    ] = None,
    env: Annotated[list[str] | None, typer.Option(
        "--env", help="NAME=VALUE for the job, over the Ray node's environment (repeatable).")
    ] = None,
    mode: Annotated[
        str, typer.Option(help="How the wattage budget is held: auto, hw, clock or soft.")
    ] = "auto",
    on_exceed: Annotated[str, typer.Option(
        "--on-exceed", help="When the energy budget runs out: warn, slow, pause or stop.")
    ] = "warn",
    priority: Annotated[int, typer.Option(help="Higher runs first on its node.")] = 0,
    cpus: Annotated[float, typer.Option(
        help="CPUs the Ray task holds while it waits on the job.", min=0)] = 0.0,
    address: AddressOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print how the job ended as JSON (and not its output).")] = False,
) -> None:
    """Run a command as a powertrain job on the node Ray chooses: Ray places a task that asks for {"GPU": N, "watts": N × W}, which submits the command to that node's daemon with the GPUs Ray gave it and a budget of W per GPU, and waits. The job's id and node go to stderr, its output to stdout and stderr; the exit status is the job's.

    Example: powertrain ray submit --gpus 2 --watts 300 -- python train.py
    """  # noqa: E501 - one paragraph, one line (Rich keeps line breaks)
    from scheduler.cluster.ray.submit import Event, RayJobError
    from scheduler.cluster.ray.submit import submit as ray_submit

    def show(event: Event) -> None:
        kind = event["event"]
        if kind == "asking":
            s = "" if event["gpus"] == 1 else "s"
            err.print(f"asking Ray for {event['gpus']} GPU{s} and {event['watts']:g} watts")
        elif kind == "submitted":
            err.print(f"job {event['job']} on {escape(str(event['node']))}")
        elif kind == "started":
            err.print(f"running on GPUs {', '.join(str(g) for g in event['gpus'])}")
        elif kind == "output":
            stream = sys.stdout if event["stream"] == "stdout" else sys.stderr
            stream.write(event["data"])
            stream.flush()

    job_env = _parse_env(env or [])
    try:
        job = ray_submit(
            command, gpus=gpus, watts=watts, energy_wh=energy_wh, name=name, cwd=cwd,
            env=job_env, mode=mode, on_exceed=on_exceed, priority=priority,
            cpus=cpus, address=address, output=not as_json, on_event=show,
        )
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    except RayJobError as exc:
        fail(str(exc), EXIT_ERROR)
    how = job.end_reason or job.state
    err.print(f"job {job.job_id} on {escape(job.node)} {job.state}: {escape(how)}")
    if as_json:
        typer.echo(json.dumps(job.as_json()))
    raise typer.Exit(job.returncode)


@ray.command("reserve")
def reserve(
    address: Annotated[str | None, typer.Option(
        "--address", help="The Ray cluster, HOST:PORT of its head. Env: POWERTRAIN_RAY_ADDRESS.",
        show_default=False)] = None,
    socket: SocketOpt = None,
    exit_with_parent: Annotated[bool, typer.Option(
        "--exit-with-parent", help="End when the process that started it ends (the daemon).",
        hidden=True)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Keep this node's reservation in Ray equal to what jobs outside Ray hold, until SIGTERM: the daemon runs this itself when started with --ray-address; run it alone for a daemon started without."""  # noqa: E501 - one paragraph, one line (Rich keeps line breaks)
    from scheduler.apiclient import DaemonClient, DaemonError
    from scheduler.cluster.ray import reserve as loop

    where = address or os.environ.get("POWERTRAIN_RAY_ADDRESS")
    if not where:
        fail("give the Ray cluster's address: --address HOST:PORT", EXIT_USAGE)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s powertrain ray reserve: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a request a second
    stop = threading.Event()  # set by SIGTERM and SIGINT
    with DaemonClient(_socket_path(socket)) as client:
        try:
            code = loop.run(where, client, stop=stop, exit_with_parent=exit_with_parent)
        except DaemonError as exc:
            fail(str(exc), EXIT_ERROR)
        except ImportError:
            fail("Ray is not installed here: pip install 'powertrain[ray]'", EXIT_ERROR)
    raise typer.Exit(code)
