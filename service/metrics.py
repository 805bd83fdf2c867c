"""`GET /metrics`: Prometheus' text format. The process's own counters (or, under
`serve --processes N`, all its processes', read from their shared directory), and gauges
of the whole store read at scrape time: the outbox's backlog and runs by status. Every
replica reports the same store gauges: aggregate them with max(), not sum()."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import anyio.to_thread
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pipelines import budget
from pipelines.state import RunStatus
from pipelines.store.records import Spent
from service import keys


class _StoreGauges(Collector):
    def __init__(self, values: dict[str, Any], now: float) -> None:
        self._values = values
        self._now = now

    def collect(self) -> Iterator[GaugeMetricFamily]:
        v = self._values
        yield GaugeMetricFamily(
            "wavechain_outbox_pending_events",
            "Lifecycle events not yet published (parked ones aside).",
            value=v["pending_events"],
        )
        oldest = v["oldest_pending_event_at"]
        yield GaugeMetricFamily(
            "wavechain_outbox_oldest_pending_age_seconds",
            "Age of the oldest event waiting to be published (0 when none waits).",
            value=max(0.0, self._now - oldest) if oldest is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "wavechain_outbox_parked_events",
            "Events given up on (dead letters), kept in the outbox.",
            value=v["parked_events"],
        )
        runs = GaugeMetricFamily(
            "wavechain_runs", "Runs in the store, by status.", labels=["status"]
        )
        for status in RunStatus:
            runs.add_metric([status.value], v["runs"].get(status.value, 0))
        yield runs
        spent: Spent = v["spend_today"]
        yield GaugeMetricFamily(
            "wavechain_spend_today_usd",
            "What attempts cost since midnight UTC (the spend ledger; known prices only).",
            value=spent.known_usd,
        )
        yield GaugeMetricFamily(
            "wavechain_spend_today_unpriced_attempts",
            "Attempts since midnight UTC whose price is unknown (not in the USD figure).",
            value=spent.unknown,
        )


def _process_text() -> bytes:
    """This process's counters, or under --processes all of theirs (read from files)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


async def metrics(request: web.Request) -> web.Response:
    store, now = request.app[keys.STORE], request.app[keys.CLOCK]()
    gauges = await store.gauges()
    gauges["spend_today"] = await store.spent(since=budget.day_start(now))
    # Off the event loop: the multiprocess collector reads every process's files.
    text = await anyio.to_thread.run_sync(_process_text)
    registry = CollectorRegistry()
    registry.register(_StoreGauges(gauges, now))
    body = text + generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
