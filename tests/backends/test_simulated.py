"""The simulated GPU backend: physics, sensors, persistence, cross-process changes and faults.

Every test runs on a ``VirtualClock``: nothing sleeps on the wall clock.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from energy.gpu_model import (
    at_micro_batch,
    energy_per_step_j,
    least_energy_clock_mhz,
    operating_point,
    power_at_clock_w,
)
from telemetry.backends.base import (
    GpuLostError,
    GpuNotFoundError,
    GpuPermissionError,
    InvalidSettingError,
    NotSupportedError,
    ThrottleReason,
)
from telemetry.backends.profiles import Workload, get_sku, get_workload
from telemetry.backends.simulated import (
    LIMIT_RESPONSE_S,
    NOISE_FRACTION,
    FaultKind,
    SimulatedBackend,
)
from telemetry.clock import VirtualClock

Factory = Callable[..., SimulatedBackend]
H100 = get_sku("H100-SXM")


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    return tmp_path / "sim.json"


@pytest.fixture
def make(clock: VirtualClock, state_path: Path) -> Factory:
    def factory(**kwargs: object) -> SimulatedBackend:
        args: dict[str, object] = {"gpus": 2, "clock": clock, "state_path": state_path}
        args.update(kwargs)
        return SimulatedBackend(**args)  # type: ignore[arg-type]

    return factory


# --- physics ---------------------------------------------------------------------------------


def test_idle_gpu_sits_at_idle_power_and_clock(make: Factory, clock: VirtualClock) -> None:
    sim = make()
    clock.advance(5.0)
    r = sim.read(0)
    assert r.sm_clock_mhz == 345
    assert r.power_avg_mw == pytest.approx(75_000, abs=1)
    assert r.throttle_reasons == ThrottleReason.GPU_IDLE
    assert r.gpu_util_pct == 0 and r.processes == ()


def test_full_training_load_draws_the_h100_reference_power(
    make: Factory, clock: VirtualClock
) -> None:
    sim = make()
    sim.set_workload(0, "training", pids=[4242])
    clock.advance(2.0)
    r = sim.read(0)
    assert 645_000 <= (r.power_avg_mw or 0) <= 680_000
    assert r.sm_clock_mhz == 1980 and r.throttle_reasons == 0
    assert [p.pid for p in r.processes] == [4242]
    assert (r.gpu_util_pct or 0) > 50 and (r.memory_used_bytes or 0) > 10 * 2**30
    assert sim.step_slowdown(0) == pytest.approx(1.0)


def test_a_binding_power_limit_lowers_the_clock_and_holds_power(
    make: Factory, clock: VirtualClock
) -> None:
    sim = make()
    sim.set_workload(0, "training")
    sim.set_power_limit(0, 400_000)
    clock.advance(3.0)
    r = sim.read(0)
    assert r.power_limit_mw == 400_000
    assert (r.sm_clock_mhz or 0) < 1980
    assert (r.power_avg_mw or 0) <= 400_000
    assert (r.throttle_reasons or 0) & ThrottleReason.SW_POWER_CAP
    assert sim.step_slowdown(0) > 1.0
    # The other GPU is untouched.
    assert sim.read(1).throttle_reasons == ThrottleReason.GPU_IDLE


def test_a_power_limit_takes_effect_after_the_response_delay(
    make: Factory, clock: VirtualClock
) -> None:
    sim = make()
    sim.set_workload(0, "training")
    before = sim.true_power_w(0)
    sim.set_power_limit(0, 300_000)
    clock.advance(LIMIT_RESPONSE_S / 2)
    assert sim.true_power_w(0) == before
    clock.advance(LIMIT_RESPONSE_S)
    assert sim.true_power_w(0) * (1 + get_workload("training").ripple) <= 300.0
    sim.reset_power_limit(0)
    clock.advance(2 * LIMIT_RESPONSE_S)
    assert sim.true_power_w(0) == pytest.approx(before)


def test_locked_clocks_cap_the_clock(make: Factory, clock: VirtualClock) -> None:
    sim = make()
    sim.set_workload(0, "training")
    sim.lock_sm_clocks(0, 1000, 1200)
    clock.advance(1.0)
    r = sim.read(0)
    assert r.sm_clock_mhz is not None and r.sm_clock_mhz <= 1200
    assert r.throttle_reasons == ThrottleReason.APPLICATIONS_CLOCKS_SETTING
    assert sim.true_power_w(0) < 600.0
    sim.reset_sm_clocks(0)
    clock.advance(1.0)
    assert sim.read(0).sm_clock_mhz == 1980
    # An idle GPU with locked clocks holds the lower end of the lock.
    sim.set_workload(0, None)
    sim.lock_sm_clocks(0, 1000, 1200)
    clock.advance(1.0)
    assert sim.read(0).sm_clock_mhz == 1000


def test_least_energy_clock_is_below_the_top_clock_on_the_backend(
    make: Factory, clock: VirtualClock
) -> None:
    workload = get_workload("training")
    best = least_energy_clock_mhz(H100.model, workload.model)
    assert best < H100.sm_clock_max_mhz

    sim = make()
    sim.set_workload(0, workload)

    def energy_per_step_at(lock_mhz: int) -> float:
        sim.lock_sm_clocks(0, 345, lock_mhz)
        clock.advance(1.0)
        return sim.true_power_w(0) * workload.step_time_s * sim.step_slowdown(0)

    at_best = energy_per_step_at(round(best))
    at_top = energy_per_step_at(1980)
    assert at_best < at_top
    assert at_best == pytest.approx(energy_per_step_j(H100.model, workload.model, best))


def test_step_slowdown_is_the_step_time_ratio(make: Factory, clock: VirtualClock) -> None:
    sim = make()
    wl = Workload("half", activity=0.8, compute_share=0.5, step_time_s=1.0)
    sim.set_workload(0, wl)
    sim.lock_sm_clocks(0, 345, 990)  # half of 1980 MHz
    clock.advance(1.0)
    assert sim.true_clock_mhz(0) == 990
    assert sim.step_slowdown(0) == pytest.approx(0.5 * 2 + 0.5)
    assert sim.workload(0) == wl


# --- sensors ---------------------------------------------------------------------------------


def test_instant_power_noise_is_bounded_and_deterministic(
    make: Factory, clock: VirtualClock, tmp_path: Path
) -> None:
    sim = make()
    twin = SimulatedBackend(gpus=2, clock=clock, state_path=None, seed=0)
    other = SimulatedBackend(gpus=2, clock=clock, state_path=None, seed=1)
    for s in (sim, twin, other):
        s.set_workload(0, "training")
    clock.advance(1.0)
    ratios = []
    differs = 0
    for _ in range(200):
        clock.advance(0.1)
        a, b, c = sim.read(0), twin.read(0), other.read(0)
        assert a.power_mw == b.power_mw  # same seed, GPU and window: same value
        differs += a.power_mw != c.power_mw
        ratios.append((a.power_mw or 0) / (sim.true_power_w(0) * 1000))
    assert all(abs(x - 1) <= NOISE_FRACTION + 1e-6 for x in ratios)
    assert max(ratios) - min(ratios) > NOISE_FRACTION  # there is noise
    assert differs > 150


def test_values_update_every_100_ms(make: Factory, clock: VirtualClock) -> None:
    sim = make()
    sim.set_workload(0, "training")
    clock.advance(1.0 - clock.now() % 0.1 + 0.01)  # 10 ms into a window
    first = sim.read(0)
    clock.advance(0.05)
    same = sim.read(0)
    assert (same.power_mw, same.energy_mj) == (first.power_mw, first.energy_mj)
    clock.advance(0.1)
    assert (sim.read(0).energy_mj or 0) > (first.energy_mj or 0)


def test_power_average_is_the_exact_mean_of_the_last_second(
    make: Factory, clock: VirtualClock
) -> None:
    sim = make()
    clock.advance(10.0)
    idle_w = sim.true_power_w(0)
    sim.set_workload(0, "training")
    busy_w = sim.true_power_w(0)
    clock.advance(0.55)  # the sensor window ends 0.5 s after the change
    expected_mw = (0.5 * idle_w + 0.5 * busy_w) * 1000
    assert sim.read(0).power_avg_mw == pytest.approx(expected_mw, abs=1)
    clock.advance(1.0)
    assert sim.read(0).power_avg_mw == pytest.approx(busy_w * 1000, abs=1)


def test_energy_counter_is_monotonic_and_matches_true_energy(
    make: Factory, clock: VirtualClock
) -> None:
    sim = make()
    last = -1
    max_power_mw = H100.max_limit_w * 1000
    for step in range(300):
        if step % 50 == 10:
            sim.set_workload(0, "training" if step % 100 == 10 else None)
        if step % 70 == 5:
            sim.set_power_limit(0, 250_000 + 1000 * step)
        clock.advance(0.037)
        r = sim.read(0)
        assert r.energy_mj is not None and r.energy_mj >= last
        last = r.energy_mj
        gap_mj = sim.true_energy_mj(0) - r.energy_mj
        assert -1 <= gap_mj <= max_power_mw * 0.1 + 1  # within one 100 ms update


def test_energy_is_exact_over_time_without_drift(make: Factory, clock: VirtualClock) -> None:
    sim = make()
    sim.set_workload(0, "training")
    clock.advance(1.0)
    start, start_s = sim.true_energy_mj(0), clock.now()
    power_w = sim.true_power_w(0)
    for _ in range(10_000):
        clock.advance(0.1)
        sim.read(0)
    elapsed_s = clock.now() - start_s  # about 1000 s (the float clock rounds each step)
    assert sim.true_energy_mj(0) - start == pytest.approx(power_w * 1000.0 * elapsed_s, rel=1e-12)


def test_temperature_lags_power(make: Factory, clock: VirtualClock) -> None:
    sim = make()
    clock.advance(600.0)
    idle_c = sim.read(0).temperature_c or 0
    sim.set_workload(0, "training")
    clock.advance(1.0)
    soon_c = sim.read(0).temperature_c or 0
    clock.advance(600.0)
    hot_c = sim.read(0).temperature_c or 0
    assert idle_c <= soon_c < idle_c + 5 < hot_c
    expected_hot = H100.ambient_c + H100.thermal_c_per_w * sim.true_power_w(0)
    assert hot_c == pytest.approx(expected_hot, abs=1)


# --- persistence -----------------------------------------------------------------------------


def test_settings_and_energy_survive_a_restart(
    make: Factory, clock: VirtualClock, state_path: Path
) -> None:
    first = make()
    first.set_workload(0, "training", pids=[7])
    first.set_power_limit(0, 450_000)
    first.lock_sm_clocks(1, 900, 1500)
    clock.advance(5.0)
    energy_at_stop = first.true_energy_mj(0)
    counter_at_stop = first.read(0).energy_mj or 0
    power_w = first.true_power_w(0)
    first.close()
    del first

    clock.advance(3600.0)  # the "daemon" is down for an hour; the GPU keeps running
    second = make()
    r = second.read(0)
    assert r.power_limit_mw == 450_000
    assert [p.pid for p in r.processes] == [7]
    assert second.workload(0) == get_workload("training")
    assert (r.throttle_reasons or 0) & ThrottleReason.SW_POWER_CAP
    assert second.true_energy_mj(0) == pytest.approx(energy_at_stop + power_w * 3_600_000, rel=1e-9)
    assert (r.energy_mj or 0) > counter_at_stop
    second.set_workload(1, "training")
    clock.advance(1.0)
    assert (second.read(1).sm_clock_mhz or 0) <= 1500


def test_state_file_is_small_json_and_memory_only_without_a_path(
    clock: VirtualClock, state_path: Path
) -> None:
    sim = SimulatedBackend(gpus=8, clock=clock, state_path=state_path)
    sim.set_workload(3, "training")
    doc = json.loads(state_path.read_text())
    assert doc["sku"] == "H100-SXM" and len(doc["gpus"]) == 8
    assert state_path.stat().st_size < 16_000
    assert not list(state_path.parent.glob("sim.json.*[!k]"))  # no temporary files left

    memory = SimulatedBackend(gpus=2, clock=clock, state_path=None)
    memory.set_workload(0, "training")
    assert memory.workload(0) is not None
    assert SimulatedBackend(gpus=2, clock=clock, state_path=None).workload(0) is None


def test_unreadable_or_foreign_state_starts_a_fresh_node(
    make: Factory, state_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        sim = make()
    assert "unreadable" in caplog.text
    assert sim.read(0).power_limit_mw == 700_000
    a40 = make(sku="A40")
    assert a40.read(0).power_limit_mw == 300_000
    assert json.loads(state_path.read_text())["sku"] == "A40"


# --- changes from another process -------------------------------------------------------------


def test_a_change_from_another_process_is_noticed(
    make: Factory, clock: VirtualClock
) -> None:
    daemon = make()
    cli = make()
    assert daemon.read(0).throttle_reasons == ThrottleReason.GPU_IDLE
    cli.set_workload(0, "training")
    clock.advance(0.3)
    r = daemon.read(0)
    assert r.gpu_util_pct and r.throttle_reasons == 0
    cli.inject_fault(0, FaultKind.GPU_LOST)
    clock.advance(0.3)
    with pytest.raises(GpuLostError):
        daemon.read(0)
    cli.clear_faults()
    clock.advance(0.3)
    assert daemon.read(0).power_mw


def test_writes_merge_with_changes_from_another_process(make: Factory) -> None:
    daemon = make()
    cli = make()
    daemon.read(0)  # the daemon has just checked the file
    cli.set_workload(1, "training")
    daemon.set_power_limit(0, 500_000)  # no time passes: must not lose the CLI's change
    assert daemon.workload(1) == get_workload("training")
    fresh = make()
    assert fresh.workload(1) == get_workload("training")
    assert fresh.read(0).power_limit_mw == 500_000


def test_reads_check_the_state_file_at_most_every_quarter_second(
    make: Factory, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make()
    calls = 0
    real_stat = os.stat

    def counting_stat(*args: object, **kwargs: object) -> os.stat_result:
        nonlocal calls
        calls += 1
        return real_stat(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", counting_stat)
    for _ in range(100):
        clock.advance(0.01)
        sim.read(0)
        sim.read(1)
    assert 2 <= calls <= 5  # 1 s of reads: about four checks, not 200


# --- faults and errors ------------------------------------------------------------------------


def test_gpu_lost(make: Factory) -> None:
    sim = make()
    sim.inject_fault(1, "gpu_lost")
    with pytest.raises(GpuLostError):
        sim.read(1)
    with pytest.raises(GpuLostError):
        sim.set_power_limit(1, 300_000)
    assert sim.read(0).power_mw  # the other GPU still answers
    sim.clear_faults(1)
    assert sim.read(1).power_mw


def test_fields_not_supported_read_none(make: Factory) -> None:
    sim = make()
    sim.set_workload(0, "training", pids=[1])
    sim.inject_fault(0, FaultKind.NOT_SUPPORTED, fields=["energy_mj", "power_mw", "processes"])
    r = sim.read(0)
    assert r.energy_mj is None and r.power_mw is None and r.processes == ()
    assert r.power_avg_mw and r.sm_clock_mhz
    sim.set_power_limit(0, 300_000)  # the limit itself is still supported
    sim.inject_fault(0, FaultKind.NOT_SUPPORTED, fields=["power_limit_mw"])
    assert sim.read(0).power_limit_mw is None
    with pytest.raises(NotSupportedError):
        sim.set_power_limit(0, 300_000)
    with pytest.raises(ValueError, match="fields"):
        sim.inject_fault(0, FaultKind.NOT_SUPPORTED, fields=["bogus"])
    with pytest.raises(ValueError, match="fields"):
        sim.inject_fault(0, FaultKind.NOT_SUPPORTED)
    fresh = make()  # a backend opened under the fault probes no energy counter
    sim.inject_fault(0, FaultKind.NOT_SUPPORTED, fields=["energy_mj"])
    assert fresh.devices()[0].has_energy_counter
    assert not make().devices()[0].has_energy_counter


def test_permission_denied_on_setters(make: Factory) -> None:
    sim = make()
    sim.inject_fault(0, FaultKind.PERMISSION_DENIED)
    setters: list[Callable[[], None]] = [
        lambda: sim.set_power_limit(0, 300_000),
        lambda: sim.reset_power_limit(0),
        lambda: sim.lock_sm_clocks(0, 345, 1000),
        lambda: sim.reset_sm_clocks(0),
    ]
    for call in setters:
        with pytest.raises(GpuPermissionError):
            call()
    assert sim.read(0).power_limit_mw == 700_000
    sim.set_power_limit(1, 300_000)  # only GPU 0 is denied


def test_slow_calls_take_their_time_on_the_clock(make: Factory, clock: VirtualClock) -> None:
    sim = make()
    sim.inject_fault(0, FaultKind.SLOW, seconds=2.5)
    start = clock.now()
    r = sim.read(0)
    assert clock.now() - start == pytest.approx(2.5)
    assert r.sampled_at.timestamp() == pytest.approx(start + 2.5)
    sim.set_power_limit(0, 300_000)
    assert clock.now() - start == pytest.approx(5.0)
    with pytest.raises(ValueError, match="seconds"):
        sim.inject_fault(0, FaultKind.SLOW)
    with pytest.raises(ValueError):
        sim.inject_fault(0, "melted")


def test_errors_name_what_is_allowed(make: Factory, clock: VirtualClock) -> None:
    with pytest.raises(ValueError, match="H100-SXM"):
        SimulatedBackend(gpus=1, sku="Z9000", clock=clock)
    sim = make()
    with pytest.raises(InvalidSettingError, match=r"200000\.\.700000"):
        sim.set_power_limit(0, 100_000)
    with pytest.raises(InvalidSettingError, match=r"345\.\.1980"):
        sim.lock_sm_clocks(0, 100, 1000)
    unknown_gpu: list[Callable[[], object]] = [
        lambda: sim.read(2),
        lambda: sim.set_power_limit(5, 300_000),
        lambda: sim.set_workload(-1, "training"),
        lambda: sim.inject_fault(9, FaultKind.GPU_LOST),
    ]
    for call in unknown_gpu:
        with pytest.raises(GpuNotFoundError):
            call()
    with pytest.raises(ValueError, match="training"):
        sim.set_workload(0, "no-such-workload")


# --- duty-cycled (paced) load ----------------------------------------------------------------


def test_duty_mixes_busy_and_idle_power_and_scales_utilisation(
    make: Factory, clock: VirtualClock
) -> None:
    sim = make()
    sim.set_workload(0, "training", duty=1.0)
    busy_w = sim.true_power_w(0)
    busy_util = sim.read(0).gpu_util_pct or 0
    sim.set_workload(0, "training", duty=0.25)
    clock.advance(2.0)
    expected_w = 0.25 * busy_w + 0.75 * H100.idle_power_w
    assert sim.true_power_w(0) == pytest.approx(expected_w, rel=1e-12)
    r = sim.read(0)
    assert (r.power_avg_mw or 0) == pytest.approx(expected_w * 1000, abs=1)
    assert r.gpu_util_pct == round(busy_util * 0.25)
    assert r.sm_clock_mhz == 1980  # the bursts run at the busy clock
    assert sim.step_slowdown(0) == pytest.approx(1.0)
    assert sim.duty(0) == 0.25
    # Duty 0 with a workload: the GPU idles but the job's processes stay on it.
    sim.set_workload(0, "training", pids=[9], duty=0.0)
    assert sim.true_power_w(0) == pytest.approx(H100.idle_power_w)
    assert [p.pid for p in sim.read(0).processes] == [9]


def test_power_limit_acts_on_the_busy_bursts(make: Factory, clock: VirtualClock) -> None:
    sim = make()
    sim.set_workload(0, "training")
    sim.set_power_limit(0, 300_000)
    clock.advance(1.0)
    capped_w = sim.true_power_w(0)
    capped_slowdown = sim.step_slowdown(0)
    assert capped_w * (1 + get_workload("training").ripple) <= 300.0
    sim.set_workload(0, "training", duty=0.5)
    clock.advance(1.0)
    # The limit still binds on the bursts: same clock, same slowdown, power mixed with idle.
    assert sim.step_slowdown(0) == pytest.approx(capped_slowdown)
    assert sim.true_power_w(0) == pytest.approx(0.5 * capped_w + 0.5 * H100.idle_power_w)
    assert (sim.read(0).throttle_reasons or 0) & ThrottleReason.SW_POWER_CAP


def test_energy_stays_exact_across_duty_changes(make: Factory, clock: VirtualClock) -> None:
    sim = make()
    start_mj = sim.true_energy_mj(0)
    expected_j = 0.0
    for i, duty in enumerate([1.0, 0.3, 0.7, 0.05, 1.0, 0.5]):
        sim.set_workload(0, "training", duty=duty)
        power_w = sim.true_power_w(0)
        t0 = clock.now()
        clock.advance(0.37 + 0.11 * i)
        expected_j += power_w * (clock.now() - t0)  # the float clock rounds each step
    assert sim.true_energy_mj(0) - start_mj == pytest.approx(expected_j * 1000, rel=1e-9)
    counter_mj = sim.read(0).energy_mj or 0
    assert sim.true_energy_mj(0) - counter_mj <= H100.max_limit_w * 1000 * 0.1 + 1


def test_duty_is_persisted_validated_and_reset_by_idle(make: Factory, clock: VirtualClock) -> None:
    first = make()
    first.set_workload(1, "training", duty=0.4)
    power_w = first.true_power_w(1)
    del first
    clock.advance(1.0)
    second = make()
    assert second.duty(1) == 0.4
    assert second.true_power_w(1) == pytest.approx(power_w)
    with pytest.raises(ValueError, match="duty"):
        second.set_workload(1, "training", duty=1.5)
    with pytest.raises(ValueError, match="duty"):
        second.set_workload(1, "training", duty=-0.1)
    assert second.duty(1) == 0.4  # a refused change changes nothing
    second.set_workload(1, None, duty=0.4)
    assert second.duty(1) == 1.0
    assert second.true_power_w(1) == pytest.approx(H100.idle_power_w)


# --- micro-batches ---------------------------------------------------------------------------

#: A workload with a known micro-batch term (30 % overhead at its own micro-batch, beta 0.5).
MICRO = Workload(
    "micro",
    activity=0.6,
    compute_share=0.5,
    step_time_s=1.0,
    micro_batch_overhead=0.3,
    micro_batch_activity_exp=0.5,
)


@pytest.mark.parametrize("scale", [0.25, 0.5, 2.0])
def test_micro_batch_scale_changes_power_and_slowdown_as_the_model_says(
    make: Factory, clock: VirtualClock, scale: float
) -> None:
    sim = make()
    sim.set_workload(0, MICRO)
    clock.advance(1.0)
    own_w = sim.true_power_w(0)
    sim.set_workload(0, MICRO, micro_batch_scale=scale)
    clock.advance(1.0)
    assert sim.micro_batch_scale(0) == scale
    t = 0.3 / scale + 0.7
    activity = 0.6 * t**-0.5
    limit_w = H100.default_limit_w
    op = operating_point(H100.model, at_micro_batch(MICRO.model, scale), limit_w)
    assert not op.power_capped  # the limit does not bind: the clock stays at the top
    assert sim.true_power_w(0) == pytest.approx(
        power_at_clock_w(H100.model, activity, H100.sm_clock_max_mhz), rel=1e-12
    )
    assert (sim.true_power_w(0) < own_w) == (scale < 1.0)
    # The step's T(s) is the job's to take (a step is stretched, never shortened): the
    # slowdown is the clock's, at the top here.
    assert sim.step_slowdown(0) == pytest.approx(1.0)


def test_the_slowdown_at_a_micro_batch_is_the_clock_s_alone(
    make: Factory, clock: VirtualClock
) -> None:
    sim = make()
    sim.set_workload(0, MICRO, micro_batch_scale=0.5)
    sim.lock_sm_clocks(0, 345, 990)  # half of 1980 MHz
    clock.advance(1.0)
    assert sim.true_clock_mhz(0) == 990
    assert sim.step_slowdown(0) == pytest.approx(0.5 * 2 + 0.5)


def test_micro_batch_scale_without_a_term_changes_nothing(
    make: Factory, clock: VirtualClock
) -> None:
    sim = make()
    plain = Workload("plain", activity=0.8, compute_share=0.5, step_time_s=1.0)
    sim.set_workload(0, plain)
    clock.advance(1.0)
    power_w = sim.true_power_w(0)
    sim.set_workload(0, plain, micro_batch_scale=0.25)
    clock.advance(1.0)
    assert sim.true_power_w(0) == power_w
    assert sim.step_slowdown(0) == 1.0


def test_micro_batch_scale_is_persisted_validated_and_reset_by_idle(
    make: Factory, clock: VirtualClock
) -> None:
    first = make()
    first.set_workload(1, "training", micro_batch_scale=0.5, duty=0.8)
    clock.advance(1.0)
    power_w = first.true_power_w(1)
    slowdown = first.step_slowdown(1)
    del first
    clock.advance(1.0)
    second = make()
    assert second.micro_batch_scale(1) == 0.5
    assert second.duty(1) == 0.8
    assert second.true_power_w(1) == pytest.approx(power_w)
    assert second.step_slowdown(1) == pytest.approx(slowdown)
    for bad in (0.0, -1.0, math.inf, math.nan, "half"):
        with pytest.raises(ValueError, match="micro_batch_scale"):
            second.set_workload(1, "training", micro_batch_scale=bad)  # type: ignore[arg-type]
    assert second.micro_batch_scale(1) == 0.5  # a refused change changes nothing
    second.set_workload(1, None, micro_batch_scale=0.5)
    assert second.micro_batch_scale(1) == 1.0
    assert second.step_slowdown(1) == 1.0  # idle
    assert second.micro_batch_scale(0) == 1.0 and second.step_slowdown(0) == 1.0


def test_a_state_file_from_before_micro_batches_loads_at_scale_one(
    make: Factory, clock: VirtualClock, state_path: Path
) -> None:
    first = make()
    first.set_workload(0, "training", micro_batch_scale=2.0)
    del first
    doc = json.loads(state_path.read_text())
    for gpu in doc["gpus"]:
        del gpu["micro_batch_scale"]
        if gpu["workload"] is not None:
            gpu["workload"] = {
                k: v for k, v in gpu["workload"].items() if not k.startswith("micro_batch_")
            }
    state_path.write_text(json.dumps(doc))
    clock.advance(1.0)
    second = make()
    assert second.micro_batch_scale(0) == 1.0
    wl = second.workload(0)
    assert wl is not None and wl.micro_batch_overhead == 0.0
