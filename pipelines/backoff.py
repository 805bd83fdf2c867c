"""The one backoff rule: how long to wait before the next try, after ``failures`` failures.

``base * 2 ** (failures - 1)``, capped: the first retry waits ``base``, each later one
twice the one before, never more than ``cap``. Pure (the state machine uses it too).
"""

from __future__ import annotations


def backoff_s(failures: int, *, base: float, cap: float = float("inf")) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1 for the first)."""
    if failures < 1:
        raise ValueError(f"failures counts from 1, got {failures}")
    # Past 2**64 the cap has long been reached; an int exponent that large is slow.
    return min(cap, base * 2.0 ** min(failures - 1, 64))
