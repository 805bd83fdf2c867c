"""The provider governor's rules: how many submits a provider may take now, and which
waiting submit jobs get them. Pure: the store counts (in the transaction that claims
jobs, under one lock across replicas) and calls ``room`` and ``admit``.

AccountLimits are an account's (WaveSpeed documents them by level): tasks per minute, and tasks
at once. A submit job of a governed provider is claimed only while both have room, so a
burst waits in the job queue instead of meeting 429s; among the waiting, higher
``priority`` first, then the longest waiting; a run's concurrency key caps how many of
that key's tasks are in flight at once (one customer's batch cannot take every slot).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

#: WaveSpeed's account levels (docs: account-levels): tasks per minute, and at once. Gold's
#: concurrency is not published: unlimited here.
LEVELS: dict[str, tuple[int, int | None]] = {
    "bronze": (2, 2),
    "silver": (500, 300),
    "gold": (3000, None),
    "ultra": (5000, 10_000),
}
#: Run priorities by name (an integer 0..9 is accepted too).
PRIORITIES = {"batch": 0, "normal": 5, "interactive": 9}
#: After a 429 the rate is multiplied by this, down to ``MIN_FACTOR``, for a window.
THROTTLE_FACTOR = 0.5
MIN_FACTOR = 0.125


@dataclass(frozen=True, slots=True)
class AccountLimits:
    """One provider's account limits."""

    per_window: int | None = None
    window_s: float = 60.0
    in_flight: int | None = None

    @property
    def counted_window_s(self) -> float:
        """The window the governor counts over: a little longer than the provider's, so
        that a submit's time in transit (claim to arrival, well under this margin) cannot
        carry one more into a provider's window. It costs W / (W + margin) of the rate:
        0.98 of a minute's."""
        return self.window_s + max(0.5, self.window_s * 0.02)


@dataclass(frozen=True, slots=True)
class Governor:
    #: By provider (``wavespeed``); a provider not named is not governed.
    limits: Mapping[str, AccountLimits] = field(default_factory=dict)

    def governs(self, provider: str) -> bool:
        lim = self.limits.get(provider)
        return lim is not None and (lim.per_window is not None or lim.in_flight is not None)


class Usage(NamedTuple):
    """What a provider has taken, counted by the store."""

    #: Submits recorded within the counted window, plus claimed jobs not yet recorded.
    in_window: int
    #: Tasks that may be running (submitted, or on their way), plus claimed jobs.
    in_flight: int
    #: The rate's multiplier after a recent 429 (1.0 when none).
    factor: float = 1.0


def room(limits: AccountLimits, usage: Usage) -> int:
    """How many more submits the provider may take now (0 or more)."""
    free = math.inf
    if limits.per_window is not None:
        cap = max(1, math.floor(limits.per_window * usage.factor))
        free = min(free, cap - usage.in_window)
    if limits.in_flight is not None:
        free = min(free, limits.in_flight - usage.in_flight)
    return 0 if free <= 0 else (1 << 30 if free == math.inf else int(free))


class Waiting(NamedTuple):
    """A due submit job of a governed provider, in the order the store read them
    (priority first, then the longest waiting)."""

    job_id: int
    concurrency_key: str | None
    concurrency_limit: int | None


def admit(waiting: Sequence[Waiting], free: int, key_in_flight: Mapping[str, int]) -> list[int]:
    """The jobs to claim: in order, up to ``free``, skipping those whose key is at its cap
    (counting the ones admitted here)."""
    taken: list[int] = []
    used = dict(key_in_flight)
    for job in waiting:
        if len(taken) >= free:
            break
        key, cap = job.concurrency_key, job.concurrency_limit
        if key is not None and cap is not None:
            if used.get(key, 0) >= cap:
                continue
            used[key] = used.get(key, 0) + 1
        taken.append(job.job_id)
    return taken


def throttled(factor: float, active: bool) -> float:
    """The rate's multiplier after a 429: halved (from 1.0, or from the current one while
    an earlier 429's is still active), never below ``MIN_FACTOR``."""
    return max(MIN_FACTOR, (factor if active else 1.0) * THROTTLE_FACTOR)


def priority_of(value: object) -> int:
    """A run's ``priority``: a name (batch, normal, interactive) or 0..9. Raises
    ValueError naming what is accepted."""
    if isinstance(value, str) and value in PRIORITIES:
        return PRIORITIES[value]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 9:
        return value
    raise ValueError(f"must be batch, normal, interactive or an integer 0..9, got {value!r}")
