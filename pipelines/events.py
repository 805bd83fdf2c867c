"""Lifecycle events: the outbox relay to SNS.

State changes and their event rows are written in one transaction (the store); this
relay publishes pending rows with ``publish_batch`` and marks them sent. A publish
failure leaves rows pending and backs off; it never blocks or undoes a state change.
Order per run is kept: a batch carries at most one event of a run, and a run whose
event failed sends nothing more until that one goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import anyio.to_thread
import structlog
from anyio import CapacityLimiter

from pipelines.store import OutboxRow, Store

log = structlog.get_logger("wavechain.events")
ATTRIBUTES = ("event_type", "pipeline", "run_id", "stage", "model", "status")
_BATCH = 10  # SNS publish_batch maximum


def message_attributes(body: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Attributes subscribers filter on; SNS refuses empty values, so those are left out."""
    values = {
        "event_type": body.get("type"),
        "pipeline": body.get("pipeline"),
        "run_id": body.get("run_id"),
        "stage": body.get("stage"),
        "model": body.get("model"),
        "status": body.get("status"),
    }
    return {
        name: {"DataType": "String", "StringValue": str(value)}
        for name, value in values.items()
        if value not in (None, "")
    }


class SnsPublisher:
    def __init__(self, sns: Any, topic_arn: str, *, limiter: CapacityLimiter) -> None:
        self._sns = sns
        self.topic_arn = topic_arn
        self.fifo = topic_arn.endswith(".fifo")
        self._limiter = limiter

    def _entry(self, row: OutboxRow) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "Id": str(row.seq),
            "Message": json.dumps(row.body, separators=(",", ":")),
            "MessageAttributes": message_attributes(row.body),
        }
        if self.fifo:
            entry["MessageGroupId"] = row.run_id
            entry["MessageDeduplicationId"] = row.body["id"]
        return entry

    async def publish(self, rows: Sequence[OutboxRow]) -> tuple[list[int], list[int]]:
        """Publish up to 10 rows; return (sent seqs, failed seqs). Raises if SNS is unreachable."""
        call = partial(
            self._sns.publish_batch,
            TopicArn=self.topic_arn,
            PublishBatchRequestEntries=[self._entry(r) for r in rows],
        )
        answer = await anyio.to_thread.run_sync(call, limiter=self._limiter)
        sent = [int(item["Id"]) for item in answer.get("Successful", [])]
        failed = [int(item["Id"]) for item in answer.get("Failed", [])]
        return sent, failed


def next_batch(rows: Sequence[OutboxRow], limit: int = _BATCH) -> list[OutboxRow]:
    """The oldest pending event of each run, oldest first, at most ``limit`` of them."""
    seen: set[str] = set()
    batch: list[OutboxRow] = []
    for row in rows:
        if row.run_id in seen:
            continue
        seen.add(row.run_id)
        batch.append(row)
        if len(batch) == limit:
            break
    return batch


class OutboxRelay:
    def __init__(
        self,
        store: Store,
        publisher: SnsPublisher,
        *,
        poll_interval_s: float = 1.0,
        max_backoff_s: float = 30.0,
        parallel: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._parallel = parallel
        self._store = store
        self._publisher = publisher
        self._poll = poll_interval_s
        self._max_backoff = max_backoff_s
        self._clock = clock
        self._wake = asyncio.Event()
        self.published = 0

    def notify(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                progressed = await self.drain_once()
                failures = 0
            except Exception as exc:  # SNS down, throttled, misconfigured: keep rows, back off
                failures += 1
                delay = min(self._max_backoff, 0.2 * 2**failures)
                log.warning("events.publish_failed", error=repr(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                continue
            if not progressed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll)

    async def drain_once(self) -> bool:
        """Publish one round of pending events; True if anything was sent.

        A round takes the oldest pending event of up to ``_BATCH * parallel`` distinct
        runs and publishes them as concurrent batches: a run never has two events in
        flight at once, so each run's events still go out in order.
        """
        pending = await self._store.pending_events(limit=2000)
        sent_any = False
        # Marking a wave sent overlaps the next wave's publishing (one mark in flight at a
        # time): order per run depends on what was published, which `pending` tracks here.
        marking: asyncio.Task[None] | None = None
        try:
            while pending:
                wave = next_batch(pending, limit=_BATCH * self._parallel)
                answers = await asyncio.gather(
                    *(
                        self._publisher.publish(wave[i : i + _BATCH])
                        for i in range(0, len(wave), _BATCH)
                    )
                )
                sent = [seq for ok, _ in answers for seq in ok]
                failed = [seq for _, bad in answers for seq in bad]
                if sent:
                    if marking is not None:
                        await marking
                    marking = asyncio.ensure_future(self._store.mark_sent(sent, now=self._clock()))
                    self.published += len(sent)
                    sent_any = True
                if failed:
                    await self._store.mark_failed(failed)
                    log.warning("events.entries_failed", count=len(failed))
                failed_set, done = set(failed), set(sent)
                blocked = {r.run_id for r in wave if r.seq in failed_set}
                pending = [r for r in pending if r.seq not in done and r.run_id not in blocked]
                if failed and not sent:
                    break
        finally:
            if marking is not None:
                await marking
        return sent_any
