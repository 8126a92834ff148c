"""One suite, every backend: what the sampler and actuators rely on, proved alike for each.

Every test lets its effect show in a reading: time passes on the backend's (virtual) clock, a
setting is read back in force and undone, a fault is injected and seen to degrade. Each test first
checks that the GPU is in a state where the effect can show at all (a power limit below what the
GPU draws, a clock lock below the clock it runs at), so a backend that ignores the call fails.
"""

from __future__ import annotations

import functools
import itertools
import operator
from datetime import timedelta
from typing import Final

import pytest

from telemetry.backends.base import (
    BackendCapabilities,
    GpuBackend,
    GpuInfo,
    GpuLostError,
    GpuNotFoundError,
    GpuReading,
    InvalidSettingError,
    NotSupportedError,
    ThrottleReason,
)
from telemetry.clock import to_datetime
from tests.backends.nodes import FIELD_FAULTS, FIELDS, KINDS, NO_FAULTS, Node

_KNOWN_REASONS: Final = int(functools.reduce(operator.or_, ThrottleReason))
_CLOCKS_SET: Final = int(ThrottleReason.APPLICATIONS_CLOCKS_SETTING)
_POWER_CAP: Final = int(ThrottleReason.SW_POWER_CAP)
#: How long the energy counter is watched, s.
_ENERGY_S: Final = 10.0
#: How closely the counter must follow power × time: loose (sensor noise, the counter's 100 ms
#: updates), yet a counter that stands still or ticks per call is far outside it.
_ENERGY_REL: Final = 0.1


def _read(node: Node, index: int) -> GpuReading:
    """Read one GPU and check what holds of every reading, in whatever state the test made."""
    r = node.backend.read(index)
    assert r.index == index
    # Stamped by the backend's clock, timezone-aware UTC.
    assert r.sampled_at == to_datetime(node.clock.now())
    assert r.sampled_at.utcoffset() == timedelta(0)
    if r.throttle_reasons is not None:
        assert r.throttle_reasons & ~_KNOWN_REASONS == 0, f"unknown bits {r.throttle_reasons:#x}"
    for pct in (r.gpu_util_pct, r.mem_util_pct):
        assert pct is None or 0 <= pct <= 100
    if r.energy_mj is not None:
        last = node.energy_seen.get(index)
        assert last is None or r.energy_mj >= last, f"energy went back: {last} -> {r.energy_mj}"
        node.energy_seen[index] = r.energy_mj
    return r


def _value(r: GpuReading, name: str) -> int:
    """A field that must have a value here."""
    value = getattr(r, name)
    assert isinstance(value, int), f"GPU {r.index}: {name} = {value!r}"
    return value


def _limits(info: GpuInfo) -> tuple[int, int, int]:
    """Power limit range and default (mW); a GPU under contract has all three."""
    lo, hi = info.min_limit_mw, info.max_limit_mw
    assert lo is not None and hi is not None
    return lo, hi, info.default_limit_mw or hi


def _binding_limit(info: GpuInfo) -> int:
    """A power limit a quarter up the range: below what every busy GPU under test draws."""
    lo, hi, _ = _limits(info)
    return lo + (hi - lo) // 4


def _clock_range(info: GpuInfo) -> tuple[int, int]:
    """The supported SM clock range (MHz)."""
    lo, hi = info.min_sm_clock_mhz, info.max_sm_clock_mhz
    assert lo is not None and hi is not None
    return lo, hi


def _binding_lock(info: GpuInfo) -> tuple[int, int]:
    """A clock lock over the lower half of the range: below the clock a busy GPU runs at."""
    lo, hi = _clock_range(info)
    return lo, lo + (hi - lo) // 2


# -- shape ---------------------------------------------------------------------------------------

def test_is_a_backend(node: Node) -> None:
    assert isinstance(node.backend, GpuBackend)
    assert node.backend.name in {"nvml", "simulated", "replay"}


def test_fault_rules_cover_every_backend_or_say_why_not(node: Node) -> None:
    assert set(FIELD_FAULTS) | set(NO_FAULTS) == set(KINDS)
    assert not set(FIELD_FAULTS) & set(NO_FAULTS)
    assert all(reason.strip() for reason in NO_FAULTS.values())
    # A backend gets its fault hooks exactly when the fault rules are run on it.
    assert (node.faults is None) == (node.kind in NO_FAULTS)


