"""The job model's vocabulary: lifecycle states and transitions, modes, policies, directives.

Pure data, no I/O, and nothing imported beyond the standard library: the training client
(``scheduler.client``) imports this module, and must stay light. The store
(``scheduler.store.jobs``) checks every state change against ``TRANSITIONS``; the control loop
decides which change to make. Every other module (the API's schemas, the client, the control
code) takes ``Mode``, ``OnExceed``, ``Action`` and ``Directive`` from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Final


class JobState(StrEnum):
    """Where a job is in its life.

    ``queued`` waits for GPUs and power; ``running`` has GPUs and a process; ``paused`` has a
    process that checkpointed and waits (its energy budget ran out with ``on_exceed=pause``).
    ``completed`` (exit 0), ``failed`` (non-zero exit or process lost), ``cancelled`` (by its
    user) and ``stopped`` (by the scheduler, e.g. energy budget) are final.
    """

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    STOPPED = "stopped"

    @property
    def terminal(self) -> bool:
        """Whether no transition leaves this state."""
        return not TRANSITIONS[self]


class Mode(StrEnum):
    """How a wattage budget is enforced (see docs/architecture.md, "Budgets and how they are held").

    ``hw``: NVML power limit; ``clock``: locked SM clocks; ``soft``: the client paces steps and
    shrinks the micro-batch; ``auto``: ``hw`` where permitted, else ``soft``.
    """

    AUTO = "auto"
    HW = "hw"
    CLOCK = "clock"
    SOFT = "soft"


class OnExceed(StrEnum):
    """What happens when a job's energy forecast exceeds its energy budget.

    ``warn``: record and report only; ``slow``: move to a more efficient setting and keep going;
    ``pause``: the client checkpoints and the job waits; ``stop``: the job is stopped.
    """

    WARN = "warn"
    SLOW = "slow"
    PAUSE = "pause"
    STOP = "stop"


class Action(StrEnum):
    """What a directive asks of a training loop beyond pacing, at a step boundary.

    ``pause``: checkpoint and wait until the daemon lets the job run again; ``stop``: checkpoint
    and end; ``checkpoint``: checkpoint and go on.
    """

    PAUSE = "pause"
    STOP = "stop"
    CHECKPOINT = "checkpoint"


class Hold(StrEnum):
    """A collective action on a job, stored with the step every rank takes it at.

    ``pause`` and ``stop`` (the energy guard), ``cancel`` (its user) and ``checkpoint`` (on
    request). Every rank obeys at the same step boundary, so no rank is left waiting in a
    collective for one that stopped earlier.
    """

    PAUSE = "pause"
    STOP = "stop"
    CANCEL = "cancel"
    CHECKPOINT = "checkpoint"

    @property
    def action(self) -> Action:
        """What the training loop is told to do."""
        if self is Hold.PAUSE:
            return Action.PAUSE
        if self is Hold.CHECKPOINT:
            return Action.CHECKPOINT
        return Action.STOP


class MemberState(StrEnum):
    """Where one process of a job (a rank) is: ``running``, or ended: ``completed`` (it said it
    ended cleanly), ``failed`` (an error, or it vanished without saying), ``stopped`` (it obeyed
    a stop)."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Directive:
    """What the daemon asks of a training loop, in answer to each progress report.

    The one definition of the directive's fields: the daemon hands them out (the actuators hold
    the soft ones per job, the API answers with all of them) and the training client parses the
    same names. The defaults are neutral: a loop told nothing runs at full speed with its own
    micro-batch.

    Attributes:
        pace_s: Seconds to sleep after each step.
        duty: Share of wall time the loop may compute (soft power budget): after a step of
            duration d (stretched by ``slowdown``), sleep ``d * (1/duty - 1)``. 1.0: full speed.
        micro_batch: The micro-batch size the loop should use; ``None`` keeps the loop's own
            (the loop raises gradient accumulation so the global batch stays the same).
        slowdown: On simulated GPUs, the step-time ratio t(f)/t(f_max) at the current clock: each
            step of measured duration d is stretched by sleeping d * (slowdown - 1). 1.0 on real
            GPUs.
        state: The job's state as the daemon sees it (``None`` before the first answer).
        action: ``pause``, ``stop`` or ``checkpoint`` when the daemon wants the job to
            checkpoint and wait, end or go on; ``None`` otherwise.
        at_step: The step the action takes effect at: a loop obeys once it has finished this
            many steps (at once if it already has). Every rank of a run gets the same step, so
            they stop at the same step boundary. ``None``: at the next step.
    """

    pace_s: float = 0.0
    duty: float = 1.0
    micro_batch: int | None = None
    slowdown: float = 1.0
    state: str | None = None
    action: Action | None = None
    at_step: int | None = None


DIRECTIVE_FIELDS: Final[tuple[str, ...]] = tuple(f.name for f in fields(Directive))
"""The names of a directive's fields, as they appear in the progress answer's JSON."""


TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    # queued -> failed: the job could not be launched (no such user, cwd gone, ...).
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset(
        {
            JobState.COMPLETED,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.STOPPED,
            JobState.PAUSED,
        }
    ),
    JobState.PAUSED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.STOPPED}),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
    JobState.STOPPED: frozenset(),
}
"""For each state, the states a job may move to from it (terminal states: none)."""

TERMINAL_STATES: frozenset[JobState] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
"""States no job leaves."""

ACTIVE_STATES: frozenset[JobState] = frozenset({JobState.RUNNING, JobState.PAUSED})
"""States in which a job has a process (and, while running, GPUs)."""


def can_transition(from_state: JobState | str, to_state: JobState | str) -> bool:
    """Whether a job in ``from_state`` may move to ``to_state``.

    Raises:
        ValueError: Either name is not a ``JobState``.
    """
    return JobState(to_state) in TRANSITIONS[JobState(from_state)]
