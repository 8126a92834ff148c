"""SKU profiles and named workloads of the simulated GPU, loaded from the JSON files beside this.

``skus.json`` holds one profile per GPU SKU (datasheet facts plus the model's static power,
``P_dyn_max`` and ``k``; for SKUs with measured traces those are written by
``bench/calibrate_sim.py --write-profiles``). ``workloads.json`` holds named workloads: the generic
``training`` workload and the workloads fitted to traces, keyed ``<SKU>/<dataset>/<network>/bs<N>``.
Their micro-batch terms (``micro_batch_overhead``, ``micro_batch_activity_exp``; absent: no term)
are fitted per batch-size family by the same bench, ``training``'s as medians over the families.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from energy.gpu_model import GpuModel, WorkloadModel

__all__ = [
    "PROFILES_DIR",
    "SKUS_PATH",
    "WORKLOADS_PATH",
    "SkuProfile",
    "Workload",
    "find_sku",
    "get_sku",
    "get_workload",
    "load_skus",
    "load_workloads",
    "sku_to_json",
    "workload_to_json",
]

PROFILES_DIR = Path(__file__).resolve().parent
SKUS_PATH = PROFILES_DIR / "skus.json"
WORKLOADS_PATH = PROFILES_DIR / "workloads.json"


@dataclass(frozen=True, slots=True)
class SkuProfile:
    """One GPU SKU as the simulator models it.

    Attributes:
        name: Profile key, e.g. ``H100-SXM``.
        product_name: What NVML reports (``nvidia-smi --query-gpu=name``).
        aliases: Lower-case names that map a trace's GPU name to this profile (``a40``).
        tdp_w: Thermal design power, W.
        min_limit_w / max_limit_w / default_limit_w: Power limit range and default, W.
        idle_power_w: Power of an idle GPU, W.
        idle_sm_clock_mhz: SM clock of an idle GPU, MHz.
        static_power_w: Power of a busy GPU that does not scale with the clock, W.
        dyn_power_max_w: Dynamic power at the top clock for activity 1, W.
        k: Clock exponent of dynamic power.
        sm_clock_min_mhz / sm_clock_max_mhz / sm_clock_step_mhz: Supported SM clocks, MHz.
        mem_clock_mhz / mem_clock_idle_mhz: Memory clock busy and idle, MHz.
        memory_total_mib: Framebuffer size, MiB.
        ambient_c: Temperature of an unpowered GPU, °C.
        thermal_c_per_w: Steady-state temperature rise per watt, °C/W.
        thermal_time_constant_s: Time constant of the first-order thermal lag, s.
        calibrated_from: The trace the model parameters were fitted to, or None.
    """

    name: str
    product_name: str
    aliases: tuple[str, ...]
    tdp_w: float
    min_limit_w: float
    max_limit_w: float
    default_limit_w: float
    idle_power_w: float
    idle_sm_clock_mhz: float
    static_power_w: float
    dyn_power_max_w: float
    k: float
    sm_clock_min_mhz: float
    sm_clock_max_mhz: float
    sm_clock_step_mhz: float
    mem_clock_mhz: float
    mem_clock_idle_mhz: float
    memory_total_mib: int
    ambient_c: float
    thermal_c_per_w: float
    thermal_time_constant_s: float
    calibrated_from: str | None = None

    @property
    def model(self) -> GpuModel:
        """The GPU-level parameters of ``energy.gpu_model``."""
        return GpuModel(
            static_power_w=self.static_power_w,
            dyn_power_max_w=self.dyn_power_max_w,
            k=self.k,
            sm_clock_min_mhz=self.sm_clock_min_mhz,
            sm_clock_max_mhz=self.sm_clock_max_mhz,
            sm_clock_step_mhz=self.sm_clock_step_mhz,
        )

    @property
    def memory_total_bytes(self) -> int:
        """Framebuffer size, bytes."""
        return self.memory_total_mib * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Workload:
    """A workload a simulated GPU can run.

    Attributes:
        name: Key in ``workloads.json`` (``training``, ``A40/imagenet/resnet50/bs256``) or any
            label for a hand-made workload.
        activity: ``a``: dynamic power at the top clock as a share of the SKU's ``P_dyn_max``.
        compute_share: ``c``: share of the step time that scales with ``1/f``.
        step_time_s: Time of one unit of work at the top clock, s (an epoch for trace fits).
        ripple: ``r``: power peaks at ``(1 + r)`` times the average; a limit holds the peak.
        micro_batch_overhead: ``o``: per-micro-batch overhead's share of the step time at the
            workload's own micro-batch, 0..1 (0: the micro-batch term vanishes; see
            ``energy.gpu_model``).
        micro_batch_activity_exp: ``beta``: across micro-batches, activity follows throughput to
            this power (``A(s) = T(s) ** -beta``), >= 0.
        gpu_util_pct / mem_util_pct: Utilisation reported while it runs, %.
        memory_fraction: Share of the framebuffer it uses.
        sku: The SKU it was fitted on, or None for a generic workload.
        source: Where it comes from (trace file, or "generic").
    """

    name: str
    activity: float
    compute_share: float
    step_time_s: float
    ripple: float = 0.05
    micro_batch_overhead: float = 0.0
    micro_batch_activity_exp: float = 1.0
    gpu_util_pct: int = 97
    mem_util_pct: int = 40
    memory_fraction: float = 0.75
    sku: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.compute_share <= 1.0:
            raise ValueError(
                f"{self.name}: compute_share must be in 0..1, got {self.compute_share}"
            )
        if self.activity < 0.0 or self.step_time_s <= 0.0 or self.ripple < 0.0:
            raise ValueError(
                f"{self.name}: need activity >= 0, step_time_s > 0 and ripple >= 0, got "
                f"{self.activity}, {self.step_time_s}, {self.ripple}"
            )
        if not (
            0.0 <= self.micro_batch_overhead < 1.0
            and 0.0 <= self.micro_batch_activity_exp < math.inf
        ):
            raise ValueError(
                f"{self.name}: need micro_batch_overhead in [0, 1) and a finite "
                f"micro_batch_activity_exp >= 0, got {self.micro_batch_overhead}, "
                f"{self.micro_batch_activity_exp}"
            )
        if not (0 <= self.gpu_util_pct <= 100 and 0 <= self.mem_util_pct <= 100):
            raise ValueError(f"{self.name}: utilisation must be in 0..100 %")
        if not 0.0 <= self.memory_fraction <= 1.0:
            raise ValueError(f"{self.name}: memory_fraction must be in 0..1")

    @property
    def model(self) -> WorkloadModel:
        """The workload parameters of ``energy.gpu_model``."""
        return WorkloadModel(
            activity=self.activity,
            compute_share=self.compute_share,
            step_time_s=self.step_time_s,
            ripple=self.ripple,
            micro_batch_overhead=self.micro_batch_overhead,
            micro_batch_activity_exp=self.micro_batch_activity_exp,
        )


def _sku_from_json(name: str, raw: Mapping[str, Any]) -> SkuProfile:
    try:
        sku = SkuProfile(
            name=name,
            product_name=str(raw["product_name"]),
            aliases=tuple(str(a).lower() for a in raw.get("aliases", ())),
            tdp_w=float(raw["tdp_w"]),
            min_limit_w=float(raw["min_limit_w"]),
            max_limit_w=float(raw["max_limit_w"]),
            default_limit_w=float(raw["default_limit_w"]),
            idle_power_w=float(raw["idle_power_w"]),
            idle_sm_clock_mhz=float(raw["idle_sm_clock_mhz"]),
            static_power_w=float(raw["static_power_w"]),
            dyn_power_max_w=float(raw["dyn_power_max_w"]),
            k=float(raw["k"]),
            sm_clock_min_mhz=float(raw["sm_clock_min_mhz"]),
            sm_clock_max_mhz=float(raw["sm_clock_max_mhz"]),
            sm_clock_step_mhz=float(raw["sm_clock_step_mhz"]),
            mem_clock_mhz=float(raw["mem_clock_mhz"]),
            mem_clock_idle_mhz=float(raw["mem_clock_idle_mhz"]),
            memory_total_mib=int(raw["memory_total_mib"]),
            ambient_c=float(raw["ambient_c"]),
            thermal_c_per_w=float(raw["thermal_c_per_w"]),
            thermal_time_constant_s=float(raw["thermal_time_constant_s"]),
            calibrated_from=raw.get("calibrated_from"),
        )
    except KeyError as exc:
        raise ValueError(f"SKU profile {name!r} lacks {exc.args[0]!r}") from exc
    if not 0 < sku.min_limit_w <= sku.default_limit_w <= sku.max_limit_w:
        raise ValueError(f"SKU profile {name!r}: need 0 < min <= default <= max power limit")
    if not (
        0 < sku.sm_clock_min_mhz <= sku.idle_sm_clock_mhz <= sku.sm_clock_max_mhz
        and sku.sm_clock_step_mhz > 0
    ):
        raise ValueError(f"SKU profile {name!r}: need 0 < min <= idle <= max SM clock, step > 0")
    if sku.k <= 0 or sku.dyn_power_max_w <= 0 or sku.static_power_w < 0:
        raise ValueError(f"SKU profile {name!r}: need k > 0, P_dyn_max > 0, static power >= 0")
    return sku


def sku_to_json(sku: SkuProfile) -> dict[str, Any]:
    """A profile as its ``skus.json`` entry (without the key)."""
    return {
        "product_name": sku.product_name,
        "aliases": list(sku.aliases),
        "tdp_w": sku.tdp_w,
        "min_limit_w": sku.min_limit_w,
        "max_limit_w": sku.max_limit_w,
        "default_limit_w": sku.default_limit_w,
        "idle_power_w": sku.idle_power_w,
        "idle_sm_clock_mhz": sku.idle_sm_clock_mhz,
        "static_power_w": sku.static_power_w,
        "dyn_power_max_w": sku.dyn_power_max_w,
        "k": sku.k,
        "sm_clock_min_mhz": sku.sm_clock_min_mhz,
        "sm_clock_max_mhz": sku.sm_clock_max_mhz,
        "sm_clock_step_mhz": sku.sm_clock_step_mhz,
        "mem_clock_mhz": sku.mem_clock_mhz,
        "mem_clock_idle_mhz": sku.mem_clock_idle_mhz,
        "memory_total_mib": sku.memory_total_mib,
        "ambient_c": sku.ambient_c,
        "thermal_c_per_w": sku.thermal_c_per_w,
        "thermal_time_constant_s": sku.thermal_time_constant_s,
        "calibrated_from": sku.calibrated_from,
    }


def _workload_from_json(name: str, raw: Mapping[str, Any]) -> Workload:
    try:
        return Workload(
            name=name,
            activity=float(raw["activity"]),
            compute_share=float(raw["compute_share"]),
            step_time_s=float(raw["step_time_s"]),
            ripple=float(raw.get("ripple", 0.05)),
            micro_batch_overhead=float(raw.get("micro_batch_overhead", 0.0)),
            micro_batch_activity_exp=float(raw.get("micro_batch_activity_exp", 1.0)),
            gpu_util_pct=int(raw.get("gpu_util_pct", 97)),
            mem_util_pct=int(raw.get("mem_util_pct", 40)),
            memory_fraction=float(raw.get("memory_fraction", 0.75)),
            sku=raw.get("sku"),
            source=str(raw.get("source", "")),
        )
    except KeyError as exc:
        raise ValueError(f"workload {name!r} lacks {exc.args[0]!r}") from exc


def workload_to_json(workload: Workload) -> dict[str, Any]:
    """A workload as its ``workloads.json`` entry (without the key)."""
    return {
        "sku": workload.sku,
        "source": workload.source,
        "activity": workload.activity,
        "compute_share": workload.compute_share,
        "step_time_s": workload.step_time_s,
        "ripple": workload.ripple,
        "micro_batch_overhead": workload.micro_batch_overhead,
        "micro_batch_activity_exp": workload.micro_batch_activity_exp,
        "gpu_util_pct": workload.gpu_util_pct,
        "mem_util_pct": workload.mem_util_pct,
        "memory_fraction": workload.memory_fraction,
    }


@functools.cache
def _load_skus_cached(path: Path) -> dict[str, SkuProfile]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {name: _sku_from_json(name, entry) for name, entry in raw.items()}


@functools.cache
def _load_workloads_cached(path: Path) -> dict[str, Workload]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {name: _workload_from_json(name, entry) for name, entry in raw.items()}


def load_skus(path: Path | None = None) -> dict[str, SkuProfile]:
    """Every SKU profile, by key (read once per path and cached)."""
    return dict(_load_skus_cached((path or SKUS_PATH).resolve()))


def load_workloads(path: Path | None = None) -> dict[str, Workload]:
    """Every named workload, by key (read once per path and cached)."""
    return dict(_load_workloads_cached((path or WORKLOADS_PATH).resolve()))


def get_sku(name: str, path: Path | None = None) -> SkuProfile:
    """The profile with this key.

    Raises:
        ValueError: Unknown SKU; the message lists the known ones.
    """
    skus = load_skus(path)
    try:
        return skus[name]
    except KeyError:
        known = ", ".join(sorted(skus))
        raise ValueError(f"unknown GPU SKU {name!r}; known SKUs: {known}") from None


def find_sku(gpu_name: str, path: Path | None = None) -> SkuProfile | None:
    """The profile for a GPU name as traces write it (``a40``, ``H100-SXM``), or None."""
    wanted = gpu_name.strip().lower()
    for sku in load_skus(path).values():
        if wanted == sku.name.lower() or wanted in sku.aliases:
            return sku
    return None


def get_workload(name: str, path: Path | None = None) -> Workload:
    """The named workload.

    Raises:
        ValueError: Unknown workload; the message names a few known ones.
    """
    workloads = load_workloads(path)
    try:
        return workloads[name]
    except KeyError:
        # Generic workloads first: they are the ones a person types.
        known = sorted(workloads, key=lambda n: (workloads[n].sku is not None, n))
        shown = ", ".join(known[:8]) + (f", ... ({len(known)} in all)" if len(known) > 8 else "")
        raise ValueError(f"unknown workload {name!r}; known workloads: {shown}") from None
