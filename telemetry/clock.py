"""Clocks: the wall clock, and a virtual one that tests move by hand."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """A source of time. ``now`` is seconds since the Unix epoch (UTC)."""

    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


def to_datetime(epoch_s: float) -> datetime:
    """Seconds since the epoch as a timezone-aware UTC datetime."""
    return datetime.fromtimestamp(epoch_s, tz=UTC)


class WallClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class VirtualClock:
    """A clock that only moves when told to; ``sleep`` advances it instantly. Thread-safe."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back (asked for {seconds} s)")
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        self.advance(max(seconds, 0.0))
