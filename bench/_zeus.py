"""Zeus's power-limit optimiser on a replayed GPU, for ``bench/optimizer.py``.

Two ways, one interface (``ZeusPolicy``):

* ``RealZeus`` drives the ``zeus`` package's own ``GlobalPowerLimitOptimizer`` and ``ZeusMonitor``
  (tested with zeus 0.16.0). Only their boundaries are faked, faithfully: the NVML calls its
  device layer makes go to the replay backend (limits, energy counter), its monitor's clock is
  the replay's virtual clock, the CUDA synchronise before a window is a no-op (nothing runs
  asynchronously in a replay), and the restore-on-exit hook it registers runs at the end of
  each simulated job instead of at interpreter exit.
* ``ZeusReimplementation`` is our own re-implementation of the published policy (NSDI'23 and
  the zeus documentation), used when the package cannot run here; the benchmark labels it so.

The policy, in both: the job starts at the maximum limit; after ``wait_steps`` steps, each power
limit from the maximum down to the minimum in 25 W steps gets ``warmup_steps`` warm-up steps and
a ``profile_steps`` measurement window (energy counter and wall clock); the end of an epoch
interrupts a window, and that limit starts over after one step at the maximum; after the last
limit, the one with the least cost ``eta * E + (1 - eta) * P_max * T`` is held for the rest of
the job.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from telemetry.backends.replay import ReplayBackend
from telemetry.clock import VirtualClock

Phase = Literal["ready", "warmup", "profiling", "done"]

WAIT_STEPS = 1
WARMUP_STEPS = 10
PROFILE_STEPS = 40
PL_STEP_W = 25


class ZeusPolicy(Protocol):
    """The callbacks a training loop gives Zeus's optimiser, and what the benchmark reads."""

    is_reimplementation: bool

    def on_step_begin(self) -> None: ...

    def on_epoch_end(self) -> None: ...

    @property
    def phase(self) -> Phase: ...

    @property
    def chosen_limit_mw(self) -> int | None: ...

    def close(self) -> None: ...


# -- our re-implementation ----------------------------------------------------------------------


@dataclass(slots=True)
class _Window:
    limit_mw: int
    steps_left: int
    started_s: float = 0.0
    started_mj: int = 0


