"""The job model's vocabulary: lifecycle states and their allowed transitions, enforcement modes.

Pure data, no I/O. The store (``scheduler.store.jobs``) checks every state change against
``TRANSITIONS``; the control loop decides which change to make.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


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
