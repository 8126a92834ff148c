"""The scheduler's rows in the store: jobs, their events and progress, control history, journal.

Each store works through a telemetry ``Store`` (``JobStore(store)``, ``JournalStore(store)``):
one database and one schema (``telemetry.store.models``), with the telemetry package knowing
nothing of the scheduler.
"""

from scheduler.store.history import ControlHistory
from scheduler.store.jobs import InvalidTransitionError, JobNotFoundError, JobStore
from scheduler.store.journal import (
    OUTSTANDING,
    InvalidJournalTransitionError,
    JournalEntry,
    JournalEntryNotFoundError,
    JournalStatus,
    JournalStore,
    group_by_gpu,
)
from scheduler.store.members import MembershipError
from scheduler.store.records import (
    DecisionRecord,
    JobEvent,
    JobRecord,
    MemberRecord,
    NewJob,
    NewMember,
    ProbeRecord,
    ProgressRecord,
    RunTotals,
    SearchRecord,
    Throughput,
)

__all__ = [
    "OUTSTANDING",
    "ControlHistory",
    "DecisionRecord",
    "InvalidJournalTransitionError",
    "InvalidTransitionError",
    "JobEvent",
    "JobNotFoundError",
    "JobRecord",
    "JobStore",
    "JournalEntry",
    "JournalEntryNotFoundError",
    "JournalStatus",
    "JournalStore",
    "MemberRecord",
    "MembershipError",
    "NewJob",
    "NewMember",
    "ProbeRecord",
    "ProgressRecord",
    "RunTotals",
    "SearchRecord",
    "Throughput",
    "group_by_gpu",
]
