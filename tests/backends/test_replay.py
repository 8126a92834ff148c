"""The replay backend: what it reads from a trace, and how it plays it."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from telemetry.backends.base import InvalidSettingError, ThrottleReason
from telemetry.backends.replay import (
    ReplayBackend,
    ReplayNoise,
    gpu_name_from_path,
    load_trace,
    steps_per_epoch,
)
from telemetry.backends.traces import resolve_trace
from telemetry.clock import VirtualClock

A40 = resolve_trace("a40")
P100 = resolve_trace("p100")


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    """A trace for a GPU nobody measured, columns in another order, one limit measured twice."""
    path = tmp_path / "summary_power_h100.csv"
    rows = ["power_limit,average_power,time_per_epoch,dataset,network,batch_size,optimizer"]
    for limit, power, t in [(200, 190, 30.0), (450, 400, 12.0), (700, 560, 10.0), (700, 540, 10.0)]:
        rows.append(f"{limit},{power},{t},wiki,gpt,32,adam")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_loads_every_curve_of_the_bundled_traces() -> None:
    a40, p100 = load_trace(A40), load_trace(P100)
    assert len(a40) == 53 and len(p100) == 45
    assert {c.gpu for c in a40} == {"A40"} and {c.gpu for c in p100} == {"P100"}
    curve = next(c for c in a40 if c.workload == "imagenet/resnet50" and c.batch_size == 256)
    assert curve.limits_w == tuple(float(w) for w in range(100, 301, 25))


def test_loads_any_file_in_the_format(synthetic: Path) -> None:
    (curve,) = load_trace(synthetic)
    assert curve.gpu == gpu_name_from_path(synthetic) == "H100"
    assert curve.limits_w == (200.0, 450.0, 700.0)
    assert curve.average_power_w[-1] == pytest.approx(550.0)  # the two rows averaged
    assert curve.at(325) == pytest.approx((21.0, 295.0))  # halfway between 200 and 450 W
    assert curve.at(100) == curve.at(200) and curve.at(800) == curve.at(700)


def test_rejects_a_file_that_is_not_a_trace(tmp_path: Path) -> None:
    bad = tmp_path / "x.csv"
    bad.write_text("dataset,network,batch_size\nx,y,1\n")
    with pytest.raises(ValueError, match="missing column"):
        load_trace(bad)


def test_unknown_or_ambiguous_workload_names_the_choices() -> None:
    with pytest.raises(LookupError, match="not in the trace"):
        ReplayBackend(A40, "imagenet", 7)
    with pytest.raises(LookupError, match="ambiguous"):
        ReplayBackend(A40, "bert_base_uncased", 8)  # squad and sentiment140 both use it


def test_limit_selects_the_traces_operating_point_and_energy_is_exact() -> None:
    clock = VirtualClock()
    b = ReplayBackend(A40, "imagenet/resnet50", 256, clock=clock, noise=ReplayNoise.off())
    info = b.devices()[0]
    assert (info.min_limit_mw, info.max_limit_mw, info.default_limit_mw) == (
        100_000, 300_000, 300_000,
    )
    b.set_power_limit(0, 175_000)
    t_epoch, p = b.curve.at(175)
    assert b.epoch_time_s() == pytest.approx(t_epoch) and b.power_w() == pytest.approx(p)
    assert b.steps_per_epoch == steps_per_epoch("imagenet", 256) == 5005
    e0, t0 = b.energy_mj(), clock.now()
    took = b.run_steps(100)
    assert took == pytest.approx(100 * t_epoch / 5005)
    assert clock.now() - t0 == pytest.approx(took)
    assert (b.energy_mj() - e0) / 1000 == pytest.approx(p * took, rel=1e-6)
    reading = b.read(0)
    assert reading.power_limit_mw == 175_000
    assert reading.throttle_reasons == ThrottleReason.SW_POWER_CAP  # 160 W drawn under 175 W


def test_out_of_range_limit_names_the_range() -> None:
    b = ReplayBackend(P100, "squad", 8, clock=VirtualClock())
    with pytest.raises(InvalidSettingError, match=r"125000\.\.250000"):
        b.set_power_limit(0, 300_000)


def test_noise_is_seeded_per_step_range_and_the_counter_never_goes_back() -> None:
    def durations(seed: int, first_limit_mw: int) -> list[float]:
        b = ReplayBackend(A40, "squad", 32, clock=VirtualClock(), seed=seed)
        b.set_power_limit(0, first_limit_mw)
        b.run_steps(10)
        b.set_power_limit(0, 300_000)
        energies, out = [b.energy_mj()], []
        for n in (1, 5, 50):
            out.append(b.run_steps(n) / (n * b.step_time_s()))
            energies.append(b.energy_mj())
        assert energies == sorted(energies)
        return out

    same = durations(1, 300_000)
    assert durations(1, 150_000) == pytest.approx(same)  # other settings earlier, same noise
    assert durations(2, 300_000) != pytest.approx(same)
    assert all(0.5 < r < 1.5 for r in same)


def test_noise_belongs_to_steps_not_to_how_they_are_cut_into_runs() -> None:
    def run(chunks: list[int]) -> tuple[float, int]:
        b = ReplayBackend(A40, "squad", 32, clock=VirtualClock(), seed=4)
        took = sum(b.run_steps(n) for n in chunks)
        return took, b.energy_mj()

    whole_t, whole_e = run([1000])
    cut_t, cut_e = run([1, 7, 200, 92, 700])
    assert cut_t == pytest.approx(whole_t, rel=1e-9)
    # A run draws its mean power for its whole time; the product of the two means differs from
    # the mean of the steps' products by their noises' covariance: a few parts per million here.
    assert cut_e == pytest.approx(whole_e, rel=1e-4)
    assert run([1000, 1])[1] != pytest.approx(whole_e, rel=1e-4)  # one step more does show
    b = ReplayBackend(A40, "squad", 32, clock=VirtualClock(), seed=4)
    step_s = b.step_time_s()
    one = [b.run_steps(1) / step_s - 1.0 for _ in range(4000)]
    assert statistics.pstdev(one) == pytest.approx(0.04, rel=0.05)  # step_time_cv per step
    assert abs(statistics.fmean(one)) < 0.003
    assert abs(statistics.correlation(one[:-1], one[1:])) < 0.05  # independent steps


def test_each_curve_has_its_own_noise() -> None:
    # Jobs of different workloads are different runs: one seed does not give them one draw.
    def jitters(batch_size: int) -> list[float]:
        b = ReplayBackend(A40, "squad", batch_size, clock=VirtualClock(), seed=1)
        return [b.run_steps(1) / b.step_time_s() for _ in range(20)]

    assert jitters(32) != pytest.approx(jitters(16), rel=1e-3)
    assert jitters(32) == jitters(32)


def test_readings_are_noisy_around_the_trace() -> None:
    b = ReplayBackend(A40, "squad", 32, clock=VirtualClock(), seed=3)
    powers = [b.read(0).power_mw or 0 for _ in range(200)]
    mean_w = sum(powers) / len(powers) / 1000
    assert mean_w == pytest.approx(b.power_w(), rel=0.02)
    assert len(set(powers)) > 100


def test_clock_lock_is_emulated_as_a_cap() -> None:
    b = ReplayBackend(A40, "imagenet/resnet50", 256, clock=VirtualClock(), noise=ReplayNoise.off())
    info = b.devices()[0]
    assert info.min_sm_clock_mhz is not None and info.max_sm_clock_mhz is not None
    top = b.power_w()
    b.lock_sm_clocks(0, info.min_sm_clock_mhz, info.max_sm_clock_mhz)
    assert b.power_w() == pytest.approx(top)
    mid = (info.min_sm_clock_mhz + info.max_sm_clock_mhz) // 2
    b.lock_sm_clocks(0, info.min_sm_clock_mhz, mid)
    assert b.power_w() < top and b.read(0).sm_clock_mhz == mid
    assert b.read(0).throttle_reasons == ThrottleReason.APPLICATIONS_CLOCKS_SETTING
    b.reset_sm_clocks(0)
    assert b.power_w() == pytest.approx(top)


def test_play_switches_to_a_new_phase() -> None:
    b = ReplayBackend(A40, "imagenet/resnet50", 256, clock=VirtualClock(), noise=ReplayNoise.off())
    before = b.step_time_s()
    b.play("imagenet/resnet50", 64)
    assert b.curve.batch_size == 64 and b.step_time_s() != before
