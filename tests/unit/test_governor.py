"""The provider governor's rules (pipelines/governor.py)."""

from __future__ import annotations

import pytest

from pipelines.governor import (
    AccountLimits,
    Usage,
    Waiting,
    admit,
    priority_of,
    room,
    throttled,
)


def test_room_is_the_smaller_of_the_rate_and_the_concurrency_left() -> None:
    limits = AccountLimits(per_window=10, window_s=60, in_flight=4)
    assert room(limits, Usage(in_window=0, in_flight=0)) == 4
    assert room(limits, Usage(in_window=8, in_flight=0)) == 2
    assert room(limits, Usage(in_window=10, in_flight=0)) == 0
    assert room(limits, Usage(in_window=3, in_flight=4)) == 0
    assert room(limits, Usage(in_window=12, in_flight=9)) == 0  # over: never negative
    assert room(AccountLimits(in_flight=2), Usage(100, 1)) == 1


def test_a_429_halves_the_rate_for_a_while_down_to_a_floor() -> None:
    limits = AccountLimits(per_window=10)
    assert room(limits, Usage(0, 0, factor=throttled(1.0, active=False))) == 5
    assert throttled(0.5, active=True) == 0.25
    assert throttled(0.5, active=False) == 0.5  # an expired 429 does not compound
    assert throttled(0.125, active=True) == 0.125
    assert room(AccountLimits(per_window=2), Usage(0, 0, factor=0.125)) == 1  # at least one


def test_the_counted_window_is_a_little_longer_than_the_provider_s() -> None:
    assert AccountLimits(per_window=1, window_s=60).counted_window_s == 61.2
    assert AccountLimits(per_window=1, window_s=2).counted_window_s == 2.5


def test_admit_takes_in_order_and_skips_keys_at_their_cap() -> None:
    waiting = [
        Waiting(1, "acme", 2),
        Waiting(2, "acme", 2),
        Waiting(3, "acme", 2),
        Waiting(4, None, None),
        Waiting(5, "globex", 1),
    ]
    assert admit(waiting, 10, {}) == [1, 2, 4, 5]
    assert admit(waiting, 10, {"acme": 1, "globex": 1}) == [1, 4]
    assert admit(waiting, 2, {}) == [1, 2]


@pytest.mark.parametrize(
    ("value", "expected"), [("batch", 0), ("normal", 5), ("interactive", 9), (7, 7)]
)
def test_priorities_by_name_or_number(value: object, expected: int) -> None:
    assert priority_of(value) == expected


@pytest.mark.parametrize("value", ["urgent", 10, -1, True, 2.5])
def test_a_bad_priority_is_named(value: object) -> None:
    with pytest.raises(ValueError, match=r"batch, normal, interactive or an integer 0\.\.9"):
        priority_of(value)
