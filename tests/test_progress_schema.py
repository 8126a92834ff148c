"""The progress report's micro-batch fields, as the daemon's API validates them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from scheduler.schemas import ProgressReport


def test_a_report_declares_its_micro_batches_and_its_own() -> None:
    report = ProgressReport(steps=3, micro_batches=[2, 4, 8], micro_batch_default=4)
    assert (report.micro_batches, report.micro_batch_default) == ([2, 4, 8], 4)
    assert ProgressReport(steps=3).micro_batches is None


@pytest.mark.parametrize("fields", [
    {"micro_batches": [0, 4]},  # not positive
    {"micro_batches": []},  # none
    {"micro_batches": list(range(1, 66))},  # more than any loop declares
    {"micro_batch_default": 4},  # its own, without the ones it allows
    {"micro_batches": [2, 4], "micro_batch_default": 0},
])
def test_bad_micro_batch_fields_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ProgressReport(steps=3, **fields)  # type: ignore[arg-type]
