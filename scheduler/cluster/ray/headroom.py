"""What Ray may place on a node: its power headroom, less what jobs outside Ray hold.

Pure and standard library only: the daemon's service computes it (``JobService.node``) without
Ray installed. Ray itself accounts for the jobs it placed (it holds their ``watts`` while their
tasks run); the node's reservation in Ray (``scheduler.cluster.ray.reserve``) covers the rest:

    headroom = node cap − watts held by jobs outside Ray − idle power of every other GPU

A job is Ray's when its submission carried ``POWERTRAIN_RAY_WATTS`` (the watts Ray holds for it)
from the Ray worker that waits on it: the service checks that the caller is a live process and
records it in ``POWERTRAIN_RAY_WORKER``; once that process is gone (its task was killed), Ray no
longer holds the job's watts and the job counts as outside Ray again. A Ray job whose budget was
raised past what Ray holds counts the excess as outside Ray.

Each GPU not held by a job outside Ray counts at its idle power, so that what Ray places always
fits the daemon's own placement (which counts the idle power of the GPUs left free): Ray is
stricter than the daemon by the idle power of the job's own GPUs, never looser.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

WATTS = "watts"
"""The custom resource every node advertises to Ray: its power headroom, W."""

NODE_RESOURCE_PREFIX = "powertrain-node:"
"""Each Ray node also advertises ``powertrain-node:<node name>: 1``, which pins the node's
reservation to it."""

RAY_WATTS_ENV = "POWERTRAIN_RAY_WATTS"
"""In a job's environment: the watts Ray holds for it (its GPUs × its watts per GPU)."""

RAY_WORKER_ENV = "POWERTRAIN_RAY_WORKER"
"""In a job's environment: ``PID:CREATE_TIME`` of the Ray worker that submitted it and waits on
it (set by the daemon from the caller's credentials, never taken from the request)."""


def node_resource(node: str) -> str:
    """The Ray resource that names powertrain node ``node``."""
    return NODE_RESOURCE_PREFIX + node


@dataclass(frozen=True, slots=True)
class RayClaim:
    """What a job's environment says Ray holds for it.

    Attributes:
        watts: The watts Ray holds for the job, W.
        pid / create_time: The Ray worker waiting on the job (its process's creation time, s
            since the epoch, tells it from a later process with the same pid).
    """

    watts: float
    pid: int
    create_time: float


def ray_claim(env: Mapping[str, str]) -> RayClaim | None:
    """The claim in a job's environment, or ``None`` (none, or malformed)."""
    watts, worker = env.get(RAY_WATTS_ENV), env.get(RAY_WORKER_ENV)
    if watts is None or worker is None:
        return None
    pid, _, created = worker.partition(":")
    try:
        claim = RayClaim(float(watts), int(pid), float(created))
    except ValueError:
        return None
    ok = math.isfinite(claim.watts) and claim.watts >= 0 and claim.pid > 0
    return claim if ok else None


def claim_env(env: Mapping[str, str], pid: int | None, create_time: float | None) -> dict[str, str]:
    """A submitted job's environment with its Ray claim checked.

    ``POWERTRAIN_RAY_WORKER`` is always the daemon's to write: the caller's own is dropped, and
    set to the caller's process (``pid``, ``create_time``) when the request names the watts Ray
    holds for it. Without a caller process (a request over TCP) or with unreadable watts, the
    claim is dropped: the job then counts as outside Ray.
    """
    clean = {k: v for k, v in env.items() if k != RAY_WORKER_ENV}
    watts = clean.get(RAY_WATTS_ENV)
    if watts is None:
        return clean
    try:
        valid = math.isfinite(float(watts)) and float(watts) >= 0
    except ValueError:
        valid = False
    if not valid or pid is None or create_time is None:
        del clean[RAY_WATTS_ENV]
        return clean
    clean[RAY_WORKER_ENV] = f"{pid}:{create_time!r}"
    return clean


@dataclass(frozen=True, slots=True)
class HeldPower:
    """One active job's hold on this node, as the headroom sees it.

    Attributes:
        gpus: Its GPUs on this node.
        budget_w: Its budget on them (watts per GPU × GPUs, or their max limits), W.
        ray_w: The watts Ray holds for it; ``None``: Ray holds none (not placed by Ray, or its
            Ray task is gone).
    """

    gpus: tuple[int, ...]
    budget_w: float
    ray_w: float | None = None


@dataclass(frozen=True, slots=True)
class Headroom:
    """A node's power as Ray should see it.

    Attributes:
        cap_w: The node cap placement checks against, W.
        capacity_w: The ``watts`` a Ray node of this node advertises: the sum of the GPUs' max
            limits (no job can hold more), W.
        gpus: The node's GPUs.
        held_w: Watts held by jobs outside Ray (and by Ray jobs past what Ray holds), W.
        held_gpus: GPUs held by jobs outside Ray.
        idle_w: Idle power of the GPUs not held by jobs outside Ray, W.
        headroom_w: What Ray may hold on the node, W: ``cap − held − idle``, within
            ``0..capacity``.
    """

    cap_w: float
    capacity_w: float
    gpus: int
    held_w: float
    held_gpus: int
    idle_w: float
    headroom_w: float

    def as_json(self) -> dict[str, float | int]:
        """The figures as ``GET /v1/node`` gives them under ``ray``."""
        return {
            "capacity_w": self.capacity_w, "headroom_w": self.headroom_w,
            "held_w": self.held_w, "held_gpus": self.held_gpus, "idle_w": self.idle_w,
        }


def headroom(
    *,
    cap_w: float,
    max_limits_w: Mapping[int, float],
    idle_w: Mapping[int, float],
    jobs: Iterable[HeldPower],
) -> Headroom:
    """What Ray may place on a node.

    Args:
        cap_w: The node cap placement checks against, W.
        max_limits_w: Each GPU's maximum power limit, W, by index.
        idle_w: Each GPU's idle power, W, by index.
        jobs: The node's active jobs.
    """
    held_w = 0.0
    outside: set[int] = set()
    for job in jobs:
        if job.ray_w is None:
            held_w += job.budget_w
            outside.update(job.gpus)
        else:
            held_w += max(0.0, job.budget_w - job.ray_w)
    idle = sum(w for index, w in idle_w.items() if index not in outside)
    capacity = sum(max_limits_w.values())
    room = min(capacity, max(0.0, cap_w - held_w - idle))
    return Headroom(
        cap_w=cap_w, capacity_w=capacity, gpus=len(max_limits_w), held_w=held_w,
        held_gpus=len(outside & set(max_limits_w)), idle_w=idle, headroom_w=room,
    )