class ZeusReimplementation:
    """Zeus's ``GlobalPowerLimitOptimizer`` policy with the ``ZeusCost`` selector, re-written.

    Args:
        backend: The replayed GPU(s); limits are set on all of them, energy summed over them.
        clock: The replay's clock (the measurement windows' wall clock).
        eta: Zeus's eta knob.
    """

    is_reimplementation = True

    def __init__(self, backend: ReplayBackend, clock: VirtualClock, eta: float) -> None:
        self._backend = backend
        self._clock = clock
        self._eta = eta
        info = backend.devices()[0]
        assert info.min_limit_mw is not None and info.max_limit_mw is not None
        step_mw = PL_STEP_W * 1000
        self._limits = list(range(info.max_limit_mw, info.min_limit_mw - 1, -step_mw))
        self._gpus = len(backend.devices())
        self._phase: Phase = "ready"
        self._ready_left = WAIT_STEPS + 1
        self._next_limit = self._limits[0]
        self._window: _Window | None = None
        self._measured: list[tuple[int, float, float]] = []  # (limit W, energy J, time s)
        self._chosen: int | None = None
        self._set(self._limits[0])

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def chosen_limit_mw(self) -> int | None:
        return self._chosen

    def _set(self, limit_mw: int) -> None:
        for info in self._backend.devices():
            if self._backend.power_limit_mw(info.index) != limit_mw:
                self._backend.set_power_limit(info.index, limit_mw)

    def _energy_mj(self) -> int:
        return sum(self._backend.energy_mj(i.index) for i in self._backend.devices())

    def on_step_begin(self) -> None:
        if self._phase == "ready":
            self._ready_left -= 1
            if self._ready_left == 0:
                self._set(self._next_limit)
                self._phase = "warmup"
                self._window = _Window(self._next_limit, WARMUP_STEPS)
        elif self._phase == "warmup":
            assert self._window is not None
            self._window.steps_left -= 1
            if self._window.steps_left == 0:
                self._phase = "profiling"
                self._window = _Window(
                    self._window.limit_mw, PROFILE_STEPS, self._clock.now(), self._energy_mj()
                )
        elif self._phase == "profiling":
            w = self._window
            assert w is not None
            w.steps_left -= 1
            if w.steps_left == 0:
                energy_j = (self._energy_mj() - w.started_mj) / 1000.0
                time_s = self._clock.now() - w.started_s
                self._measured.append((w.limit_mw // 1000, energy_j, time_s))
                i = self._limits.index(w.limit_mw)
                if i == len(self._limits) - 1:
                    self._chosen = self._select() * 1000
                    self._phase = "done"
                    self._set(self._chosen)
                else:
                    self._set(self._limits[i + 1])
                    self._phase = "warmup"
                    self._window = _Window(self._limits[i + 1], WARMUP_STEPS)

    def on_epoch_end(self) -> None:
        if self._phase in ("warmup", "profiling"):
            assert self._window is not None
            self._next_limit = self._window.limit_mw
            self._phase = "ready"
            self._ready_left = 1
            self._set(self._limits[0])

    def _select(self) -> int:
        max_power_w = max(pl for pl, _, _ in self._measured) * self._gpus
        costs = {
            pl: self._eta * e + (1.0 - self._eta) * max_power_w * t for pl, e, t in self._measured
        }
        return min(costs, key=lambda pl: costs[pl])

    def close(self) -> None:
        self._set(self._limits[0])


# -- the real package -----------------------------------------------------------------------------


class _ReplayNvml:
    """The NVML functions Zeus's device layer calls, answered by a replay backend.

    Handles are GPU indices. The architecture is reported as Ampere, i.e. a GPU with an energy
    counter, because the replay backend has one (``has_energy_counter``).
    """

    def __init__(self, nvml: Any, backend: ReplayBackend) -> None:
        self._nvml = nvml
        self.backend = backend
        self._persistence: dict[int, int] = {}

    def functions(self) -> dict[str, Callable[..., Any]]:
        n = self._nvml
        b = self.backend

        def not_supported(*_: Any) -> Any:
            raise n.NVMLError(n.NVML_ERROR_NOT_SUPPORTED)

        def limits(h: int) -> list[int]:
            info = b.devices()[h]
            assert info.min_limit_mw is not None and info.max_limit_mw is not None
            return [info.min_limit_mw, info.max_limit_mw]

        def set_persistence(h: int, mode: int) -> None:
            self._persistence[h] = mode

        return {
            "nvmlInit": lambda: None,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetCount": lambda: len(b.devices()),
            "nvmlDeviceGetHandleByIndex": lambda i: int(i),
            "nvmlDeviceGetC2cModeInfoV": not_supported,
            "nvmlDeviceGetName": lambda h: b.devices()[h].name,
            "nvmlDeviceGetPowerManagementLimitConstraints": limits,
            "nvmlDeviceGetPowerManagementLimit": lambda h: b.power_limit_mw(h),
            "nvmlDeviceSetPowerManagementLimit": lambda h, mw: b.set_power_limit(h, int(mw)),
            "nvmlDeviceGetPowerManagementDefaultLimit": lambda h: b.devices()[h].default_limit_mw,
            "nvmlDeviceGetPersistenceMode": lambda h: self._persistence.get(
                h, n.NVML_FEATURE_DISABLED
            ),
            "nvmlDeviceSetPersistenceMode": set_persistence,
            "nvmlDeviceGetArchitecture": lambda h: n.NVML_DEVICE_ARCH_AMPERE,
            "nvmlDeviceGetTotalEnergyConsumption": lambda h: b.energy_mj(h),
        }


class _ExitHooks:
    """Stands in for ``atexit`` inside zeus: keeps the hooks so the job's end can run them."""

    def __init__(self) -> None:
        self.hooks: list[Callable[[], object]] = []

    def register(self, fn: Callable[[], object], *args: Any, **kwargs: Any) -> None:
        self.hooks.append(lambda: fn(*args, **kwargs))


def zeus_version() -> str | None:
    """The installed zeus package's version, or None."""
    try:
        from importlib.metadata import version

        return version("zeus")
    except Exception:
        return None


@contextlib.contextmanager
def _patched(backend: ReplayBackend, clock: VirtualClock) -> Iterator[tuple[Any, _ExitHooks]]:
    """Zeus's boundaries pointed at the replay for the duration of one job."""
    import pynvml  # noqa: TID251 -- faking NVML for zeus is this module's purpose

    zgpu = importlib.import_module("zeus.device.gpu")
    znv = importlib.import_module("zeus.device.gpu.nvidia")
    zmon = importlib.import_module("zeus.monitor.energy")
    zplo = importlib.import_module("zeus.optimizer.power_limit")

    fake = _ReplayNvml(pynvml, backend)
    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    hooks = _ExitHooks()
    try:
        for name, fn in fake.functions().items():
            patch(pynvml, name, fn)
        patch(zmon, "time", clock.now)
        patch(zmon, "sync_execution_fn", lambda *a, **k: None)
        patch(zplo, "atexit", hooks)
        patch(zgpu, "_gpus", None)
        znv.nvml_is_available.cache_clear()
        yield zplo, hooks
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        znv.nvml_is_available.cache_clear()


class RealZeus:
    """The zeus package's ``GlobalPowerLimitOptimizer`` (``ZeusCost`` selector), on a replay.

    Use as a context manager: the NVML fakes are in place between ``__enter__`` and ``close``.
    """

    is_reimplementation = False

    def __init__(self, backend: ReplayBackend, clock: VirtualClock, eta: float) -> None:
        self._backend = backend
        self._clock = clock
        self._eta = eta
        self._stack = contextlib.ExitStack()
        self._opt: Any = None
        self._hooks: _ExitHooks | None = None

    def __enter__(self) -> RealZeus:
        zplo, hooks = self._stack.enter_context(_patched(self._backend, self._clock))
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # zeus warns that this process lacks SYS_ADMIN
        zeus_monitor: Any = importlib.import_module("zeus.monitor").ZeusMonitor

        gpus = list(range(len(self._backend.devices())))
        monitor = zeus_monitor(gpu_indices=gpus, cpu_indices=[])
        self._opt = zplo.GlobalPowerLimitOptimizer(
            monitor,
            optimum_selector=zplo.ZeusCost(eta_knob=self._eta, world_size=len(gpus)),
            wait_steps=WAIT_STEPS,
            warmup_steps=WARMUP_STEPS,
            profile_steps=PROFILE_STEPS,
            pl_step=PL_STEP_W,
        )
        self._hooks = hooks
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def phase(self) -> Phase:
        name = type(self._opt.state).__name__.lower()
        assert name in ("ready", "warmup", "profiling", "done"), name
        return cast(Phase, name)

    @property
    def chosen_limit_mw(self) -> int | None:
        state = self._opt.state
        return int(state.optimal_power_limit) if self.phase == "done" else None

    def on_step_begin(self) -> None:
        self._opt.on_step_begin()

    def on_epoch_end(self) -> None:
        self._opt.on_epoch_end()

    def close(self) -> None:
        if self._hooks is not None:
            for hook in self._hooks.hooks:
                hook()  # zeus's restore-on-exit: the maximum limit again
            self._hooks = None
        self._stack.close()


def real_zeus_problem() -> str | None:
    """None when the zeus package can be driven here, else why not (one line)."""
    try:
        importlib.import_module("torch")  # zeus asks torch whether training is distributed
        importlib.import_module("zeus.optimizer.power_limit")
    except Exception as err:
        return f"the zeus package cannot be imported here ({type(err).__name__}: {err})"
    return None


def make_zeus(
    backend: ReplayBackend, clock: VirtualClock, eta: float, use_package: bool
) -> ZeusPolicy:
    """Zeus's optimiser for one simulated job: the package's, or our re-implementation."""
    logging.getLogger("zeus").setLevel(logging.WARNING)
    if use_package:
        return RealZeus(backend, clock, eta).__enter__()
    return ZeusReimplementation(backend, clock, eta)
