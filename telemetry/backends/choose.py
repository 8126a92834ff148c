"""Choosing a backend: explicitly, or by a detection that says what it found."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from telemetry.backends.base import GpuBackend
from telemetry.clock import Clock

log = logging.getLogger(__name__)

BackendKind = Literal["auto", "nvml", "simulated", "replay"]

DEFAULT_SIM_GPUS = 4
DEFAULT_SIM_SKU = "H100-SXM"


def open_backend(
    kind: BackendKind,
    *,
    sim_gpus: int | None = None,
    sim_sku: str | None = None,
    sim_state_path: Path | None = None,
    clock: Clock | None = None,
    trace: str | None = None,
    trace_workload: str | None = None,
    trace_batch_size: int | None = None,
) -> tuple[GpuBackend, str]:
    """Open a backend and say why it was chosen.

    ``auto`` uses NVML when an NVIDIA driver answers, else the simulator; it never falls back
    silently: the returned sentence says which it chose and why. A simulated node keeps its shape
    (GPU count, SKU) in its state file, like real hardware: unset ``sim_gpus``/``sim_sku`` take
    the saved node's, and values that contradict it are refused.

    ``replay`` plays one curve of a measured trace (``trace``: a bundled name such as ``a40``, or
    a file) on ``sim_gpus`` GPUs (default ``DEFAULT_SIM_GPUS``); the workload defaults to the
    file's first and the batch size to that workload's largest (``replay.default_curve``).
    Nothing of a replayed node is saved, and ``sim_sku`` does not apply to it.

    Raises:
        BackendUnavailableError: ``nvml`` was asked for and no driver answers.
        ValueError: Unknown simulated SKU, a shape that contradicts the saved node, ``replay``
            without a trace, or a trace file that is not in the trace format.
        LookupError: ``replay`` with an unknown trace, workload or batch size (the message
            lists the choices).
    """
    if kind == "replay":
        return _open_replay(trace, trace_workload, trace_batch_size, sim_gpus, clock)
    if kind == "nvml":
        from telemetry.backends.nvml import NvmlBackend

        return NvmlBackend(), "using NVML (asked for)"
    if kind == "auto":
        from telemetry.backends.nvml import NvmlBackend, nvml_available

        ok, why = nvml_available()
        if ok:
            return NvmlBackend(), "NVIDIA driver found: using NVML"
        reason = f"no NVIDIA driver found ({why}): using the simulated backend"
    else:
        reason = "using the simulated backend (asked for)"
    from telemetry.backends.simulated import SimulatedBackend, saved_node_shape

    saved = saved_node_shape(sim_state_path) if sim_state_path is not None else None
    gpus = sim_gpus or (saved[0] if saved else DEFAULT_SIM_GPUS)
    sku = sim_sku or (saved[1] if saved else DEFAULT_SIM_SKU)
    if saved is not None and saved != (gpus, sku):
        raise ValueError(
            f"the simulated node in {sim_state_path} has {saved[0]} × {saved[1]}, not "
            f"{gpus} × {sku}: leave out --sim-gpus/--sim-sku, or delete that file for a new node"
        )
    backend = SimulatedBackend(gpus=gpus, sku=sku, clock=clock, state_path=sim_state_path)
    return backend, f"{reason}: {gpus} × {sku}"


def _open_replay(
    trace: str | None,
    workload: str | None,
    batch_size: int | None,
    gpus: int | None,
    clock: Clock | None,
) -> tuple[GpuBackend, str]:
    """The replay backend for ``open_backend``, and the sentence that says what it plays."""
    from telemetry.backends.replay import ReplayBackend, default_curve
    from telemetry.backends.traces import bundled_traces

    if not trace:
        raise ValueError(
            "the replay backend needs a trace: a bundled one ("
            + ", ".join(bundled_traces())
            + ") or a trace file"
        )
    workload, batch_size = default_curve(trace, workload, batch_size)
    count = gpus or DEFAULT_SIM_GPUS
    backend = ReplayBackend(trace, workload, batch_size, gpus=count, clock=clock)
    curve = backend.curve
    return backend, (
        f"replaying {trace} ({curve.workload} bs={curve.batch_size}): {count} × {curve.gpu}"
    )
