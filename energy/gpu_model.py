"""The simulated GPU's physics: power, clock and step time (docs/architecture.md, section 7).

Pure maths, no I/O. Power at SM clock ``f`` for a workload of activity ``a``::

    P(f) = P_static + a * P_dyn_max * (f / f_max) ** k

Under a power limit ``L`` the firmware runs the highest supported clock (the SKU's clock grid,
``f_max - i * step``, clamped to ``[f_min, f_max]``) whose ripple peak ``P(f) * (1 + r)`` fits
``L``; the average power under a binding limit is therefore below ``L``, as measured traces
show. When not even ``f_min`` fits, the GPU stays at ``f_min`` and draws ``P(f_min)`` (real GPUs
do the same: the limit cannot be met). A step's time is
``t(f) = t_max * (c * f_max / f + (1 - c))``.

**Micro-batches.** At a fixed global batch, a job that trains in micro-batches ``s`` times its own
(``s < 1``: more gradient accumulation) does the same work per optimizer step in ``1/s`` times as
many micro-batches. Each micro-batch pays a fixed overhead (kernel launches, host work, the
optimizer update the traces include in every iteration) on top of per-sample work, so with ``o`` the
overhead's share of the time at the job's own micro-batch::

    T(s) = o / s + (1 - o)            (time per global step, relative; T(1) = 1)
    A(s) = T(s) ** (-beta)            (activity, relative; A(1) = 1)

The dynamic power follows the throughput (samples per second, ``1/T``) to the power ``beta``:
``beta = 1`` is a fixed dynamic energy per sample with no dynamic power while the overhead runs,
``beta = 0`` a power that does not depend on the micro-batch. Activity rises with the micro-batch
and saturates at ``(1 - o) ** -beta``. In absolute terms the per-sample time is
``tau_inf * (1 + m_h / m)`` for micro-batch ``m``, ``m_h`` being the micro-batch at which overhead
and work take equal time, so ``o = m_h / (m + m_h)``; ``at_micro_batch`` re-expresses ``o`` at the
new micro-batch, so scaling by ``s1`` then ``s2`` is scaling by ``s1 * s2``. The compute share ``c``
is held (the overhead slows with the clock as the work does). ``o = 0`` makes the term vanish.

``fit_workload`` and ``fit_gpu`` fit these parameters to measured (power limit, time, average power)
points; ``fit_micro_batch`` fits ``m_h`` and ``beta`` to one workload's time and power at ``f_max``
for several micro-batches (in the traces, from ``fit_gpu``'s per-batch-size fits: every batch size
of a dataset runs the same epoch, and each iteration there includes one optimizer update, so a
fitted overhead includes the update and overstates the cost of accumulation). They import scipy
inside the function: the daemon uses this module without scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "FitResult",
    "GpuModel",
    "MeasuredPoint",
    "MicroBatchFit",
    "MicroBatchPoint",
    "OperatingPoint",
    "WorkloadModel",
    "at_micro_batch",
    "clock_under_limit_mhz",
    "energy_per_step_j",
    "fit_gpu",
    "fit_micro_batch",
    "fit_workload",
    "least_energy_clock_mhz",
    "micro_batch_activity_factor",
    "micro_batch_time_factor",
    "operating_point",
    "power_at_clock_w",
    "predict",
    "relative_errors",
    "step_slowdown",
    "step_time_s",
    "supported_clocks_mhz",
]

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class GpuModel:
    """GPU-level model parameters (one SKU).

    Attributes:
        static_power_w: Power of a busy GPU that does not scale with the SM clock, W.
        dyn_power_max_w: Dynamic power at ``f_max`` for activity 1, W.
        k: Exponent of the clock in dynamic power (voltage rises with frequency).
        sm_clock_min_mhz: Lowest supported SM clock, MHz.
        sm_clock_max_mhz: Highest supported SM clock, MHz.
        sm_clock_step_mhz: Spacing of supported clocks below ``f_max``, MHz.
    """

    static_power_w: float
    dyn_power_max_w: float
    k: float
    sm_clock_min_mhz: float
    sm_clock_max_mhz: float
    sm_clock_step_mhz: float


@dataclass(frozen=True, slots=True)
class WorkloadModel:
    """What a workload does to one GPU.

    Attributes:
        activity: ``a``: dynamic power at ``f_max`` as a share of ``dyn_power_max_w`` (0..~1).
        compute_share: ``c``: share of the step time at ``f_max`` that scales with ``1/f``.
        step_time_s: ``t_max``: time of one unit of work (a step; an epoch in the Zeus traces)
            at ``f_max``, s.
        ripple: ``r``: the power peak is ``(1 + r)`` times the average; a power limit holds the
            peak, not the average.
        micro_batch_overhead: ``o``: share of the step time that is per-micro-batch overhead at
            the workload's own micro-batch, 0..1 (0: no micro-batch term).
        micro_batch_activity_exp: ``beta``: activity follows throughput to this power across
            micro-batches (``A(s) = T(s) ** -beta``).
    """

    activity: float
    compute_share: float
    step_time_s: float
    ripple: float
    micro_batch_overhead: float = 0.0
    micro_batch_activity_exp: float = 1.0


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """Where a busy GPU settles under a power limit and clock locks.

    Attributes:
        sm_clock_mhz: The SM clock the firmware runs, MHz.
        power_w: Average power drawn, W.
        power_capped: The power limit is what holds the clock down (``SW_POWER_CAP``).
        clock_capped: Locked clocks are what hold the clock down (``APPLICATIONS_CLOCKS_SETTING``).
    """

    sm_clock_mhz: float
    power_w: float
    power_capped: bool
    clock_capped: bool


@dataclass(frozen=True, slots=True)
class MeasuredPoint:
    """One measured point of a power-limit sweep.

    Attributes:
        power_limit_w: The power limit the GPU ran under, W.
        time_s: Time of the unit of work (step or epoch), s.
        avg_power_w: Average board power, W.
    """

    power_limit_w: float
    time_s: float
    avg_power_w: float


@dataclass(frozen=True, slots=True)
class FitResult:
    """The result of ``fit_gpu``: GPU-level parameters and one workload model per group key."""

    gpu: GpuModel
    workloads: dict[str, WorkloadModel]


def power_at_clock_w(gpu: GpuModel, activity: float, clock_mhz: float) -> float:
    """Average power of a busy GPU at an SM clock, W."""
    x = clock_mhz / gpu.sm_clock_max_mhz
    return float(gpu.static_power_w + activity * gpu.dyn_power_max_w * x**gpu.k)


def supported_clocks_mhz(gpu: GpuModel) -> list[float]:
    """The supported SM clocks, highest first, MHz: ``f_max - i * step`` down to ``f_min``."""
    clocks: list[float] = []
    f = gpu.sm_clock_max_mhz
    while f > gpu.sm_clock_min_mhz + _EPS:
        clocks.append(f)
        f -= gpu.sm_clock_step_mhz
    clocks.append(gpu.sm_clock_min_mhz)
    return clocks


def _snap_down(gpu: GpuModel, clock_mhz: float) -> float:
    """The highest supported clock at or below ``clock_mhz`` (``f_min`` if none), MHz."""
    if clock_mhz >= gpu.sm_clock_max_mhz:
        return gpu.sm_clock_max_mhz
    steps = math.ceil((gpu.sm_clock_max_mhz - clock_mhz) / gpu.sm_clock_step_mhz - _EPS)
    return max(gpu.sm_clock_max_mhz - steps * gpu.sm_clock_step_mhz, gpu.sm_clock_min_mhz)


def _power_clock_mhz(gpu: GpuModel, workload: WorkloadModel, limit_w: float) -> float:
    """The highest supported clock whose ripple peak fits ``limit_w`` (``f_min`` if none), MHz."""
    target_w = limit_w / (1.0 + workload.ripple)
    dyn_w = workload.activity * gpu.dyn_power_max_w
    if gpu.static_power_w + dyn_w <= target_w:
        return gpu.sm_clock_max_mhz
    if dyn_w <= 0.0 or target_w <= gpu.static_power_w:
        return gpu.sm_clock_min_mhz
    clock = gpu.sm_clock_max_mhz * ((target_w - gpu.static_power_w) / dyn_w) ** (1.0 / gpu.k)
    clock = _snap_down(gpu, clock)
    # Guard the floating-point edge: the snapped clock must really fit.
    if (
        clock > gpu.sm_clock_min_mhz
        and power_at_clock_w(gpu, workload.activity, clock) * (1.0 + workload.ripple)
        > limit_w * (1.0 + 1e-12)
    ):
        clock = max(clock - gpu.sm_clock_step_mhz, gpu.sm_clock_min_mhz)
    return clock


def clock_under_limit_mhz(
    gpu: GpuModel,
    workload: WorkloadModel,
    limit_w: float,
    *,
    locked_max_mhz: float | None = None,
) -> float:
    """The SM clock the firmware runs under a power limit and an optional clock lock, MHz.

    Args:
        gpu: GPU parameters.
        workload: The running workload.
        limit_w: Enforced power limit, W.
        locked_max_mhz: Upper end of locked SM clocks (``nvidia-smi -lgc``), MHz, or None.
    """
    return operating_point(gpu, workload, limit_w, locked_max_mhz=locked_max_mhz).sm_clock_mhz


def operating_point(
    gpu: GpuModel,
    workload: WorkloadModel,
    limit_w: float,
    *,
    locked_max_mhz: float | None = None,
) -> OperatingPoint:
    """Clock, power and binding cap of a busy GPU under a power limit and clock lock.

    The power limit wins over a clock lock (the firmware caps power even below locked clocks).

    Args:
        gpu: GPU parameters.
        workload: The running workload.
        limit_w: Enforced power limit, W.
        locked_max_mhz: Upper end of locked SM clocks, MHz, or None for no lock.
    """
    power_clock = _power_clock_mhz(gpu, workload, limit_w)
    clock_cap = gpu.sm_clock_max_mhz
    if locked_max_mhz is not None and locked_max_mhz < gpu.sm_clock_max_mhz:
        clock_cap = _snap_down(gpu, locked_max_mhz)
    clock = min(power_clock, clock_cap)
    power_capped = power_clock < clock_cap
    clock_capped = clock_cap < gpu.sm_clock_max_mhz and clock_cap <= power_clock
    return OperatingPoint(
        sm_clock_mhz=clock,
        power_w=power_at_clock_w(gpu, workload.activity, clock),
        power_capped=power_capped,
        clock_capped=clock_capped,
    )


def step_slowdown(gpu: GpuModel, workload: WorkloadModel, clock_mhz: float) -> float:
    """``t(f) / t(f_max)``: how much longer a step takes at ``clock_mhz`` than at ``f_max``."""
    c = workload.compute_share
    return c * gpu.sm_clock_max_mhz / clock_mhz + (1.0 - c)


def step_time_s(gpu: GpuModel, workload: WorkloadModel, clock_mhz: float) -> float:
    """Time of one step at an SM clock, s."""
    return workload.step_time_s * step_slowdown(gpu, workload, clock_mhz)


def energy_per_step_j(gpu: GpuModel, workload: WorkloadModel, clock_mhz: float) -> float:
    """Energy of one step at an SM clock (average power times step time), J."""
    return power_at_clock_w(gpu, workload.activity, clock_mhz) * step_time_s(
        gpu, workload, clock_mhz
    )


def least_energy_clock_mhz(gpu: GpuModel, workload: WorkloadModel) -> float:
    """The supported SM clock with the least energy per step, MHz."""
    return min(supported_clocks_mhz(gpu), key=lambda f: energy_per_step_j(gpu, workload, f))


def predict(gpu: GpuModel, workload: WorkloadModel, limit_w: float) -> tuple[float, float]:
    """Predicted (time per unit of work in s, average power in W) under a power limit."""
    op = operating_point(gpu, workload, limit_w)
    return step_time_s(gpu, workload, op.sm_clock_mhz), op.power_w


def relative_errors(
    gpu: GpuModel, workload: WorkloadModel, points: Sequence[MeasuredPoint]
) -> list[tuple[float, float]]:
    """Signed relative errors (time, power) of the model at each measured point (0.05 = 5 %)."""
    out: list[tuple[float, float]] = []
    for p in points:
        t, w = predict(gpu, workload, p.power_limit_w)
        out.append((t / p.time_s - 1.0, w / p.avg_power_w - 1.0))
    return out


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"micro-batch scale must be a finite positive number, got {scale}")


def micro_batch_time_factor(workload: WorkloadModel, scale: float) -> float:
    """``T(s) = o / s + (1 - o)``: time per global step at micro-batches ``scale`` times the
    workload's own, relative to its own (1 at ``scale = 1``).

    Raises:
        ValueError: ``scale`` is not a finite positive number.
    """
    _check_scale(scale)
    o = workload.micro_batch_overhead
    return o / scale + (1.0 - o)


def micro_batch_activity_factor(workload: WorkloadModel, scale: float) -> float:
    """``A(s) = T(s) ** -beta``: activity at micro-batches ``scale`` times the workload's own,
    relative to its own (1 at ``scale = 1``).

    Raises:
        ValueError: ``scale`` is not a finite positive number.
    """
    return float(micro_batch_time_factor(workload, scale) ** -workload.micro_batch_activity_exp)


def at_micro_batch(workload: WorkloadModel, scale: float) -> WorkloadModel:
    """The workload run at micro-batches ``scale`` times its own (global batch unchanged).

    Step time is multiplied by ``T(s)`` and activity by ``A(s)``; the overhead share is
    re-expressed at the new micro-batch (``o' = (o / s) / T(s)``), so the result scales on
    consistently. ``scale = 1`` returns ``workload`` itself.

    Raises:
        ValueError: ``scale`` is not a finite positive number.
    """
    _check_scale(scale)
    if scale == 1.0 or workload.micro_batch_overhead == 0.0:
        return workload
    t = micro_batch_time_factor(workload, scale)
    return replace(
        workload,
        activity=workload.activity * t**-workload.micro_batch_activity_exp,
        step_time_s=workload.step_time_s * t,
        micro_batch_overhead=workload.micro_batch_overhead / scale / t,
    )


# --- fitting -------------------------------------------------------------------------------------

#: Bounds of the fitted workload parameters: activity, compute share, ripple.
_ACTIVITY_BOUNDS = (0.0, 1.5)
_RIPPLE_BOUNDS = (0.0, 1.0)
#: Weak priors keep parameters the data cannot see (the ripple of a workload no limit ever binds,
#: the compute share of a workload whose time never changes) at plain values. Weights are small
#: next to a 1 % misfit of a measured point.
_PRIOR_RIPPLE = (0.05, 0.02)
_PRIOR_COMPUTE = (0.5, 0.01)
#: Robust loss scale (log error): measured points far off the curve (noise, a limit the GPU could
#: not hold) count less than a least-squares fit would let them.
_LOSS_SCALE = 0.05


def _initial_workload(gpu: GpuModel, points: Sequence[MeasuredPoint]) -> list[float]:
    fastest = min(p.time_s for p in points)
    top = max(points, key=lambda p: p.power_limit_w).avg_power_w
    a0 = (top - gpu.static_power_w) / max(gpu.dyn_power_max_w, _EPS)
    a0 = min(max(a0, 0.05), _ACTIVITY_BOUNDS[1] - 0.05)
    return [math.log(fastest), 0.5, a0, 0.05]


def _smooth_residuals(
    static_w: float,
    k: float,
    gpu: GpuModel,
    w: Sequence[float],
    points: Sequence[MeasuredPoint],
) -> list[float]:
    """Log errors of time and power for one workload, with a smooth (continuous-clock) model.

    The firmware's clock is the highest grid clock under the continuous one: on average half a
    step lower, which is what the continuous model subtracts.
    """
    log_t, c, a, r = w
    t_max = math.exp(log_t)
    f_max = gpu.sm_clock_max_mhz
    x_min = gpu.sm_clock_min_mhz / f_max
    half_step = 0.5 * gpu.sm_clock_step_mhz / f_max
    dyn = max(a * gpu.dyn_power_max_w, _EPS)
    out: list[float] = []
    for p in points:
        target = p.power_limit_w / (1.0 + r)
        x_cont = (max(target - static_w, _EPS) / dyn) ** (1.0 / k)
        x = x_cont - half_step if x_cont < 1.0 else 1.0
        x = min(max(x, x_min), 1.0)
        power = static_w + dyn * x**k
        time = t_max * (c / x + 1.0 - c)
        out.append(math.log(time / p.time_s))
        out.append(math.log(power / p.avg_power_w))
    out.append((r - _PRIOR_RIPPLE[0]) * _PRIOR_RIPPLE[1])
    out.append((c - _PRIOR_COMPUTE[0]) * _PRIOR_COMPUTE[1])
    return out


@dataclass(frozen=True, slots=True)
class MicroBatchPoint:
    """A workload's time and busy power at ``f_max`` at one micro-batch (same work throughout).

    Attributes:
        batch_size: Samples per micro-batch.
        time_s: Time of the unit of work (an epoch in the traces) at ``f_max``, s.
        power_w: Average busy power at ``f_max``, W.
    """

    batch_size: float
    time_s: float
    power_w: float


@dataclass(frozen=True, slots=True)
class MicroBatchFit:
    """The result of ``fit_micro_batch``.

    Attributes:
        overhead_batch: ``m_h``: micro-batch at which per-micro-batch overhead takes as long as
            the per-sample work, samples.
        activity_exp: ``beta``.
        time_floor_s: Time of the unit of work with no overhead (``m`` unbounded), s.
        activity_max: Activity with no overhead (the saturation value).
    """

    overhead_batch: float
    activity_exp: float
    time_floor_s: float
    activity_max: float

    def overhead_share(self, batch_size: float) -> float:
        """``o = m_h / (m + m_h)``: the overhead's share of the time at micro-batch ``m``."""
        return self.overhead_batch / (batch_size + self.overhead_batch)

    def predict(self, gpu: GpuModel, batch_size: float) -> tuple[float, float]:
        """(time s, busy power W) at ``f_max`` at micro-batch ``batch_size``."""
        u = batch_size / (batch_size + self.overhead_batch)
        time = self.time_floor_s / u
        activity = self.activity_max * u**self.activity_exp
        return time, power_at_clock_w(gpu, activity, gpu.sm_clock_max_mhz)


#: Weak prior on ``beta``: 1 (dynamic energy per sample fixed) where the data cannot see it (a
#: workload whose overhead is negligible at every measured micro-batch).
_PRIOR_BETA = (1.0, 0.05)
_BETA_BOUNDS = (0.0, 3.0)


def fit_micro_batch(points: Sequence[MicroBatchPoint], gpu: GpuModel) -> MicroBatchFit:
    """Fit the micro-batch term (``m_h``, ``beta``) to one workload's time and power at ``f_max``.

    Time is ``t_inf * (1 + m_h / m)`` and power ``P_static + a_inf * u ** beta * P_dyn_max``
    with ``u = m / (m + m_h)``; log errors, robust loss (points far off, such as a time that
    rises again at the largest batches, count less).

    Args:
        points: One point per micro-batch (at least 2, distinct batch sizes).
        gpu: The GPU's parameters, held fixed.

    Raises:
        ValueError: Fewer than two distinct batch sizes, or a non-positive value.
    """
    from scipy.optimize import least_squares

    if len({p.batch_size for p in points}) < 2:
        raise ValueError(f"at least 2 distinct micro-batches are needed, got {len(points)} points")
    for p in points:
        if not (p.batch_size > 0 and p.time_s > 0 and p.power_w > 0):
            raise ValueError(f"batch sizes, times and powers must be positive: {p}")
    m_lo = min(p.batch_size for p in points)
    m_hi = max(p.batch_size for p in points)
    fastest = min(p.time_s for p in points)
    top = max(p.power_w for p in points)
    a0 = min(max((top - gpu.static_power_w) / max(gpu.dyn_power_max_w, _EPS), 0.05), 2.9)
    lo = [-50.0, math.log(m_lo * 1e-4), 0.0, _BETA_BOUNDS[0]]
    hi = [50.0, math.log(m_hi * 1e4), 3.0, _BETA_BOUNDS[1]]
    x0 = [math.log(fastest), math.log(math.sqrt(m_lo * m_hi)), a0, _PRIOR_BETA[0]]

    def model(w: Any) -> MicroBatchFit:
        return MicroBatchFit(
            overhead_batch=math.exp(float(w[1])),
            activity_exp=float(w[3]),
            time_floor_s=math.exp(float(w[0])),
            activity_max=float(w[2]),
        )

    def residuals(w: Any) -> list[float]:
        fit = model(w)
        out: list[float] = []
        for p in points:
            t, power = fit.predict(gpu, p.batch_size)
            out.append(math.log(t / p.time_s))
            out.append(math.log(max(power, _EPS) / p.power_w))
        out.append((fit.activity_exp - _PRIOR_BETA[0]) * _PRIOR_BETA[1])
        return out

    sol = least_squares(residuals, x0, bounds=(lo, hi), loss="soft_l1", f_scale=_LOSS_SCALE)
    return model(sol.x)


def _to_workload(w: Sequence[float]) -> WorkloadModel:
    return WorkloadModel(
        activity=float(w[2]),
        compute_share=float(w[1]),
        step_time_s=math.exp(float(w[0])),
        ripple=float(w[3]),
    )


def _check_points(key: str, points: Sequence[MeasuredPoint]) -> None:
    if len(points) < 2:
        raise ValueError(f"{key}: at least 2 measured points are needed, got {len(points)}")
    for p in points:
        if not (p.power_limit_w > 0 and p.time_s > 0 and p.avg_power_w > 0):
            raise ValueError(f"{key}: limits, times and powers must be positive: {p}")


def fit_workload(points: Sequence[MeasuredPoint], gpu: GpuModel) -> WorkloadModel:
    """Fit one workload's parameters (activity, compute share, step time, ripple) on one GPU.

    Args:
        points: Measured points of a power-limit sweep of one (workload, batch size).
        gpu: The GPU's parameters, held fixed.

    Returns:
        The fitted workload.

    Raises:
        ValueError: Fewer than two points, or a non-positive value.
    """
    from scipy.optimize import least_squares

    _check_points("workload", points)
    lo = [-50.0, 0.0, _ACTIVITY_BOUNDS[0], _RIPPLE_BOUNDS[0]]
    hi = [50.0, 1.0, _ACTIVITY_BOUNDS[1], _RIPPLE_BOUNDS[1]]

    def residuals(w: Any) -> list[float]:
        return _smooth_residuals(gpu.static_power_w, gpu.k, gpu, w, points)

    sol = least_squares(
        residuals,
        _initial_workload(gpu, points),
        bounds=(lo, hi),
        loss="soft_l1",
        f_scale=_LOSS_SCALE,
    )
    return _to_workload(sol.x)


def fit_gpu(
    groups: Mapping[str, Sequence[MeasuredPoint]],
    gpu: GpuModel,
    *,
    fit_static: bool = True,
    fit_k: bool = True,
    k_bounds: tuple[float, float] = (2.0, 3.5),
) -> FitResult:
    """Fit GPU-level parameters (static power, ``k``) jointly with every workload on that GPU.

    ``dyn_power_max_w`` and the clock range stay as given: only ``activity * dyn_power_max_w``
    shows in power, and only clock ratios show in time.

    Args:
        groups: Measured points per workload key (e.g. ``"imagenet/resnet50/bs256"``).
        gpu: Starting GPU parameters (the SKU profile's, or generic ones).
        fit_static: Fit ``static_power_w``; else keep the given value.
        fit_k: Fit ``k`` within ``k_bounds``; else keep the given value. the simulator takes ``k``
            at about 2.5-3; the bounds keep the fit physical where traces barely constrain it.
        k_bounds: Bounds of ``k``.

    Returns:
        The fitted GPU parameters and one workload model per key.

    Raises:
        ValueError: No groups, or a group with fewer than two points or a non-positive value.
    """
    import numpy as np
    from scipy.optimize import least_squares
    from scipy.sparse import lil_matrix

    if not groups:
        raise ValueError("no measured workloads to fit")
    keys = sorted(groups)
    for key in keys:
        _check_points(key, groups[key])
    min_power = min(p.avg_power_w for key in keys for p in groups[key])

    g0: list[float] = []
    glo: list[float] = []
    ghi: list[float] = []
    if fit_static:
        g0.append(min(gpu.static_power_w, 0.95 * min_power))
        glo.append(0.0)
        ghi.append(min_power)
    if fit_k:
        g0.append(min(max(gpu.k, k_bounds[0]), k_bounds[1]))
        glo.append(k_bounds[0])
        ghi.append(k_bounds[1])
    n_g = len(g0)
    if gpu.dyn_power_max_w <= 0:
        raise ValueError(f"dyn_power_max_w must be positive, got {gpu.dyn_power_max_w}")
    gpu0 = gpu
    x0 = list(g0)
    lo = list(glo)
    hi = list(ghi)
    for key in keys:
        x0 += _initial_workload(gpu0, groups[key])
        lo += [-50.0, 0.0, _ACTIVITY_BOUNDS[0], _RIPPLE_BOUNDS[0]]
        hi += [50.0, 1.0, _ACTIVITY_BOUNDS[1], _RIPPLE_BOUNDS[1]]
    # least_squares needs a strictly feasible start.
    x0 = [min(max(v, lo_ + 1e-6), hi_ - 1e-6) for v, lo_, hi_ in zip(x0, lo, hi, strict=True)]

    def split(x: Any) -> tuple[float, float]:
        i = 0
        static_w = gpu.static_power_w
        k = gpu.k
        if fit_static:
            static_w = float(x[i])
            i += 1
        if fit_k:
            k = float(x[i])
        return static_w, k

    def residuals(x: Any) -> Any:
        static_w, k = split(x)
        out: list[float] = []
        for j, key in enumerate(keys):
            w = x[n_g + 4 * j : n_g + 4 * j + 4]
            out += _smooth_residuals(static_w, k, gpu0, w, groups[key])
        return np.asarray(out)

    n_res = sum(2 * len(groups[key]) + 2 for key in keys)
    sparsity = lil_matrix((n_res, len(x0)), dtype=int)
    row = 0
    for j, key in enumerate(keys):
        rows = 2 * len(groups[key]) + 2
        sparsity[row : row + rows, :n_g] = 1
        sparsity[row : row + rows, n_g + 4 * j : n_g + 4 * j + 4] = 1
        row += rows
    sol = least_squares(
        residuals,
        np.asarray(x0),
        bounds=(lo, hi),
        loss="soft_l1",
        f_scale=_LOSS_SCALE,
        jac_sparsity=sparsity,
        x_scale="jac",
    )
    static_w, k = split(sol.x)
    fitted_gpu = replace(gpu, static_power_w=static_w, k=k)
    workloads = {
        key: _to_workload(sol.x[n_g + 4 * j : n_g + 4 * j + 4]) for j, key in enumerate(keys)
    }
    return FitResult(gpu=fitted_gpu, workloads=workloads)