def test_devices_are_indexed_and_unique(node: Node) -> None:
    devices = node.backend.devices()
    assert len(devices) == 2
    assert [d.index for d in devices] == list(range(len(devices)))
    assert len({d.uuid for d in devices}) == len(devices)
    for d in devices:
        assert d.name
        lo, hi, default = _limits(d)
        assert 0 < lo <= default <= hi
        clock_lo, clock_hi = _clock_range(d)
        assert 0 < clock_lo < clock_hi


def test_read_gives_a_full_reading(node: Node) -> None:
    for index in range(2):
        r = _read(node, index)
        for name in FIELDS:
            assert _value(r, name) >= 0, f"{name} = {getattr(r, name)!r}"
        assert 10_000 < _value(r, "power_mw") < 1_500_000  # 10 W .. 1.5 kW
        assert _value(r, "power_limit_mw") == _limits(node.backend.devices()[index])[2]
    # Readings follow the backend's clock (``_read`` checks each stamp against it).
    stamp = _read(node, 0).sampled_at
    node.advance(1.0)
    assert _read(node, 0).sampled_at - stamp == timedelta(seconds=1)


def test_unknown_gpu_raises_lookup_error(node: Node) -> None:
    info = node.backend.devices()[0]
    _, _, default = _limits(info)
    lo, hi = _clock_range(info)
    missing = len(node.backend.devices()) + 5
    with pytest.raises(GpuNotFoundError):
        node.backend.read(missing)
    with pytest.raises(LookupError):
        node.backend.read(-1)
    with pytest.raises(GpuNotFoundError):
        node.backend.set_power_limit(missing, default)
    with pytest.raises(GpuNotFoundError):
        node.backend.lock_sm_clocks(missing, lo, hi)


# -- capabilities --------------------------------------------------------------------------------

def _check_capabilities(backend: GpuBackend) -> BackendCapabilities:
    """What holds of any backend's capabilities: they agree with ``devices`` and with themselves."""
    caps = backend.capabilities()
    assert caps == backend.capabilities(), "probed once: the same answer every time"
    assert caps.settings_need_privilege == (not caps.simulated)
    devices = backend.devices()
    assert [g.index for g in caps.gpus] == [d.index for d in devices]
    for info, gpu in zip(devices, caps.gpus, strict=True):
        assert caps.gpu(info.index) is gpu
        assert gpu.energy_counter == info.has_energy_counter
        if info.min_limit_mw is not None and info.max_limit_mw is not None:
            assert gpu.power_limit_range_mw == (info.min_limit_mw, info.max_limit_mw)
        else:
            assert gpu.power_limit_range_mw is None and not gpu.can_set_power_limit
        assert gpu.default_power_limit_mw == info.default_limit_mw
        assert gpu.sm_clock_range_mhz == (info.min_sm_clock_mhz, info.max_sm_clock_mhz)
        if gpu.can_lock_clocks:
            assert info.max_sm_clock_mhz is not None, "a lock is checked against a known clock"
        clocks = gpu.supported_sm_clocks_mhz
        assert list(clocks) == sorted(set(clocks), reverse=True), "highest first, each once"
        if len(clocks) > 1:
            assert clocks[0] == info.max_sm_clock_mhz and clocks[-1] == info.min_sm_clock_mhz
            gaps = [a - b for a, b in itertools.pairwise(clocks)]
            assert gpu.sm_clock_step_mhz is not None
            assert min(gaps) <= gpu.sm_clock_step_mhz <= max(gaps)
        if gpu.idle_power_mw is not None:
            assert 0 < gpu.idle_power_mw < (info.min_limit_mw or info.max_limit_mw or 0)
    with pytest.raises(GpuNotFoundError):
        caps.gpu(len(devices))
    return caps


def test_capabilities_agree_with_devices_readings_and_settings(node: Node) -> None:
    """What the capabilities say a GPU can do, it does; and doing it changes no capability."""
    caps = _check_capabilities(node.backend)
    assert caps.simulated == (node.kind != "nvml-fake")
    for gpu in caps.gpus:
        info = node.backend.devices()[gpu.index]
        r = _read(node, gpu.index)
        assert (r.energy_mj is not None) == gpu.energy_counter
        assert gpu.can_set_power_limit and gpu.can_lock_clocks, "every GPU under test can both"
        target = _binding_limit(info)
        node.backend.set_power_limit(gpu.index, target)
        lo, hi = _binding_lock(info)
        node.backend.lock_sm_clocks(gpu.index, lo, hi)
    node.advance()
    for gpu in caps.gpus:
        r = _read(node, gpu.index)
        assert r.power_limit_mw == _binding_limit(node.backend.devices()[gpu.index])
        assert _value(r, "throttle_reasons") & (_CLOCKS_SET | _POWER_CAP)
        node.backend.reset_power_limit(gpu.index)
        node.backend.reset_sm_clocks(gpu.index)
    node.advance()
    assert node.backend.capabilities() == caps


