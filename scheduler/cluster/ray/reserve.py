"""``powertrain ray reserve``: keep what Ray may use of a node equal to the node's headroom.

A node's Ray node advertises the node's whole capacity (``powertrain ray resources``: ``watts``
= the sum of its GPUs' max limits, its GPUs, and ``powertrain-node:<name>``). This loop holds back
the rest: once a second it asks the node's daemon for its headroom (``GET /v1/node``), and keeps
a reservation in Ray of ``capacity − headroom`` watts and of the GPUs that jobs outside Ray hold,
as detached placement groups pinned to the node (``ledger``: chunks added and removed, never
resized). Jobs started, ended or re-budgeted outside Ray, and changes of the node cap, so change
what Ray may place there within about two seconds.

The placement groups are detached and named ``powertrain-reserve:<node>:<ns>``: they outlive
this loop (the jobs outside Ray go on running when it or the daemon stops), and the next loop
adopts them. Restarting Ray drops them, as it drops everything it holds.

The daemon runs this loop as a child process when started with ``--ray-address``
(``scheduler.cluster.ray.supervise``); it can also run on its own.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from scheduler.apiclient import DaemonClient, DaemonError
from scheduler.cluster.ray.headroom import WATTS, node_resource
from scheduler.cluster.ray.ledger import Amount, Change, Chunk, plan, wanted
from scheduler.cluster.ray.submit import head_unreachable

log = logging.getLogger(__name__)

NAMESPACE = "powertrain"
"""The Ray namespace of the reservation's placement groups."""

CHUNK_PREFIX = "powertrain-reserve:"
PIN_AMOUNT = 0.001
"""How much of the node's ``powertrain-node:<name>`` resource each chunk takes (to be placed on
that node only)."""

POLL_S = 1.0
FIND_NODE_S = 2.0


class Reserver:
    """The reservation of one node in Ray (the caller is connected to Ray).

    Args:
        ray: The ``ray`` module.
        client: The node's daemon.
    """

    def __init__(self, ray: Any, client: DaemonClient) -> None:
        self._ray = ray
        self._client = client
        self.node = str(client.node()["node"])
        self._prefix = f"{CHUNK_PREFIX}{self.node}:"
        self._chunks: list[Chunk] = []
        self._groups: dict[str, Any] = {}
        self._warned_capacity = False
        self._said: str | None = None

    def find_ray_node(self) -> tuple[float, int] | None:
        """The ``watts`` and GPUs this node's Ray node advertises, or ``None`` when no live Ray
        node advertises ``powertrain-node:<name>``."""
        pin = node_resource(self.node)
        for n in self._ray.nodes():
            resources = n.get("Resources", {})
            if n.get("Alive") and pin in resources:
                return float(resources.get(WATTS, 0.0)), int(resources.get("GPU", 0))
        return None

    def adopt(self) -> None:
        """Take over the chunks a previous loop left for this node (oldest first)."""
        table = self._ray.util.placement_group_table()
        found: list[tuple[str, Amount]] = []
        for info in table.values():
            name = info.get("name") or ""
            if not name.startswith(self._prefix) or info.get("state") == "REMOVED":
                continue
            bundle: dict[str, float] = next(iter(info.get("bundles", {}).values()), {})
            found.append((name, Amount(float(bundle.get(WATTS, 0.0)), int(bundle.get("GPU", 0)))))
        for name, amount in sorted(found):
            self._groups[name] = self._ray.util.get_placement_group(name)
            self._chunks.append(Chunk(name, amount))
        if found:
            log.info("adopted the reservation of %s: %s", self.node, _held(self._chunks))

    def step(self, capacity: tuple[float, int]) -> Change | None:
        """Bring the reservation to what the daemon's headroom asks now, on a Ray node of
        ``capacity`` (watts, GPUs); the change made."""
        info = self._client.node()["ray"]
        watts, gpus = capacity
        if watts + 1e-6 < float(info["capacity_w"]) and not self._warned_capacity:
            self._warned_capacity = True
            log.warning(
                "the Ray node of %s advertises %g watts, less than the node's %g W: Ray will "
                "place less there than it could (restart that Ray node with the flags of "
                "`powertrain ray resources`)", self.node, watts, info["capacity_w"],
            )
        want = wanted(capacity_w=watts, capacity_gpus=gpus,
                      headroom_w=float(info["headroom_w"]), held_gpus=int(info["held_gpus"]))
        change = plan(self._chunks, want)
        if change is not None:
            self._apply(change)
        said = (f"reserving {_held(self._chunks)} of the Ray node of {self.node} "
                f"(headroom {float(info['headroom_w']):.0f} W of {watts:g}; outside Ray: "
                f"{float(info['held_w']):.0f} W on {info['held_gpus']} GPUs)")
        if said != self._said:
            log.info("%s", said)
            self._said = said
        return change

    def _apply(self, change: Change) -> None:
        if change.add is not None:
            name = f"{self._prefix}{time.time_ns():020d}"
            bundle: dict[str, float] = {node_resource(self.node): PIN_AMOUNT}
            if change.add.watts > 0:
                bundle[WATTS] = change.add.watts
            if change.add.gpus > 0:
                bundle["GPU"] = float(change.add.gpus)
            self._groups[name] = self._ray.util.placement_group(
                [bundle], strategy="STRICT_PACK", name=name, lifetime="detached"
            )
            self._chunks.append(Chunk(name, change.add))
        for name in change.remove:
            self._ray.util.remove_placement_group(self._groups.pop(name))
            self._chunks = [c for c in self._chunks if c.name != name]


