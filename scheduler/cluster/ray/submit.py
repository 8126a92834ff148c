"""Run a command as a powertrain job on the node Ray picks by its ``watts`` headroom.

``submit`` asks Ray for a task with ``{"GPU": N, "watts": N × W}``; Ray's scheduler alone chooses
the node, and the task submits the command to that node's daemon (its socket from the Ray node's
``POWERTRAIN_SOCKET`` / ``POWERTRAIN_HOME``, which Ray's workers inherit from the raylet) with the
GPUs Ray gave it and a budget of W per GPU, then follows the job until it ends. The task streams
its events back (a Ray generator): the job id and node once submitted, its GPUs once it runs, its
output, and how it ended.

Ray is imported inside the functions only: importing this module (the daemon does, through the
package) never needs Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.cluster.ray.headroom import RAY_WATTS_ENV, RAY_WORKER_ENV, WATTS

POLL_S = 0.5
"""How often the task looks at its job and reads its new output, s."""

TERMINAL = frozenset({"completed", "failed", "cancelled", "stopped"})
"""The states a job ends in (``scheduler.jobs.TERMINAL_STATES`` by value)."""

# What Ray adds to its workers' environment, which the job, a process of the daemon's, must not
# inherit: Ray's own variables, the GPUs as Ray numbered them (the daemon sets the job's), and
# the one thread Ray gives a task of no CPUs.
_RAY_ONLY = frozenset({"CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PYTHONBREAKPOINT", "SPT_NOENV"})


class RayJobError(RuntimeError):
    """Ray or the node's daemon refused or lost the job; the message is for people."""


@dataclass(frozen=True, slots=True)
class RayJob:
    """A job Ray placed, as it ended.

    Attributes:
        job_id: Its id in the daemon of ``node``.
        node: The powertrain node Ray placed it on.
        gpus: Its GPUs there.
        state: How it ended: ``completed``, ``failed``, ``cancelled`` or ``stopped``.
        exit_code: Its command's exit status (``None`` when it had none).
        end_reason: Why it ended, in words.
        energy_j: Its energy, J.
    """

    job_id: int
    node: str
    gpus: tuple[int, ...]
    state: str
    exit_code: int | None
    end_reason: str | None
    energy_j: float | None

    @property
    def returncode(self) -> int:
        """An exit status for the job: its command's, or 1 when it failed without one."""
        if self.exit_code is not None:
            return self.exit_code
        return 0 if self.state == "completed" else 1

    def as_json(self) -> dict[str, Any]:
        return {
            "job": self.job_id, "node": self.node, "gpus": list(self.gpus), "state": self.state,
            "exit_code": self.exit_code, "end_reason": self.end_reason, "energy_j": self.energy_j,
        }


Event = dict[str, Any]
"""What ``submit`` tells as it goes: ``{"event": "asking", "gpus", "watts"}`` before it asks Ray;
then what the task streams back: ``{"event": "submitted", "job", "node"}``, ``{"event":
"started", "gpus"}``, ``{"event": "output", "stream", "data"}``, ``{"event": "ended", "job":
RayJob.as_json()}``."""


