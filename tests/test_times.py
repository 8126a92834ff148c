"""Times and durations as people write them (energy.times): the forms every command accepts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from energy.times import parse_duration_s, parse_time, parse_when

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


def test_a_report_range_counts_back_from_now() -> None:
    assert parse_when("24h", NOW) == NOW - timedelta(hours=24)
    assert parse_when("24h ago", NOW) == NOW - timedelta(hours=24)
    assert parse_when("7d", NOW) == NOW - timedelta(days=7)
    assert parse_when("90s", NOW) == NOW - timedelta(seconds=90)
    assert parse_when("30m", NOW) == NOW - timedelta(minutes=30)
    assert parse_when("2w", NOW) == NOW - timedelta(weeks=2)
    assert parse_when("now", NOW) == NOW


def test_a_deadline_counts_ahead() -> None:
    assert parse_when("6h", NOW, ahead=True) == NOW + timedelta(hours=6)
    assert parse_when("+1.5d", NOW, ahead=True) == NOW + timedelta(days=1.5)
    with pytest.raises(ValueError, match="a duration from now"):
        parse_when("6h ago", NOW, ahead=True)  # a deadline in the past is no deadline


def test_iso_8601_naive_is_utc() -> None:
    assert parse_when("2026-02-01T10:00:00Z", NOW) == datetime(2026, 2, 1, 10, tzinfo=UTC)
    assert parse_when("2026-02-01T10:00", NOW) == datetime(2026, 2, 1, 10, tzinfo=UTC)
    assert parse_when("2026-02-01T11:00+01:00", NOW) == datetime(2026, 2, 1, 10, tzinfo=UTC)
    assert parse_time("2026-02-01") == datetime(2026, 2, 1, tzinfo=UTC)


@pytest.mark.parametrize("text", ["yesterday", "24 hours", "h", "-3h", ""])
def test_anything_else_is_refused_with_the_forms_allowed(text: str) -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_when(text, NOW)


def test_durations() -> None:
    assert parse_duration_s("90s") == 90
    assert parse_duration_s("2w") == 14 * 86_400
    for bad in ("2 weeks", "3h ago", "soon"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration_s(bad)
