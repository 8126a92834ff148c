"""The SQL store of GPU telemetry: models, engines, the repository, rollups, migrations."""

from telemetry.store.engine import make_engine
from telemetry.store.errors import (
    UPGRADE_HINT,
    SchemaError,
    SchemaOutdatedError,
    StoreError,
    StoreWriteError,
)
from telemetry.store.jobs import (
    InvalidTransitionError,
    JobEvent,
    JobNotFoundError,
    JobRecord,
    JobStore,
    NewJob,
    ProgressRecord,
    Throughput,
)
from telemetry.store.migrate import (
    current_revision,
    downgrade,
    head_revision,
    open_store,
    upgrade,
)
from telemetry.store.repository import (
    GpuRecord,
    ProcessRecord,
    RollupRecord,
    SampleRecord,
    Store,
)

__all__ = [
    "UPGRADE_HINT",
    "GpuRecord",
    "InvalidTransitionError",
    "JobEvent",
    "JobNotFoundError",
    "JobRecord",
    "JobStore",
    "NewJob",
    "ProcessRecord",
    "ProgressRecord",
    "RollupRecord",
    "SampleRecord",
    "SchemaError",
    "SchemaOutdatedError",
    "Store",
    "StoreError",
    "StoreWriteError",
    "Throughput",
    "current_revision",
    "downgrade",
    "head_revision",
    "make_engine",
    "open_store",
    "upgrade",
]
