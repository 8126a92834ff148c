"""The GPU model: physics, fitting that recovers known parameters, and the committed calibration."""

from __future__ import annotations

import csv
import itertools
import math
import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest

from energy.gpu_model import (
    GpuModel,
    MeasuredPoint,
    MicroBatchFit,
    MicroBatchPoint,
    WorkloadModel,
    at_micro_batch,
    energy_per_step_j,
    fit_gpu,
    fit_micro_batch,
    fit_workload,
    least_energy_clock_mhz,
    micro_batch_activity_factor,
    micro_batch_time_factor,
    operating_point,
    power_at_clock_w,
    predict,
    relative_errors,
    step_slowdown,
    supported_clocks_mhz,
)
from telemetry.backends.profiles import find_sku, get_sku, get_workload, load_workloads
from telemetry.backends.traces import bundled_trace_paths

GPU = GpuModel(
    static_power_w=80.0,
    dyn_power_max_w=220.0,
    k=2.6,
    sm_clock_min_mhz=210.0,
    sm_clock_max_mhz=1740.0,
    sm_clock_step_mhz=15.0,
)
WL = WorkloadModel(activity=0.7, compute_share=0.6, step_time_s=10.0, ripple=0.08)


def test_power_rises_with_clock_as_the_design_says() -> None:
    assert power_at_clock_w(GPU, 0.7, 1740.0) == pytest.approx(80.0 + 0.7 * 220.0)
    assert power_at_clock_w(GPU, 0.7, 870.0) == pytest.approx(80.0 + 0.7 * 220.0 * 0.5**2.6)
    assert power_at_clock_w(GPU, 0.0, 1740.0) == pytest.approx(80.0)


def test_supported_clocks_are_the_sku_grid() -> None:
    clocks = supported_clocks_mhz(GPU)
    assert clocks[0] == 1740.0 and clocks[-1] == 210.0
    assert all(a - b == pytest.approx(15.0) for a, b in itertools.pairwise(clocks))


@pytest.mark.parametrize("limit_w", [120.0, 150.0, 180.0, 200.0, 230.0])
def test_the_firmware_runs_the_highest_clock_whose_peak_fits(limit_w: float) -> None:
    op = operating_point(GPU, WL, limit_w)
    assert op.power_capped and not op.clock_capped
    assert op.power_w * (1 + WL.ripple) <= limit_w + 1e-9
    assert op.sm_clock_mhz in supported_clocks_mhz(GPU)
    one_up = op.sm_clock_mhz + GPU.sm_clock_step_mhz
    assert power_at_clock_w(GPU, WL.activity, one_up) * (1 + WL.ripple) > limit_w


def test_no_cap_binds_at_a_high_limit_and_the_floor_holds_at_a_low_one() -> None:
    top = operating_point(GPU, WL, 300.0)
    assert top.sm_clock_mhz == 1740.0 and not top.power_capped and not top.clock_capped
    floor = operating_point(GPU, WL, 50.0)  # below static power: cannot be met
    assert floor.sm_clock_mhz == 210.0 and floor.power_capped
    assert floor.power_w == pytest.approx(power_at_clock_w(GPU, WL.activity, 210.0))


def test_locked_clocks_cap_the_clock_and_the_power_limit_still_wins() -> None:
    op = operating_point(GPU, WL, 300.0, locked_max_mhz=1203.0)
    assert op.sm_clock_mhz == 1200.0 and op.clock_capped and not op.power_capped
    tight = operating_point(GPU, WL, 130.0, locked_max_mhz=1500.0)
    assert tight.sm_clock_mhz < 1500.0 and tight.power_capped and not tight.clock_capped


def test_least_energy_clock_lies_below_the_top_clock() -> None:
    best = least_energy_clock_mhz(GPU, WL)
    assert GPU.sm_clock_min_mhz < best < GPU.sm_clock_max_mhz
    assert energy_per_step_j(GPU, WL, best) < energy_per_step_j(GPU, WL, 1740.0)
    assert energy_per_step_j(GPU, WL, best) < energy_per_step_j(GPU, WL, 210.0)


def test_step_slowdown() -> None:
    assert step_slowdown(GPU, WL, 1740.0) == pytest.approx(1.0)
    assert step_slowdown(GPU, WL, 870.0) == pytest.approx(0.6 * 2 + 0.4)
    t, _ = predict(GPU, WL, 300.0)
    assert t == pytest.approx(10.0)


def _sweep(gpu: GpuModel, wl: WorkloadModel, limits: list[float]) -> list[MeasuredPoint]:
    points = []
    for lim in limits:
        t, p = predict(gpu, wl, lim)
        points.append(MeasuredPoint(lim, t, p))
    return points


def test_fit_workload_recovers_the_parameters_of_model_data() -> None:
    truth = WorkloadModel(activity=0.75, compute_share=0.55, step_time_s=42.0, ripple=0.12)
    points = _sweep(GPU, truth, [100.0 + 25.0 * i for i in range(9)])
    fitted = fit_workload(points, GPU)
    assert fitted.activity == pytest.approx(truth.activity, abs=0.02)
    assert fitted.compute_share == pytest.approx(truth.compute_share, abs=0.03)
    assert fitted.ripple == pytest.approx(truth.ripple, abs=0.01)
    assert fitted.step_time_s == pytest.approx(truth.step_time_s, rel=0.01)
    errs = relative_errors(GPU, fitted, points)
    assert max(abs(e) for pair in errs for e in pair) < 0.01