def _held(chunks: list[Chunk]) -> str:
    total = sum((c.amount for c in chunks), Amount())
    gpus = "1 GPU" if total.gpus == 1 else f"{total.gpus} GPUs"
    return f"{total.watts:.0f} W and {gpus}"


def run(
    address: str, client: DaemonClient, *, stop: threading.Event, poll_s: float = POLL_S,
    exit_with_parent: bool = False, connect: Callable[[], Any] | None = None,
) -> int:
    """Keep the node's reservation until ``stop`` is set; the exit status.

    Args:
        address: The Ray cluster's address.
        client: The node's daemon.
        stop: Set to end the loop (the reservation stays).
        poll_s: How often to look at the daemon's headroom, s.
        exit_with_parent: End when the process that started this one has gone (the daemon:
            its next start runs a loop of its own, which adopts the reservation).
        connect: Connects to Ray and returns the ``ray`` module (tests).

    Raises:
        DaemonError: The daemon could not be reached at the start.
        ImportError: Ray is not installed.
    """
    parent = os.getppid() if exit_with_parent else None
    _stop_on_signals(stop)
    if connect is None and not _answers(address, stop):
        return 0
    ray = connect() if connect is not None else _connect(address)
    _stop_on_signals(stop)  # again: ray.init makes SIGTERM exit at once
    reserver = Reserver(ray, client)
    capacity = None
    while capacity is None:
        capacity = reserver.find_ray_node()
        if capacity is None:
            log.warning("no live Ray node advertises %s: start this node's Ray node with the "
                        "flags of `powertrain ray resources`", node_resource(reserver.node))
            if stop.wait(FIND_NODE_S):
                return 0
    log.info("Ray node of %s found: %g watts, %d GPUs", reserver.node, *capacity)
    reserver.adopt()
    unreachable = False
    while not stop.is_set():
        if parent is not None and os.getppid() != parent:
            log.info("the daemon has gone: the reservation stays for its next start")
            return 0
        try:
            capacity = reserver.find_ray_node() or capacity  # its Ray node may have restarted
            reserver.step(capacity)
            unreachable = False
        except DaemonError as exc:  # the daemon restarting: the reservation stays as it is
            if not unreachable:
                log.warning("cannot read the node's headroom: %s", exc)
            unreachable = True
        stop.wait(poll_s)
    return 0


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (in the main thread; elsewhere the caller sees to it)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def _answers(address: str, stop: threading.Event) -> bool:
    """Wait until Ray's head at ``HOST:PORT`` accepts connections (``ray.init`` would wait for
    minutes on one that is down); ``False`` when ``stop`` was set first. Other forms of address
    are left to Ray."""
    said = False
    while not stop.is_set():
        problem = head_unreachable(address)
        if problem is None:
            return True
        if not said:
            log.warning("%s; waiting for it", problem)
            said = True
        stop.wait(FIND_NODE_S)
    return False


def _connect(address: str) -> Any:
    import ray

    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING,
             log_to_driver=False)
    return ray