def test_capabilities_probed_at_open_say_what_a_gpu_lacks(faulty_node: Node) -> None:
    """A GPU that cannot report a counter, a limit range or a clock when the backend opens has
    none of those capabilities, and the backend acts on that: no energy, and its setters refuse
    with ``NotSupportedError`` before touching the GPU. The GPU beside it keeps everything."""
    node = faulty_node
    assert node.faults is not None
    info = node.backend.devices()[0]
    lo, hi = _binding_lock(info)
    backend = node.faults.reopen_lacking(1)
    try:
        caps = _check_capabilities(backend)
        lacking, whole = caps.gpu(1), caps.gpu(0)
        assert not (lacking.energy_counter or lacking.can_set_power_limit
                    or lacking.can_lock_clocks)
        assert whole.energy_counter and whole.can_set_power_limit and whole.can_lock_clocks
        assert backend.read(1).energy_mj is None
        with pytest.raises(NotSupportedError):
            backend.set_power_limit(1, _binding_limit(info))
        with pytest.raises(NotSupportedError):
            backend.lock_sm_clocks(1, lo, hi)
        node.advance()
        r = backend.read(1)
        assert r.power_limit_mw in (None, _limits(info)[2]), "nothing was set"
        assert not (r.throttle_reasons or 0) & _CLOCKS_SET
    finally:
        backend.close()


# -- energy --------------------------------------------------------------------------------------

def test_energy_counter_rises_by_power_times_time(node: Node) -> None:
    """The counter integrates the power drawn: about power × time, at full power and capped."""
    rises = []
    for limit_mw in (None, _binding_limit(node.backend.devices()[0])):
        if limit_mw is not None:
            node.backend.set_power_limit(0, limit_mw)
            node.advance()
        start = _read(node, 0)
        node.advance(_ENERGY_S)
        end = _read(node, 0)
        mean_mw = (_value(start, "power_avg_mw") + _value(end, "power_avg_mw")) / 2
        rise = _value(end, "energy_mj") - _value(start, "energy_mj")
        assert rise == pytest.approx(mean_mw * _ENERGY_S, rel=_ENERGY_REL)  # mW·s = mJ
        rises.append(rise)
    assert rises[1] < (1 - 2 * _ENERGY_REL) * rises[0], "the cap shows in the counter too"


# -- power limits --------------------------------------------------------------------------------

def test_power_limit_caps_power_and_reset_lifts_it(node: Node) -> None:
    info = node.backend.devices()[0]
    _, _, default = _limits(info)
    target = _binding_limit(info)
    ceiling = target * (1 + node.power_tolerance)
    free = _read(node, 0)
    assert _value(free, "power_avg_mw") > ceiling, "precondition: the GPU draws above the limit"
    assert not _value(free, "throttle_reasons") & _POWER_CAP

    node.backend.set_power_limit(0, target)
    node.advance()
    capped = _read(node, 0)
    assert capped.power_limit_mw == target
    assert _value(capped, "power_mw") <= ceiling
    assert _value(capped, "power_avg_mw") <= ceiling
    assert _value(capped, "throttle_reasons") & _POWER_CAP
    other = _read(node, 1)
    assert other.power_limit_mw == default and _value(other, "power_avg_mw") > ceiling

    node.backend.reset_power_limit(0)
    node.advance()
    back = _read(node, 0)
    assert back.power_limit_mw == default
    assert _value(back, "power_avg_mw") > ceiling
    assert not _value(back, "throttle_reasons") & _POWER_CAP


