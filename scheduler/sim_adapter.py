"""What only a simulated GPU needs from the job service: its load follows the jobs' steps, and its
clock and the jobs' micro-batches stretch their steps.

A real GPU is busy because a job computes on it, and slow because of its clock; a simulated GPU
knows neither by itself. The service tells this adapter, once a control tick, which GPUs its
stepping jobs keep busy, at what duty and at what micro-batch (``follow``; a micro-batch other
than the loop's own changes the GPU's power and time per step, ``energy.gpu_model``), and asks it
how much a job's steps stretch at its GPUs' clocks and micro-batch (``slowdown``, sent to the
client as the ``slowdown`` directive). The daemon adds ``SimulatedGpus`` when its backend is the
simulator (``sim_adapter_for``); everything else gets ``NoSimulation``, which does nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from telemetry.backends.base import GpuBackend
from telemetry.backends.simulated import SimulatedBackend

Load = tuple[tuple[int, ...], float, float]
"""What a busy GPU runs: the pids of its job's processes, the duty its job computes at, and its
micro-batch as a multiple of the loop's own (``SimulatedBackend.set_workload``)."""

WORKLOAD = "training"
"""The workload a busy simulated GPU runs (``telemetry/backends/profiles/workloads.json``)."""


class SimAdapter(Protocol):
    """What the service asks of GPUs that only exist as a model (a no-op for real ones)."""

    def adopt(self, indices: Iterable[int]) -> None:
        """The service (re)starts with jobs on these GPUs: what they run now is taken as what
        it set, so an adopted job's GPUs do not flip to idle and back."""
        ...

    def follow(self, busy: Mapping[int, Load]) -> None:
        """Make the GPUs in ``busy`` run their load, and idle those it made busy that are not."""
        ...

    def slowdown(self, indices: Sequence[int]) -> float:
        """How much a step on these GPUs takes longer than at full clock (1.0: not at all)."""
        ...


class NoSimulation:
    """Real GPUs: jobs load them and their clocks slow them by themselves."""

    def adopt(self, indices: Iterable[int]) -> None:
        pass

    def follow(self, busy: Mapping[int, Load]) -> None:
        pass

    def slowdown(self, indices: Sequence[int]) -> float:
        return 1.0


class SimulatedGpus:
    """The simulator's GPUs, whose load the service drives.

    Only GPUs this adapter made busy (or adopted) are set idle again; others are left as they
    are, since the simulated node outlives the daemon and other processes may set its load.

    Args:
        backend: The simulated node.
    """

    def __init__(self, backend: SimulatedBackend) -> None:
        self._backend = backend
        self._busy: dict[int, Load] = {}

    def adopt(self, indices: Iterable[int]) -> None:
        for index in indices:
            if self._backend.workload(index) is not None:
                pids = tuple(p.pid for p in self._backend.read(index).processes)
                self._busy[index] = (pids, self._backend.duty(index),
                                     self._backend.micro_batch_scale(index))

    def follow(self, busy: Mapping[int, Load]) -> None:
        for index in set(self._busy) - set(busy):
            del self._busy[index]
            self._backend.set_workload(index, None)  # its job stopped stepping or ended
        for index, load in busy.items():
            if self._busy.get(index) != load:
                pids, duty, scale = load
                self._backend.set_workload(index, WORKLOAD, pids=pids, duty=duty,
                                           micro_batch_scale=scale)
                self._busy[index] = load

    def slowdown(self, indices: Sequence[int]) -> float:
        # Data-parallel steps wait for the slowest GPU.
        return max((self._backend.step_slowdown(i) for i in indices), default=1.0)


def sim_adapter_for(backend: GpuBackend) -> SimAdapter:
    """``SimulatedGpus`` for the simulator, ``NoSimulation`` for any other backend (real GPUs,
    and replayed traces, whose driver moves them itself)."""
    if isinstance(backend, SimulatedBackend):
        return SimulatedGpus(backend)
    return NoSimulation()
