"""Choosing a backend: explicitly, or by a detection that says what it found."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from telemetry.backends.base import GpuBackend
from telemetry.clock import Clock

log = logging.getLogger(__name__)

BackendKind = Literal["auto", "nvml", "simulated"]


def open_backend(
    kind: BackendKind,
    *,
    sim_gpus: int = 4,
    sim_sku: str = "H100-SXM",
    sim_state_path: Path | None = None,
    clock: Clock | None = None,
) -> tuple[GpuBackend, str]:
    """Open a backend and say why it was chosen.

    ``auto`` uses NVML when an NVIDIA driver answers, else the simulator; it never falls back
    silently: the returned sentence says which it chose and why.

    Raises:
        BackendUnavailableError: ``nvml`` was asked for and no driver answers.
        ValueError: Unknown simulated SKU.
    """
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
    from telemetry.backends.simulated import SimulatedBackend

    backend = SimulatedBackend(gpus=sim_gpus, sku=sim_sku, clock=clock, state_path=sim_state_path)
    return backend, f"{reason}: {sim_gpus} × {sim_sku}"
