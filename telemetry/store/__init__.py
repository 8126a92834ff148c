"""The SQL store of GPU telemetry: engines, the schema and its migrations, and the ``Store``.

The schema (``models``) holds every table of powertrain, the scheduler's too; this package reads
and writes the telemetry ones (GPUs, samples, processes, rollups, energy marks) and reads the job
tables only for the times of job edges. The scheduler's rows have their store code in
``scheduler.store``.
"""

from telemetry.paths import default_home, default_url
from telemetry.store.engine import make_engine
from telemetry.store.errors import (
    UPGRADE_HINT,
    SchemaError,
    SchemaOutdatedError,
    StoreError,
    StoreWriteError,
)
from telemetry.store.migrate import (
    current_revision,
    downgrade,
    head_revision,
    open_store,
    upgrade,
)
from telemetry.store.nodes import NodeRecord
from telemetry.store.records import (
    BucketRecord,
    EnergySource,
    GpuRecord,
    PowerPoint,
    ProcessRecord,
    RollupRecord,
    SampleRecord,
    SegmentEnergy,
    SegmentEnergyUs,
)
from telemetry.store.repository import Store
from telemetry.store.rollups import RAW_MAX_SPAN_S, ROLLUP_LEVELS_S

__all__ = [
    "RAW_MAX_SPAN_S",
    "ROLLUP_LEVELS_S",
    "UPGRADE_HINT",
    "BucketRecord",
    "EnergySource",
    "GpuRecord",
    "NodeRecord",
    "PowerPoint",
    "ProcessRecord",
    "RollupRecord",
    "SampleRecord",
    "SchemaError",
    "SchemaOutdatedError",
    "SegmentEnergy",
    "SegmentEnergyUs",
    "Store",
    "StoreError",
    "StoreWriteError",
    "current_revision",
    "default_home",
    "default_url",
    "downgrade",
    "head_revision",
    "make_engine",
    "open_store",
    "upgrade",
]