def test_invalid_power_limit_is_refused_and_changes_nothing(node: Node) -> None:
    info = node.backend.devices()[0]
    lo, hi, _ = _limits(info)
    target = _binding_limit(info)
    node.backend.set_power_limit(0, target)
    node.advance()
    before = _read(node, 0)
    for bad in (hi + 1_000, lo - 1_000, 0, -target):
        with pytest.raises(InvalidSettingError, match="range") as err:
            node.backend.set_power_limit(0, bad)
        assert str(lo) in str(err.value) and str(hi) in str(err.value), "names the range"
    node.advance()
    after = _read(node, 0)
    assert after.power_limit_mw == target
    assert _value(after, "power_avg_mw") <= target * (1 + node.power_tolerance)
    assert after.throttle_reasons == before.throttle_reasons


# -- clock locks ---------------------------------------------------------------------------------

def test_clock_lock_holds_the_clock_in_range_and_reset_frees_it(node: Node) -> None:
    lo, hi = _binding_lock(node.backend.devices()[0])
    free = _read(node, 0)
    assert _value(free, "sm_clock_mhz") > hi, "precondition: the GPU runs above the lock"
    assert not _value(free, "throttle_reasons") & _CLOCKS_SET

    node.backend.lock_sm_clocks(0, lo, hi)
    node.advance()
    locked = _read(node, 0)
    assert lo <= _value(locked, "sm_clock_mhz") <= hi
    if node.lock_reads_top:
        assert locked.sm_clock_mhz == hi
    assert _value(locked, "throttle_reasons") & _CLOCKS_SET
    other = _read(node, 1)
    assert _value(other, "sm_clock_mhz") > hi
    assert not _value(other, "throttle_reasons") & _CLOCKS_SET

    node.backend.reset_sm_clocks(0)
    node.advance()
    back = _read(node, 0)
    assert _value(back, "sm_clock_mhz") > hi
    assert not _value(back, "throttle_reasons") & _CLOCKS_SET


def test_invalid_clock_lock_is_refused_and_changes_nothing(node: Node) -> None:
    info = node.backend.devices()[0]
    clock_lo, clock_hi = _clock_range(info)
    lo, hi = _binding_lock(info)
    node.backend.lock_sm_clocks(0, lo, hi)
    node.advance()
    before = _read(node, 0)
    assert _value(before, "throttle_reasons") & _CLOCKS_SET, "precondition: the lock binds"
    for bad in ((hi, lo), (clock_lo // 2, hi), (lo, clock_hi + 100)):
        with pytest.raises(InvalidSettingError, match="range") as err:
            node.backend.lock_sm_clocks(0, *bad)
        assert str(clock_lo) in str(err.value) and str(clock_hi) in str(err.value)
    node.advance()
    after = _read(node, 0)
    assert after.sm_clock_mhz == before.sm_clock_mhz
    assert after.throttle_reasons == before.throttle_reasons


# -- degradation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIELDS)
def test_broken_field_reads_none_and_the_rest_still_read(
    field_fault: tuple[Node, str], name: str
) -> None:
    node, how = field_fault
    assert node.faults is not None
    healthy = _read(node, 0)
    _value(healthy, name)  # precondition: the field reads before the fault
    down = node.faults.break_field(0, name, how)
    assert name in down
    last = healthy
    for _ in range(2):  # the read that meets the fault, and one after it
        node.advance()
        r = _read(node, 0)  # does not raise
        value = getattr(r, name)
        if value is not None and name in node.faults.bridged_fields:
            # A documented estimate (energy from power), which must still track power × time.
            rise = value - _value(last, name)
            elapsed_s = (r.sampled_at - last.sampled_at).total_seconds()
            assert rise == pytest.approx(_value(r, "power_avg_mw") * elapsed_s, rel=_ENERGY_REL)
        else:
            assert value is None, f"{name} = {value!r} with its source {how}"
        for other in FIELDS:
            if other not in down:
                _value(r, other)
        last = r
    _value(_read(node, 1), name)  # the other GPU still has it


def test_lost_gpu_raises_on_read_and_the_others_keep_reading(faulty_node: Node) -> None:
    node = faulty_node
    assert node.faults is not None
    _, _, default = _limits(node.backend.devices()[0])
    _read(node, 0)
    node.faults.lose(0)
    for _ in range(2):
        node.advance()
        with pytest.raises(GpuLostError):
            node.backend.read(0)
        other = _read(node, 1)
        for name in FIELDS:
            _value(other, name)
    with pytest.raises(GpuLostError):
        node.backend.set_power_limit(0, default)
    node.faults.recover(0)
    node.advance()
    back = _read(node, 0)
    for name in FIELDS:
        _value(back, name)