def test_fit_gpu_recovers_static_power_and_k_across_workloads() -> None:
    truth_gpu = GpuModel(95.0, 220.0, 2.8, 210.0, 1740.0, 15.0)
    truths = {
        "light": WorkloadModel(0.35, 0.3, 5.0, 0.05),
        "medium": WorkloadModel(0.6, 0.5, 20.0, 0.08),
        "heavy": WorkloadModel(0.85, 0.7, 60.0, 0.1),
        "bert": WorkloadModel(0.95, 0.8, 100.0, 0.04),
    }
    limits = [100.0 + 25.0 * i for i in range(9)]
    groups = {key: _sweep(truth_gpu, wl, limits) for key, wl in truths.items()}
    start = GpuModel(60.0, 220.0, 2.3, 210.0, 1740.0, 15.0)
    result = fit_gpu(groups, start)
    assert result.gpu.static_power_w == pytest.approx(95.0, abs=5.0)
    assert result.gpu.k == pytest.approx(2.8, abs=0.2)
    for key, wl in truths.items():
        assert result.workloads[key].compute_share == pytest.approx(wl.compute_share, abs=0.05)
        assert result.workloads[key].step_time_s == pytest.approx(wl.step_time_s, rel=0.02)


def test_fit_rejects_too_few_or_bad_points() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fit_workload([MeasuredPoint(100.0, 1.0, 90.0)], GPU)
    with pytest.raises(ValueError, match="positive"):
        fit_workload([MeasuredPoint(100.0, 1.0, 90.0), MeasuredPoint(150.0, -1.0, 95.0)], GPU)
    with pytest.raises(ValueError, match="no measured"):
        fit_gpu({}, GPU)


def test_h100_training_workload_matches_the_reference_points() -> None:
    sku = get_sku("H100-SXM")
    assert (sku.tdp_w, sku.max_limit_w, sku.min_limit_w) == (700, 700, 200)
    assert sku.sm_clock_max_mhz == 1980 and sku.idle_sm_clock_mhz == 345
    assert 70 <= sku.idle_power_w <= 100
    _, power = predict(sku.model, get_workload("training").model, sku.default_limit_w)
    assert 645 <= power <= 680


def _trace_groups(path: Path) -> dict[tuple[str, str, int], list[MeasuredPoint]]:
    groups: dict[tuple[str, str, int], list[MeasuredPoint]] = defaultdict(list)
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            key = (row["dataset"], row["network"], int(row["batch_size"]))
            groups[key].append(
                MeasuredPoint(
                    float(row["power_limit"]),
                    float(row["time_per_epoch"]),
                    float(row["average_power"]),
                )
            )
    return groups


def test_committed_profiles_reproduce_the_measured_traces() -> None:
    workloads = load_workloads()
    checked = 0
    for name, path in bundled_trace_paths().items():
        sku = find_sku(name)
        if sku is None or sku.calibrated_from != path.name:
            continue  # a trace the committed profiles were not fitted to
        time_errs: list[float] = []
        power_errs: list[float] = []
        for (dataset, network, bs), points in _trace_groups(path).items():
            wl = workloads[f"{sku.name}/{dataset}/{network}/bs{bs}"]
            assert wl.sku == sku.name
            for t, p in relative_errors(sku.model, wl.model, points):
                time_errs.append(abs(t))
                power_errs.append(abs(p))
        assert statistics.median(time_errs) <= 0.05, path.name
        assert statistics.median(power_errs) <= 0.05, path.name
        checked += 1
    assert checked >= 1, "no committed calibration matches a bundled trace"


# --- the micro-batch term ----------------------------------------------------------------------

MB = replace(WL, micro_batch_overhead=0.3, micro_batch_activity_exp=0.5)


def test_micro_batch_term_is_one_at_its_own_micro_batch() -> None:
    assert micro_batch_time_factor(MB, 1.0) == pytest.approx(1.0)
    assert micro_batch_activity_factor(MB, 1.0) == pytest.approx(1.0)
    assert at_micro_batch(MB, 1.0) is MB


def test_micro_batch_term_has_the_documented_form() -> None:
    assert micro_batch_time_factor(MB, 0.5) == pytest.approx(0.3 / 0.5 + 0.7)
    assert micro_batch_activity_factor(MB, 0.5) == pytest.approx((0.3 / 0.5 + 0.7) ** -0.5)
    scaled = at_micro_batch(MB, 0.25)
    t = 0.3 / 0.25 + 0.7
    assert scaled.step_time_s == pytest.approx(MB.step_time_s * t)
    assert scaled.activity == pytest.approx(MB.activity * t**-0.5)
    assert scaled.compute_share == MB.compute_share and scaled.ripple == MB.ripple
    # The busy power follows the scaled activity, the step time the scaled step time.
    assert predict(GPU, scaled, 300.0) == pytest.approx(
        (MB.step_time_s * t, power_at_clock_w(GPU, MB.activity * t**-0.5, 1740.0))
    )


