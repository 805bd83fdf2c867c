"""Spending caps: the rule that decides whether an attempt may be bought. Pure: the store
sums the ledger inside the transaction that records the attempt, and calls ``check``.

Caps: a run's ``budget_usd`` (its pipeline's, or its request's) and ``DAILY_BUDGET_USD``
(every run, per UTC day). An attempt is charged at its price-table price before it is
sent: a cap holds only for prices known, so under a cap an attempt with no known price
is refused rather than let through unchecked.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from pipelines.errors import BudgetExceededError, SpecError
from pipelines.store.records import Charge

#: Rounding slack: prices are decimal dollars summed as floats.
EPSILON = 1e-9


def day_start(now: float) -> float:
    """Midnight UTC of ``now``'s day: where the daily cap's day begins."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()


def usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.4f}"


def check(
    stage: str,
    charge: Charge,
    *,
    run_cap: float | None,
    run_spent: float,
    day_spent: float,
) -> None:
    """Raise ``BudgetExceededError`` naming the cap if buying this attempt would cross one."""
    caps = [
        ("the run's budget_usd", run_cap, run_spent),
        ("DAILY_BUDGET_USD", charge.daily_cap_usd, day_spent),
    ]
    for name, cap, spent in caps:
        if cap is None:
            continue
        if charge.usd is None:
            raise BudgetExceededError(
                f"stage '{stage}': {name} ({usd(cap)}) applies, but {charge.model} has no "
                "known price: set it in the price table (PRICES_FILE)"
            )
        if spent + charge.usd > cap + EPSILON:
            raise BudgetExceededError(
                f"stage '{stage}': {name} of {usd(cap)} would be crossed: {usd(spent)} "
                f"spent, {usd(charge.usd)} more for {charge.model}"
            )


_AGO = re.compile(r"(\d{1,5})([mhdw])")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float) -> float:
    """When a spend report starts: ``7d``, ``24h``, ``30m``, ``2w`` ago, a day
    (``2026-12-01``, from midnight UTC), or a time with its offset."""
    text = text.strip()
    if m := _AGO.fullmatch(text):
        return now - int(m[1]) * _UNIT_S[m[2]]
    try:
        if len(text) == 10:
            return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
        at = datetime.fromisoformat(text)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise SpecError(
            f"since: {text[:64]!r} is not 7d, 24h, 30m, 2w, a day (2026-12-01) or a time "
            "with its offset (2026-12-01T09:00:00Z)"
        )
    return at.timestamp()
