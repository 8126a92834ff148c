"""NvmlBackend at its one boundary: what it asks pynvml, and what it makes of the answers."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from unittest import mock

import pynvml
import pytest

from telemetry.backends.base import (
    BackendUnavailableError,
    GpuError,
    GpuLostError,
    GpuPermissionError,
    GpuProcess,
    GpuTimeoutError,
    InvalidSettingError,
    NotSupportedError,
    ThrottleReason,
)
from telemetry.backends.nvml import COUNTER_SHARE, NvmlBackend, nvml_available
from telemetry.clock import VirtualClock, to_datetime
from tests.fake_pynvml import (
    DEFAULT_LIMIT_MW,
    MAX_LIMIT_MW,
    MIN_LIMIT_MW,
    SM_CLOCKS_MHZ,
    FakeHandle,
    FakePynvml,
)

LOGGER = "telemetry.backends.nvml"
INSTANT = pynvml.NVML_FI_DEV_POWER_INSTANT


def _open(fake: FakePynvml) -> NvmlBackend:
    return NvmlBackend(nvml=fake, clock=VirtualClock())


# -- error mapping ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (pynvml.NVML_ERROR_NOT_SUPPORTED, NotSupportedError),
        (pynvml.NVML_ERROR_NO_PERMISSION, GpuPermissionError),
        (pynvml.NVML_ERROR_GPU_IS_LOST, GpuLostError),
        (pynvml.NVML_ERROR_TIMEOUT, GpuTimeoutError),
        (pynvml.NVML_ERROR_INVALID_ARGUMENT, InvalidSettingError),
        (pynvml.NVML_ERROR_UNKNOWN, GpuError),
    ],
)
@pytest.mark.parametrize(
    ("call", "act"),
    [
        ("nvmlDeviceSetPowerManagementLimit", lambda b: b.set_power_limit(0, 400_000)),
        ("nvmlDeviceSetPowerManagementLimit", lambda b: b.reset_power_limit(0)),
        ("nvmlDeviceSetGpuLockedClocks", lambda b: b.lock_sm_clocks(0, 1005, 1410)),
        ("nvmlDeviceResetGpuLockedClocks", lambda b: b.reset_sm_clocks(0)),
    ],
)
def test_setter_errors_map_to_typed_errors_from_the_nvml_error(
    code: int, expected: type[GpuError], call: str, act: Callable[[NvmlBackend], None]
) -> None:
    fake = FakePynvml()
    backend = _open(fake)
    fake.fail(call, code, gpu=0)
    with pytest.raises(expected) as info:
        act(backend)
    assert type(info.value) is expected  # not merely a subclass of GpuError
    cause = info.value.__cause__
    assert isinstance(cause, pynvml.NVMLError) and cause.value == code
    assert "GPU 0" in str(info.value)


def test_no_permission_names_the_privilege_needed() -> None:
    backend = _open(FakePynvml(no_permission=True))
    with pytest.raises(GpuPermissionError, match="root or CAP_SYS_ADMIN"):
        backend.set_power_limit(0, 300_000)
    with pytest.raises(PermissionError):  # the built-in it subclasses
        backend.lock_sm_clocks(0, 1005, 1410)
    assert backend.read(0).power_limit_mw == DEFAULT_LIMIT_MW


@pytest.mark.parametrize(
    "code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
             pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH],
)
def test_no_driver_is_backend_unavailable_with_a_hint(code: int) -> None:
    with pytest.raises(BackendUnavailableError, match="HINT") as info:
        NvmlBackend(nvml=FakePynvml(init_error=code))
    assert isinstance(info.value.__cause__, pynvml.NVMLError)
    assert info.value.__cause__.value == code


# -- capabilities -------------------------------------------------------------------------------

def test_capabilities_are_probed_once_and_handles_taken_once() -> None:
    fake = FakePynvml(gpus=3)
    clock = VirtualClock()
    backend = NvmlBackend(nvml=fake, clock=clock, counter_period_s=0)
    after_open = fake.calls.copy()
    for _ in range(10):
        for i in range(3):
            backend.read(i)
        backend.devices()
        clock.advance(1.0)  # the held fields (processes, memory used) are due again
    for call in ("nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID", "nvmlDeviceGetName",
                 "nvmlDeviceGetPowerManagementLimitConstraints",
                 "nvmlDeviceGetPowerManagementDefaultLimit",
                 "nvmlDeviceGetSupportedMemoryClocks", "nvmlDeviceGetSupportedGraphicsClocks"):
        assert fake.calls[call] == 3, call
    # Each read makes exactly one call per getter; the probe made one more each.
    per_read = fake.calls - after_open
    assert per_read["nvmlDeviceGetPowerUsage"] == 30
    assert per_read["nvmlDeviceGetFieldValues"] == 30
    assert per_read["nvmlDeviceGetClockInfo"] == 60  # SM and memory
    assert per_read["nvmlDeviceGetTemperatureV"] == 30
    assert per_read["nvmlDeviceGetTemperature"] == 0  # the modern call worked
    assert per_read["nvmlDeviceGetCurrentClocksThrottleReasons"] == 0
    assert sum(per_read.values()) == 30 * 11  # eleven getters per read, nothing else


def test_devices_report_the_probed_ranges() -> None:
    backend = _open(FakePynvml())
    info = backend.devices()[1]
    assert info.index == 1 and info.name == "NVIDIA H100 80GB HBM3"
    assert (info.min_limit_mw, info.max_limit_mw) == (MIN_LIMIT_MW, MAX_LIMIT_MW)
    assert info.default_limit_mw == DEFAULT_LIMIT_MW
    assert (info.min_sm_clock_mhz, info.max_sm_clock_mhz) == (SM_CLOCKS_MHZ[-1], SM_CLOCKS_MHZ[0])
    assert info.has_energy_counter
    assert backend.supported_sm_clocks(1) == SM_CLOCKS_MHZ
    assert "gpu_util_pct" in backend.supported_fields(1)


def test_unsupported_read_is_none_and_logged_once_per_gpu(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake = FakePynvml(unsupported={"nvmlDeviceGetTotalEnergyConsumption"})
    backend = _open(fake)
    for _ in range(5):
        assert backend.read(0).energy_mj is None
        assert backend.read(1).energy_mj is None
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == 2  # the probe, once per GPU
    logged = [r for r in caplog.records if "energy_mj" in r.getMessage()]
    assert [r.getMessage()[:6] for r in logged] == ["GPU 0:", "GPU 1:"]
    assert not backend.devices()[0].has_energy_counter
    assert "energy_mj" not in backend.supported_fields(0)
    assert backend.read(0).power_avg_mw is not None


def test_field_that_stops_being_supported_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake = FakePynvml()
    backend = _open(fake)
    fake.fail("nvmlDeviceGetUtilizationRates", pynvml.NVML_ERROR_NOT_SUPPORTED, gpu=0)
    before = fake.calls["nvmlDeviceGetUtilizationRates"]
    for _ in range(3):
        r = backend.read(0)
        assert r.gpu_util_pct is None and r.mem_util_pct is None
    assert fake.calls["nvmlDeviceGetUtilizationRates"] == before + 1
    assert sum("utilization" in r.getMessage() for r in caplog.records) == 1
    assert backend.read(1).gpu_util_pct == 97


def test_transient_read_failure_degrades_that_field_only(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakePynvml()
    backend = _open(fake)
    fake.fail("nvmlDeviceGetPowerUsage", pynvml.NVML_ERROR_TIMEOUT, gpu=0)
    for _ in range(3):
        r = backend.read(0)
        assert r.power_avg_mw is None
        assert r.power_mw is not None and r.energy_mj is not None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Timeout" in warnings[0].getMessage()
    fake.heal("nvmlDeviceGetPowerUsage", gpu=0)
    assert backend.read(0).power_avg_mw == fake.gpus[0].power_mw  # kept: it was transient


# -- the energy counter between reads -----------------------------------------------------------

def _counter_reads(fake: FakePynvml) -> int:
    return fake.calls["nvmlDeviceGetTotalEnergyConsumption"]


def test_counter_is_read_every_period_and_extrapolated_with_instant_power_between() -> None:
    fake = FakePynvml(energy_step_mj=0)  # the counter stands still: only extrapolation moves
    clock = VirtualClock()
    backend = NvmlBackend(nvml=fake, clock=clock, counter_period_s=1.0)
    before = _counter_reads(fake)
    instant_mw = fake.gpus[0].power_mw + 3_000
    first = backend.read(0).energy_mj
    assert first is not None
    values = []
    for _ in range(7):
        clock.advance(0.125)
        values.append(backend.read(0).energy_mj)
    assert _counter_reads(fake) == before + 1  # 0.875 s: no second counter read yet
    # Between reads: the counter plus the trapezoid integral of instant power (mW·s = mJ).
    assert values == [first + round(instant_mw * 0.125 * k) for k in range(1, 8)]
    clock.advance(0.125)
    # Read again at 1 s: the counter is behind, so the reported value holds (never goes down).
    assert backend.read(0).energy_mj == values[-1]
    assert _counter_reads(fake) == before + 2
    assert backend.counter_period(0) == 1.0


def test_counter_reading_resyncs_the_extrapolation() -> None:
    fake = FakePynvml(energy_step_mj=2_000_000)  # the counter runs ahead of the power integral
    clock = VirtualClock()
    backend = NvmlBackend(nvml=fake, clock=clock, counter_period_s=1.0)
    backend.read(0)
    clock.advance(1.0)
    assert backend.read(0).energy_mj == fake.gpus[0].energy_mj  # a counter read: its value
    clock.advance(0.5)
    assert backend.read(0).energy_mj == fake.gpus[0].energy_mj + round(
        (fake.gpus[0].power_mw + 3_000) * 0.5)


def test_counter_that_goes_back_is_reported_as_it_is() -> None:
    fake = FakePynvml()
    clock = VirtualClock()
    backend = NvmlBackend(nvml=fake, clock=clock, counter_period_s=1.0)
    high = backend.read(0).energy_mj
    fake.gpus[0].energy_mj = 1_000  # the driver reloaded: the counter restarts
    clock.advance(1.0)
    reading = backend.read(0).energy_mj
    assert high is not None and reading == 1_000 + fake.energy_step_mj


def test_counter_is_read_on_every_read_without_power_to_extrapolate_with() -> None:
    fake = FakePynvml(unsupported={"nvmlDeviceGetPowerUsage"}, unsupported_fields={INSTANT})
    backend = NvmlBackend(nvml=fake, clock=VirtualClock(), counter_period_s=10.0)
    before = _counter_reads(fake)
    energies = [e for e in (backend.read(0).energy_mj for _ in range(4)) if e is not None]
    assert _counter_reads(fake) == before + 4
    assert len(energies) == 4 and energies == sorted(set(energies))


def test_costly_counter_is_read_less_often() -> None:
    fake = FakePynvml()
    real = fake.nvmlDeviceGetTotalEnergyConsumption

    def slow(handle: FakeHandle) -> int:
        time.sleep(0.002)  # 2 ms a call, like the H100 in docs/gpu-validation.md
        return real(handle)

    fake.nvmlDeviceGetTotalEnergyConsumption = slow  # type: ignore[method-assign]
    clock = VirtualClock()
    backend = NvmlBackend(nvml=fake, clock=clock)
    before = _counter_reads(fake)
    for _ in range(30):  # 3 s at 10 Hz
        assert backend.read(0).energy_mj is not None
        clock.advance(0.1)
    period = backend.counter_period(0)
    # At most COUNTER_SHARE of the time in the call: 2 ms or more → every 2 s or less often.
    assert period is not None and period >= 0.002 / COUNTER_SHARE
    assert _counter_reads(fake) - before <= 2


def test_processes_and_memory_used_are_read_once_a_second_and_repeated_between() -> None:
    fake = FakePynvml()
    clock = VirtualClock()
    backend = NvmlBackend(nvml=fake, clock=clock)
    before = fake.calls.copy()
    fake.gpus[0].processes = [(4242, 1 << 30)]
    first = backend.read(0)
    fake.gpus[0].processes = [(4242, 1 << 30), (4343, None)]
    for _ in range(7):
        clock.advance(0.125)
        assert backend.read(0).processes == first.processes  # held: read under 1 s ago
    clock.advance(0.125)
    assert [p.pid for p in backend.read(0).processes] == [4242, 4343]
    calls = fake.calls - before
    assert calls["nvmlDeviceGetComputeRunningProcesses"] == 2
    assert calls["nvmlDeviceGetMemoryInfo"] == 2
    assert calls["nvmlDeviceGetPowerUsage"] == 9


def test_old_pynvml_falls_back_to_throttle_reasons_and_legacy_temperature() -> None:
    fake = FakePynvml(missing={"nvmlDeviceGetCurrentClocksEventReasons",
                               "nvmlDeviceGetTemperatureV"})
    backend = _open(fake)
    backend.set_power_limit(0, 300_000)
    r = backend.read(0)
    assert r.throttle_reasons == ThrottleReason.SW_POWER_CAP
    assert r.temperature_c == 41
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 3  # 2 probes + 1 read


def test_driver_without_the_event_call_falls_back_too() -> None:
    fake = FakePynvml()
    fake.fail("nvmlDeviceGetCurrentClocksEventReasons", pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    backend = _open(fake)
    assert backend.read(0).throttle_reasons == 0
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 3


def test_unknown_throttle_bits_are_dropped() -> None:
    fake = FakePynvml()
    future_bit = 0x8000  # a reason bit newer than any ThrottleReason member
    with mock.patch.object(fake, "nvmlDeviceGetCurrentClocksEventReasons", autospec=True,
                           return_value=future_bit | ThrottleReason.SW_POWER_CAP):
        backend = _open(fake)  # getters are bound at open, so open under the patch
        assert backend.read(0).throttle_reasons == ThrottleReason.SW_POWER_CAP


def test_enforced_limit_falls_back_to_management_limit() -> None:
    fake = FakePynvml(unsupported={"nvmlDeviceGetEnforcedPowerLimit"})
    backend = _open(fake)
    backend.set_power_limit(0, 450_000)
    assert backend.read(0).power_limit_mw == 450_000
    assert fake.calls["nvmlDeviceGetPowerManagementLimit"] == 3


def test_clock_range_falls_back_to_max_clock() -> None:
    fake = FakePynvml(unsupported={"nvmlDeviceGetSupportedMemoryClocks"})
    backend = _open(fake)
    info = backend.devices()[0]
    assert (info.min_sm_clock_mhz, info.max_sm_clock_mhz) == (None, SM_CLOCKS_MHZ[0])
    assert backend.supported_sm_clocks(0) == ()
    with pytest.raises(InvalidSettingError, match=r"allowed range \?\.\.1980 MHz"):
        backend.lock_sm_clocks(0, 900, 2500)
    backend.lock_sm_clocks(0, 900, 1980)  # the known bound is enough to accept this


# -- the instant power field, processes ---------------------------------------------------------

def test_instant_power_comes_from_the_field_values_call() -> None:
    fake = FakePynvml()
    with mock.patch.object(fake, "nvmlDeviceGetFieldValues", autospec=True,
                           side_effect=fake.nvmlDeviceGetFieldValues) as get_fields:
        backend = _open(fake)
        r = backend.read(1)
    assert get_fields.call_args_list[-1] == mock.call(FakeHandle(1), [INSTANT])
    assert r.power_mw == fake.gpus[1].power_mw + 3_000
    assert r.power_avg_mw == fake.gpus[1].power_mw


def test_unsupported_instant_field_is_none_not_the_average() -> None:
    fake = FakePynvml(unsupported_fields={INSTANT})
    backend = _open(fake)
    r = backend.read(0)
    assert r.power_mw is None and r.power_avg_mw == fake.gpus[0].power_mw
    assert fake.calls["nvmlDeviceGetFieldValues"] == 2  # probed on each GPU, never read again


def test_processes_are_read_with_their_memory() -> None:
    fake = FakePynvml(processes={0: [(4242, 8 << 30), (4343, None)]})
    backend = _open(fake)
    assert backend.read(0).processes == (GpuProcess(4242, 8 << 30), GpuProcess(4343, None))
    assert backend.read(1).processes == ()


def test_reading_is_stamped_by_the_injected_clock() -> None:
    clock = VirtualClock()
    backend = NvmlBackend(nvml=FakePynvml(), clock=clock)
    clock.advance(2.5)
    assert backend.read(0).sampled_at == to_datetime(clock.now())


# -- a lost GPU ---------------------------------------------------------------------------------

def test_lost_gpu_raises_from_read_and_the_others_still_read() -> None:
    fake = FakePynvml()
    backend = _open(fake)
    fake.lose(1)
    with pytest.raises(GpuLostError) as info:
        backend.read(1)
    assert isinstance(info.value.__cause__, pynvml.NVMLError_GpuIsLost)
    assert backend.read(0).power_mw is not None
    fake.recover(1)
    assert backend.read(1).power_mw is not None


def test_gpu_lost_at_open_is_listed_and_probed_again_when_back() -> None:
    fake = FakePynvml()
    fake.lose(1)
    backend = _open(fake)
    assert [d.index for d in backend.devices()] == [0, 1]
    with pytest.raises(GpuLostError):
        backend.read(1)
    with pytest.raises(GpuLostError):
        backend.set_power_limit(1, 400_000)
    fake.recover(1)
    assert backend.read(1).energy_mj is not None
    assert backend.devices()[1].uuid.endswith("000000000001")
    assert backend.devices()[1].max_limit_mw == MAX_LIMIT_MW


# -- setters ------------------------------------------------------------------------------------

@pytest.mark.parametrize("limit_mw", [MAX_LIMIT_MW + 1, MIN_LIMIT_MW - 1, 0, -5])
def test_power_limit_outside_range_is_refused_before_nvml(limit_mw: int) -> None:
    fake = FakePynvml()
    backend = _open(fake)
    with pytest.raises(InvalidSettingError, match=r"allowed range 200000\.\.700000 mW"):
        backend.set_power_limit(0, limit_mw)
    assert fake.calls["nvmlDeviceSetPowerManagementLimit"] == 0


@pytest.mark.parametrize(("lo", "hi"), [(100, 1500), (1005, 2100), (1500, 1005)])
def test_clock_lock_outside_range_is_refused_before_nvml(lo: int, hi: int) -> None:
    fake = FakePynvml()
    backend = _open(fake)
    with pytest.raises(InvalidSettingError, match=r"allowed range 210\.\.1980 MHz"):
        backend.lock_sm_clocks(0, lo, hi)
    assert fake.calls["nvmlDeviceSetGpuLockedClocks"] == 0


def test_setters_call_nvml_with_exact_arguments() -> None:
    fake = FakePynvml()
    backend = _open(fake)
    with (
        mock.patch.object(fake, "nvmlDeviceSetPowerManagementLimit", autospec=True) as set_pl,
        mock.patch.object(fake, "nvmlDeviceSetGpuLockedClocks", autospec=True) as lock,
        mock.patch.object(fake, "nvmlDeviceResetGpuLockedClocks", autospec=True) as unlock,
    ):
        backend.set_power_limit(1, 350_000)
        backend.reset_power_limit(1)
        backend.lock_sm_clocks(1, 1005, 1410)
        backend.reset_sm_clocks(1)
    assert set_pl.call_args_list == [mock.call(FakeHandle(1), 350_000),
                                     mock.call(FakeHandle(1), DEFAULT_LIMIT_MW)]
    lock.assert_called_once_with(FakeHandle(1), 1005, 1410)
    unlock.assert_called_once_with(FakeHandle(1))


def test_power_limit_and_clock_lock_show_in_readings() -> None:
    fake = FakePynvml()
    backend = _open(fake)
    backend.set_power_limit(0, 300_000)
    r = backend.read(0)
    assert r.power_limit_mw == 300_000 and r.power_avg_mw == 300_000
    assert r.throttle_reasons == ThrottleReason.SW_POWER_CAP
    backend.reset_power_limit(0)
    backend.lock_sm_clocks(0, 1005, 1410)
    assert backend.read(0).sm_clock_mhz == 1410
    backend.reset_sm_clocks(0)
    assert backend.read(0).sm_clock_mhz == SM_CLOCKS_MHZ[0]


# -- lifecycle and detection --------------------------------------------------------------------

def test_close_shuts_nvml_down_once() -> None:
    fake = FakePynvml()
    backend = _open(fake)
    backend.close()
    backend.close()
    assert fake.calls["nvmlShutdown"] == 1 and not fake.initialized
    with pytest.raises(BackendUnavailableError, match="closed"):
        backend.read(0)


def test_nvml_available_with_a_driver() -> None:
    fake = FakePynvml(gpus=8)
    ok, reason = nvml_available(fake)
    assert ok and reason == "NVIDIA driver 570.124.06, 8 GPU(s)"
    assert fake.calls["nvmlShutdown"] == 1 and not fake.initialized


def test_nvml_available_without_the_library() -> None:
    fake = FakePynvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert nvml_available(fake) == (False, "NVML Shared Library Not Found")


def test_nvml_available_with_no_gpus() -> None:
    ok, reason = nvml_available(FakePynvml(gpus=0))
    assert not ok and "sees no GPUs" in reason


def test_without_nvidia_ml_py_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    ok, reason = nvml_available()
    assert not ok and "nvidia-ml-py" in reason
    with pytest.raises(BackendUnavailableError, match="pip install nvidia-ml-py"):
        NvmlBackend()