def test_per_sample_time_falls_and_activity_rises_and_saturates_with_the_micro_batch() -> None:
    scales = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0, 64.0, 1024.0]
    times = [micro_batch_time_factor(MB, s) for s in scales]
    acts = [micro_batch_activity_factor(MB, s) for s in scales]
    assert all(a > b for a, b in itertools.pairwise(times))  # per global step = per sample
    assert all(a < b for a, b in itertools.pairwise(acts))
    # Saturation: no overhead left, no more to gain.
    assert times[-1] == pytest.approx(1.0 - 0.3, rel=1e-3)
    assert all(a <= (1.0 - 0.3) ** -0.5 for a in acts)
    assert acts[-1] == pytest.approx((1.0 - 0.3) ** -0.5, rel=1e-3)
    # Time per micro-batch still grows with it (more samples each), less than in proportion.
    per_micro_batch = [t * s for t, s in zip(times, scales, strict=True)]
    assert all(a < b for a, b in itertools.pairwise(per_micro_batch))


def test_micro_batch_scaling_composes() -> None:
    once = at_micro_batch(MB, 0.125)
    twice = at_micro_batch(at_micro_batch(MB, 0.5), 0.25)
    assert twice.step_time_s == pytest.approx(once.step_time_s)
    assert twice.activity == pytest.approx(once.activity)
    assert twice.micro_batch_overhead == pytest.approx(once.micro_batch_overhead)
    back = at_micro_batch(once, 8.0)
    assert back.step_time_s == pytest.approx(MB.step_time_s)
    assert back.activity == pytest.approx(MB.activity)


@pytest.mark.parametrize("scale", [0.01, 0.5, 3.0, 100.0])
def test_the_default_micro_batch_term_vanishes(scale: float) -> None:
    assert (WL.micro_batch_overhead, WL.micro_batch_activity_exp) == (0.0, 1.0)
    assert micro_batch_time_factor(WL, scale) == 1.0
    assert micro_batch_activity_factor(WL, scale) == 1.0
    assert at_micro_batch(WL, scale) == WL


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_a_bad_micro_batch_scale_is_refused(scale: float) -> None:
    with pytest.raises(ValueError, match="finite positive"):
        at_micro_batch(MB, scale)
    with pytest.raises(ValueError, match="finite positive"):
        micro_batch_time_factor(MB, scale)


def test_fit_micro_batch_recovers_known_parameters() -> None:
    truth = MicroBatchFit(
        overhead_batch=48.0, activity_exp=0.6, time_floor_s=30.0, activity_max=0.8
    )
    points = []
    for bs in [4, 8, 16, 32, 64, 128, 256, 512, 1024]:
        t, p = truth.predict(GPU, bs)
        points.append(MicroBatchPoint(batch_size=bs, time_s=t, power_w=p))
    fitted = fit_micro_batch(points, GPU)
    assert fitted.overhead_batch == pytest.approx(48.0, rel=0.02)
    assert fitted.activity_exp == pytest.approx(0.6, abs=0.02)
    assert fitted.time_floor_s == pytest.approx(30.0, rel=0.01)
    assert fitted.activity_max == pytest.approx(0.8, abs=0.02)
    assert fitted.overhead_share(48.0) == pytest.approx(0.5, abs=0.01)
    # The fitted term, as a workload's o and beta at bs 64, predicts bs 16 from bs 64.
    at_64 = WorkloadModel(
        activity=truth.activity_max * (64 / (64 + 48)) ** 0.6,
        compute_share=0.5,
        step_time_s=truth.predict(GPU, 64)[0],
        ripple=0.05,
        micro_batch_overhead=fitted.overhead_share(64),
        micro_batch_activity_exp=fitted.activity_exp,
    )
    at_16 = at_micro_batch(at_64, 0.25)
    t16, p16 = truth.predict(GPU, 16)
    assert at_16.step_time_s == pytest.approx(t16, rel=0.01)
    assert power_at_clock_w(GPU, at_16.activity, GPU.sm_clock_max_mhz) == pytest.approx(
        p16, rel=0.01
    )


def test_fit_micro_batch_rejects_too_few_or_bad_points() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fit_micro_batch([MicroBatchPoint(8, 1.0, 90.0), MicroBatchPoint(8, 1.1, 91.0)], GPU)
    with pytest.raises(ValueError, match="positive"):
        fit_micro_batch([MicroBatchPoint(8, 1.0, 90.0), MicroBatchPoint(16, 0.0, 91.0)], GPU)


def test_the_training_workload_carries_the_fitted_micro_batch_term() -> None:
    wl = get_workload("training")
    assert 0.0 < wl.micro_batch_overhead < 1.0
    assert wl.micro_batch_activity_exp >= 0.0
    assert wl.model.micro_batch_overhead == wl.micro_batch_overhead
    assert wl.model.micro_batch_activity_exp == wl.micro_batch_activity_exp
