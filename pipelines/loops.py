"""A periodic task that survives its failures: log, back off, go on, and report."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from pipelines.backoff import backoff_s

log = structlog.get_logger("wavechain.loops")


async def run_every(
    name: str,
    interval_s: float,
    step: Callable[[], Awaitable[object]],
    *,
    report: Callable[[BaseException | None], None] = lambda error: None,
    max_backoff_s: float = 300.0,
) -> None:
    """Call ``step`` every ``interval_s`` until cancelled. A failed step is logged and
    tried again after a backoff (never later than the interval would have it); each
    step's outcome goes to ``report`` (the health checks)."""
    failures = 0
    while True:
        try:
            await step()
        except Exception as exc:
            failures += 1
            log.warning(f"{name}.failed", error=repr(exc))
            report(exc)
            await asyncio.sleep(min(interval_s, backoff_s(failures, base=1.0, cap=max_backoff_s)))
            continue
        failures = 0
        report(None)
        await asyncio.sleep(interval_s)