def submit(
    argv: Sequence[str],
    *,
    gpus: int = 1,
    watts: float,
    energy_wh: float | None = None,
    name: str | None = None,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    mode: str = "auto",
    on_exceed: str = "warn",
    priority: int = 0,
    cpus: float = 0.0,
    address: str | None = None,
    output: bool = True,
    on_event: Callable[[Event], None] | None = None,
) -> RayJob:
    """Run ``argv`` as a powertrain job wherever Ray finds ``gpus`` GPUs and ``gpus × watts``
    watts, and wait until it ends.

    Args:
        argv: The command.
        gpus: How many GPUs.
        watts: The wattage budget per GPU, W (Ray holds ``gpus × watts`` of the node's
            ``watts`` while the job runs).
        energy_wh / name / mode / on_exceed / priority: As for ``powertrain submit``.
        cwd: The job's folder on the node (default: this process's).
        env: Variables for the job, over the Ray node's environment.
        cpus: CPUs the Ray task holds while it waits on the job (default none).
        address: The Ray cluster (default ``RAY_ADDRESS``, else ``auto``); unused when this
            process is already connected to Ray.
        output: Stream the job's output to ``on_event`` (``output`` events).
        on_event: Called with each event as it comes (see ``Event``).

    Returns:
        How the job ended.

    Raises:
        ValueError: The request is not valid (the message names the field).
        RayJobError: Ray is not installed or cannot be reached, the node's daemon refused the
            job, or the task was lost.
    """
    from pydantic import ValidationError

    from scheduler.schemas import SubmitRequest

    ray_w = gpus * watts
    body: dict[str, Any] = {
        "name": name or (os.path.basename(argv[0]) if argv else None), "argv": list(argv),
        "cwd": cwd or os.getcwd(), "env": dict(env or {}), "watts": watts,
        "energy_wh": energy_wh, "mode": mode, "on_exceed": on_exceed, "priority": priority,
    }
    try:
        SubmitRequest.model_validate(body | {"gpus": gpus})  # refuse here, not on the node
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{field}: {first['msg'].removeprefix('Value error, ')}") from None
    if on_event is not None:
        on_event({"event": "asking", "gpus": gpus, "watts": ray_w})
    ray = _import_ray()
    if not ray.is_initialized():
        where = address or os.environ.get("RAY_ADDRESS") or "auto"
        problem = head_unreachable(where)
        if problem is not None:
            raise RayJobError(problem)
        try:
            ray.init(address=where, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayJobError(f"cannot connect to Ray: {exc}") from exc
    task = ray.remote(_job_events).options(
        num_returns="streaming", num_cpus=cpus, num_gpus=gpus, resources={WATTS: ray_w},
        max_retries=0, name=f"powertrain:{body['name']}",
    )
    events = task.remote(body, gpus, ray_w, output)
    ended: RayJob | None = None
    try:
        for ref in events:
            try:
                event: Event = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                raise RayJobError(str(cause).strip().splitlines()[-1]) from None
            except ray.exceptions.RayError as exc:
                raise RayJobError(f"Ray lost the task: {exc}") from None
            if event["event"] == "ended":
                job = event["job"]
                ended = RayJob(job["job"], job["node"], tuple(job["gpus"]), job["state"],
                               job["exit_code"], job["end_reason"], job["energy_j"])
            if on_event is not None:
                on_event(event)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            ray.cancel(events)  # the task cancels its job
        raise
    if ended is None:
        raise RayJobError("the Ray task ended without saying how its job ended")
    return ended


def head_unreachable(address: str) -> str | None:
    """Why Ray's head at ``address`` (``HOST:PORT``) does not answer now, or ``None`` (it does,
    or the address has another form, left to Ray). ``ray.init`` would wait minutes for it."""
    from scheduler.settings import host_port

    try:
        host, port = host_port(address)
    except ValueError:
        return None
    try:
        socket.create_connection((host, port), timeout=2.0).close()
    except OSError as exc:
        return f"Ray at {address} does not answer ({exc.strerror or exc})"
    return None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayJobError(
            "Ray is not installed here: pip install 'powertrain[ray]'"
        ) from None
    return ray


def job_env(environ: Mapping[str, str]) -> dict[str, str]:
    """A Ray worker's environment less what Ray added for its own use (and less any Ray claim
    of an enclosing job: the daemon gives this job its own)."""
    return {
        k: v for k, v in environ.items()
        if not k.startswith("RAY_") and k not in _RAY_ONLY
        and k not in (RAY_WATTS_ENV, RAY_WORKER_ENV)
    }


def _job_events(
    body: dict[str, Any], gpus: int, ray_w: float, output: bool
) -> Iterator[Event]:
    """The Ray task: submit the job to this node's daemon, follow it, stream what happens."""
    import ray

    from scheduler.apiclient import DaemonClient, DaemonError
    from scheduler.settings import Settings

    settings = Settings()  # the raylet's POWERTRAIN_SOCKET / POWERTRAIN_HOME
    with DaemonClient(settings.socket_path, timeout_s=30.0) as client:
        try:
            node = str(client.node()["node"])
            ids = sorted(int(i) for i in ray.get_gpu_ids())
            free = {int(row["index"]) for row in client.gpus() if row.get("job") is None}
            request = dict(body)
            # The GPUs Ray gave the task, when the daemon has them free; else as many as the
            # daemon finds (Ray numbers GPUs alike, but cannot see those jobs outside Ray hold).
            if len(ids) == gpus and set(ids) <= free:
                request["gpu_ids"] = ids
            else:
                request["gpus"] = gpus
            request["env"] = job_env(os.environ) | dict(body["env"]) | {RAY_WATTS_ENV: repr(ray_w)}
            job = client.submit(request)
        except DaemonError as exc:
            raise RayJobError(f"powertrain node daemon: {exc}") from None
        job_id = int(job["id"])
        yield {"event": "submitted", "job": job_id, "node": node}
        try:
            yield from _follow(client, job_id, node, output)
        except BaseException:  # cancelled (the driver went away, ray.cancel): so is the job
            with contextlib.suppress(Exception):
                client.cancel(job_id)
            raise


def _follow(client: Any, job_id: int, node: str, output: bool) -> Iterator[Event]:
    """Follow job ``job_id`` until it ends: its start, its output, its end."""
    offsets = {"stdout": 0, "stderr": 0}
    started = False
    while True:
        view = client.job(job_id)
        if not started and view["state"] != "queued":
            started = True
            yield {"event": "started", "gpus": view["gpus"]}
        ended = view["state"] in TERMINAL
        if output:
            for stream in ("stdout", "stderr"):
                while True:  # all of it once the job has ended
                    chunk = client.log(job_id, stream=stream, offset=offsets[stream])
                    offsets[stream] = chunk["next_offset"]
                    if chunk["data"]:
                        yield {"event": "output", "stream": stream, "data": chunk["data"]}
                    if not (ended and chunk["data"]):
                        break
        if ended:
            job = RayJob(job_id, node, tuple(view["gpus"]), view["state"], view["exit_code"],
                         view["end_reason"], view["energy_j"])
            yield {"event": "ended", "job": job.as_json()}
            return
        time.sleep(POLL_S)
