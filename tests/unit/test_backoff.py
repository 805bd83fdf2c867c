"""The one backoff rule."""

from __future__ import annotations

import pytest

from pipelines.backoff import backoff_s


@pytest.mark.parametrize(
    ("failures", "expected"), [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (500, 5.0)]
)
def test_doubles_from_base_up_to_cap(failures: int, expected: float) -> None:
    """The first retry waits the base, each later one twice as long, never over the cap."""
    assert backoff_s(failures, base=0.5, cap=5.0) == expected


def test_uncapped_by_default() -> None:
    """Without a cap the wait keeps doubling."""
    assert backoff_s(11, base=1.0) == 1024.0


def test_failures_count_from_one() -> None:
    """Zero failures has no backoff to speak of: a caller's off-by-one is an error."""
    with pytest.raises(ValueError, match="counts from 1"):
        backoff_s(0, base=1.0)
