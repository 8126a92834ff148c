"""Ingest rate of the store against raw ``sqlite3.executemany`` on the same SQLite schema.

Both sides write the same readings (8 GPUs x 10 Hz, flushed every second: 80 rows per batch,
one transaction per batch) into SQLite files created by the same migrations (same table, columns,
indexes) and opened with the same pragmas (WAL, synchronous=NORMAL, busy_timeout, foreign keys).
The raw side converts each reading to a tuple (timestamps to epoch microseconds) inside the timed
loop, as any writer must. Target: store/raw >= 0.5.

    python bench/ingest.py [--rows N] [--repeat K] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telemetry.backends.base import READING_FIELDS, GpuInfo, GpuReading
from telemetry.store import Store, open_store
from telemetry.store.engine import SQLITE_BUSY_TIMEOUT_MS
from telemetry.store.models import to_epoch_us

GPUS = 8
HZ = 10
BATCH_ROWS = GPUS * HZ  # one flush per second

_COLUMNS = ("gpu_id", "sampled_at", *READING_FIELDS)
_values = attrgetter(*READING_FIELDS)
RAW_INSERT = (
    f"INSERT INTO samples ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
)


def _infos() -> list[GpuInfo]:
    return [
        GpuInfo(
            index=i,
            uuid=f"GPU-bench-{i:04d}",
            name="NVIDIA H100 80GB HBM3",
            min_limit_mw=200_000,
            max_limit_mw=700_000,
            default_limit_mw=700_000,
            min_sm_clock_mhz=345,
            max_sm_clock_mhz=1980,
            memory_total_bytes=80 * 2**30,
            has_energy_counter=True,
        )
        for i in range(GPUS)
    ]


def _batches(rows: int, ids: dict[int, int]) -> list[list[tuple[int, GpuReading]]]:
    """Realistic readings: every field set, counters rising, 100 ms apart per GPU."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    out: list[list[tuple[int, GpuReading]]] = []
    batch: list[tuple[int, GpuReading]] = []
    for n in range(rows):
        tick, gpu = divmod(n, GPUS)
        power = 600_000 + (n * 7919) % 80_000
        reading = GpuReading(
            index=gpu,
            sampled_at=start + timedelta(milliseconds=100 * tick + gpu),
            power_mw=power,
            power_avg_mw=power - 1_000,
            energy_mj=10**9 + tick * 65_000,
            sm_clock_mhz=1980,
            mem_clock_mhz=2619,
            gpu_util_pct=98,
            mem_util_pct=45,
            temperature_c=60 + gpu,
            memory_used_bytes=70 * 2**30,
            power_limit_mw=700_000,
            throttle_reasons=0x4,
        )
        batch.append((ids[gpu], reading))
        if len(batch) == BATCH_ROWS:
            out.append(batch)
            batch = []
    if batch:
        out.append(batch)
    return out


def _raw_connection(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _time_store(store: Store, batches: Sequence[Sequence[tuple[int, GpuReading]]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        store.insert_samples(batch)
    return time.perf_counter() - started


def _time_raw(
    conn: sqlite3.Connection, batches: Sequence[Sequence[tuple[int, GpuReading]]]
) -> float:
    started = time.perf_counter()
    for batch in batches:
        params = [(gpu_id, to_epoch_us(r.sampled_at), *_values(r)) for gpu_id, r in batch]
        conn.execute("BEGIN")
        conn.executemany(RAW_INSERT, params)
        conn.execute("COMMIT")
    return time.perf_counter() - started


def run(rows: int, repeat: int) -> dict[str, float]:
    """Time both writers ``repeat`` times each (alternating, fresh files); keep each one's best."""
    best_store = best_raw = float("inf")
    with tempfile.TemporaryDirectory(prefix="powertrain-ingest-") as tmp:
        for round_ in range(repeat):
            store_path = Path(tmp) / f"store-{round_}.db"
            raw_path = Path(tmp) / f"raw-{round_}.db"
            store = open_store(f"sqlite:///{store_path}")
            raw_setup = open_store(f"sqlite:///{raw_path}")  # the same migrations: same schema
            try:
                ids = store.register_gpus(_infos(), host="bench", backend="simulated")
                raw_ids = raw_setup.register_gpus(_infos(), host="bench", backend="simulated")
                assert raw_ids == ids
            finally:
                raw_setup.close()
            batches = _batches(rows, ids)
            conn = _raw_connection(raw_path)
            try:
                best_raw = min(best_raw, _time_raw(conn, batches))
                best_store = min(best_store, _time_store(store, batches))
                count = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
                assert count == rows and store.sample_count() == rows
            finally:
                conn.close()
                store.close()
    store_rate = rows / best_store
    raw_rate = rows / best_raw
    return {
        "store_rows_per_s": round(store_rate, 1),
        "raw_rows_per_s": round(raw_rate, 1),
        "ratio": round(store_rate / raw_rate, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows per writer per round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best of each counts")
    parser.add_argument("--json", type=Path, help="write the result here as JSON")
    args = parser.parse_args(argv)
    if args.rows < BATCH_ROWS or args.repeat < 1:
        parser.error(f"--rows must be at least {BATCH_ROWS} and --repeat at least 1")
    result = run(args.rows, args.repeat)
    print(
        f"rows={args.rows} batch={BATCH_ROWS} ({GPUS} GPUs x {HZ} Hz, one transaction per batch)\n"
        f"store: {result['store_rows_per_s']:>12,.0f} rows/s\n"
        f"raw:   {result['raw_rows_per_s']:>12,.0f} rows/s (sqlite3.executemany)\n"
        f"ratio: {result['ratio']:.3f} (target >= 0.5)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"rows": args.rows, "batch_rows": BATCH_ROWS, **result}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
