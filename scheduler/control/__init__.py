"""Per-job power control, pure: the vocabulary, the hw/clock/soft controllers, and the guards.

Nothing here reads a GPU, the store or a clock. The daemon's budget loop (``scheduler.budgets``)
builds an ``Observation`` once per control tick (1 Hz), calls a controller's ``tick``, applies the
``Command``s of the returned ``Decision``s through its actuators, and stores each decision with
the power and throughput before it and, a few ticks later, after it (``Decision.after``)::

    ctl = make_controller(choose_mode("auto", hw_permitted=probe_ok).mode)
    every second:
        for decision in ctl.tick(observation):
            actuators.apply(decision.commands)
            journal.record(decision)

Modes (docs/architecture.md, "Budgets and how they are held"):

* ``hw`` — ``HwController``: the power limit at the budget, then trimmed on the measured average;
* ``clock`` — ``ClockController``: the highest locked SM clock whose measured power fits;
* ``soft`` — ``SoftController``: pacing from a model-based feedback controller on duty, and,
  where the job's loop declares micro-batches, the one measured to give the most throughput
  within the budget (the least dynamic energy per step);
* ``auto`` — ``choose_mode``: ``hw`` where the daemon may set limits, else ``soft``.

Each controller is a small state machine with explicit states and documented transitions
(not flag soup). All of them aim at a setpoint a little under the budget
(``budget * (1 - margin)``) so that 10 s averages stay at or under ``budget * 1.02``.

``EnergyForecast`` forecasts a job's total energy from its progress; ``EnergyGuard`` turns
crossings of the energy budget into warn / slow / pause / resume / stop, once per crossing.
``NodeCapGuard`` holds the node's power cap at run time by lowering the effective per-GPU budgets
of the lowest-priority jobs first, and gives them back when headroom returns.

Modules: ``commands`` (commands, observations, decisions, the controller protocol), ``hw``,
``clock``, ``soft`` (one controller each), ``modes`` (mode choice), ``energy_guard`` (forecast
and guard), ``node_cap`` (the node-cap guard); ``_shared`` holds what the controllers share.
This package re-exports their public names.
"""

from __future__ import annotations

from scheduler.control._shared import WINDOW_TOLERANCE
from scheduler.control.clock import ClockController, ClockState
from scheduler.control.commands import (
    Command,
    Decision,
    GpuFacts,
    GpuObservation,
    LockClocks,
    Observation,
    PowerController,
    ResetClocks,
    ResetPowerLimit,
    SetMicroBatch,
    SetPace,
    SetPowerLimit,
)
from scheduler.control.energy_guard import (
    EnergyAction,
    EnergyEvent,
    EnergyForecast,
    EnergyGuard,
    Forecast,
    GuardState,
)
from scheduler.control.hw import HwController, HwState
from scheduler.control.modes import ModeChoice, choose_mode, make_controller
from scheduler.control.node_cap import JobPower, NodeCapDecision, NodeCapGuard
from scheduler.control.soft import BUSY_DROP, RESTART_CHANGE, SoftController, SoftState

__all__ = [
    "BUSY_DROP",
    "RESTART_CHANGE",
    "WINDOW_TOLERANCE",
    "ClockController",
    "ClockState",
    "Command",
    "Decision",
    "EnergyAction",
    "EnergyEvent",
    "EnergyForecast",
    "EnergyGuard",
    "Forecast",
    "GpuFacts",
    "GpuObservation",
    "GuardState",
    "HwController",
    "HwState",
    "JobPower",
    "LockClocks",
    "ModeChoice",
    "NodeCapDecision",
    "NodeCapGuard",
    "Observation",
    "PowerController",
    "ResetClocks",
    "ResetPowerLimit",
    "SetMicroBatch",
    "SetPace",
    "SetPowerLimit",
    "SoftController",
    "SoftState",
    "choose_mode",
    "make_controller",
]
