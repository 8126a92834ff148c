"""Times and durations as people write them: ISO 8601 (naive means UTC), ``now``, or a duration
such as ``90s``, ``30m``, ``24h``, ``7d``, ``2w`` counted from now.

The one definition of these forms: report ranges (``--since 7d``), deadlines (``--deadline 6h``)
and dated CSV series all read times through here.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = ["parse_duration_s", "parse_time", "parse_when"]

_DURATION: Final = re.compile(r"^\s*\+?(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*(ago)?\s*$", re.I)
_UNIT_S: Final = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_time(text: str) -> datetime:
    """An ISO 8601 time, timezone-aware; a naive one is taken as UTC.

    Raises:
        ValueError: Not ISO 8601.
    """
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def parse_duration_s(text: str) -> float:
    """A duration such as ``90s``, ``30m``, ``24h``, ``7d`` or ``2w``, in seconds.

    Raises:
        ValueError: Not a duration.
    """
    match = _DURATION.match(text)
    if match is None or match.group(3):
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 24h, 7d or 2w")
    return float(match.group(1)) * _UNIT_S[match.group(2).lower()]


def parse_when(text: str, now: datetime, *, ahead: bool = False) -> datetime:
    """A point in time: ISO 8601, ``now``, or a duration from ``now``.

    Args:
        text: What was written.
        now: The present (aware).
        ahead: A duration counts forward from ``now`` (a deadline: ``6h`` or ``+6h``); else
            backward (a report range: ``24h`` or ``24h ago``).

    Raises:
        ValueError: None of the forms; the message says which are allowed.
    """
    if text.strip().lower() == "now":
        return now
    match = _DURATION.match(text)
    if match is not None and not (ahead and match.group(3)):
        seconds = float(match.group(1)) * _UNIT_S[match.group(2).lower()]
        return now + timedelta(seconds=seconds if ahead else -seconds)
    try:
        return parse_time(text)
    except ValueError:
        relative = "a duration from now (6h, 2d)" if ahead else "a duration ago (24h, 7d, 30m)"
        raise ValueError(
            f"cannot read time {text!r}: use ISO 8601 (2026-01-31T12:00Z) or {relative}"
        ) from None

