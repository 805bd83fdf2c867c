"""Lifecycle events: the outbox relay to SNS.

State changes and their event rows are written in one transaction (the store); this
relay publishes pending rows with ``publish_batch`` and marks each message sent, failed
or parked. Rules:

- Order per run: a run has at most one event in flight; its later events wait until
  that one is sent or parked.
- Size: SNS takes at most 256 KiB per message and per batch. An event over that is
  trimmed (its outputs lists cut to a count) and, if still too large, parked at once.
  Batches are packed under the limit.
- Failures are per message: an entry SNS refuses counts a try for that message alone and
  is retried with backoff; after ``max_tries`` it is parked (a dead letter: kept in the
  outbox, logged, counted) and its run's later events go on. A batch the call itself
  failed for a sender's fault is retried message by message, to find the culprit; a
  failure of SNS or the network (5xx, throttling, no connection) counts against no
  message: the relay backs off and tries again.
- One relay at a time across processes and replicas (a store lease), so each event is
  published once by one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio.to_thread
import structlog
from anyio import CapacityLimiter

from pipelines.backoff import backoff_s
from pipelines.metrics import EVENTS
from pipelines.store import OutboxRow, Store

log = structlog.get_logger("wavechain.events")
ATTRIBUTES = ("event_type", "pipeline", "run_id", "stage", "model", "status")
_BATCH = 10  # SNS publish_batch maximum entries
#: SNS's limit on one message, and on all the messages of one batch together.
MAX_MESSAGE_BYTES = 256 * 1024


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


def entry_size(entry: Mapping[str, Any]) -> int:
    """What SNS counts against the 256 KiB limit: the message and its attributes."""
    size = len(entry["Message"].encode())
    for name, attribute in entry.get("MessageAttributes", {}).items():
        size += len(name.encode()) + len(attribute["DataType"].encode())
        size += len(attribute.get("StringValue", "").encode())
    return size


def fit(body: dict[str, Any], limit: int = MAX_MESSAGE_BYTES) -> dict[str, Any] | None:
    """``body`` as it can be published: as it is, or with its outputs lists cut to a count
    and its error shortened when that makes it fit; None when nothing does."""
    attributes = message_attributes(body)
    candidates = [
        body,
        {
            **body,
            "outputs": [],
            "provider_outputs": [],
            "outputs_omitted": len(body.get("outputs") or []),
            "error": str(body.get("error"))[:1000] if body.get("error") is not None else None,
        },
    ]
    for candidate in candidates:
        message = json.dumps(candidate, separators=(",", ":"))
        if entry_size({"Message": message, "MessageAttributes": attributes}) <= limit:
            return candidate
    return None


class PublishError(Exception):
    """A publish call failed as a whole. ``sender_fault``: the request was at fault (its
    messages may be retried one by one); otherwise SNS or the network was."""

    def __init__(self, message: str, *, sender_fault: bool) -> None:
        super().__init__(message)
        self.sender_fault = sender_fault


@dataclass(frozen=True, slots=True)
class Published:
    sent: list[int]
    #: seq → (error, the sender's fault)
    failed: dict[int, tuple[str, bool]]


class SnsPublisher:
    def __init__(self, sns: Any, topic_arn: str, *, limiter: CapacityLimiter) -> None:
        self._sns = sns
        self.topic_arn = topic_arn
        self.fifo = topic_arn.endswith(".fifo")
        self._limiter = limiter

    def entry(self, seq: int, run_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "Id": str(seq),
            "Message": json.dumps(body, separators=(",", ":")),
            "MessageAttributes": message_attributes(body),
        }
        if self.fifo:
            entry["MessageGroupId"] = run_id
            entry["MessageDeduplicationId"] = str(body["id"])
        return entry

    async def publish(self, entries: Sequence[dict[str, Any]]) -> Published:
        """Publish up to 10 entries; per entry, sent or failed. Raises PublishError when
        the call fails as a whole."""
        from botocore.exceptions import BotoCoreError, ClientError

        call = partial(
            self._sns.publish_batch,
            TopicArn=self.topic_arn,
            PublishBatchRequestEntries=list(entries),
        )
        try:
            answer = await anyio.to_thread.run_sync(call, limiter=self._limiter)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
            code = exc.response.get("Error", {}).get("Code", "")
            sender = 400 <= status < 500 and code not in ("Throttling", "ThrottlingException")
            raise PublishError(f"{code or status}: {exc}", sender_fault=sender) from exc
        except BotoCoreError as exc:  # no connection, timeouts: nothing wrong with the batch
            raise PublishError(repr(exc), sender_fault=False) from exc
        sent = [int(item["Id"]) for item in answer.get("Successful", [])]
        failed = {
            int(item["Id"]): (
                f"{item.get('Code', '')}: {item.get('Message', '')}",
                bool(item.get("SenderFault", False)),
            )
            for item in answer.get("Failed", [])
        }
        return Published(sent, failed)


def next_batch(rows: Sequence[OutboxRow], *, now: float, limit: int) -> list[OutboxRow]:
    """The oldest pending event of each run, oldest first, at most ``limit`` of them; a run
    whose oldest event waits for a retry sends nothing until then (order per run)."""
    seen: set[str] = set()
    batch: list[OutboxRow] = []
    for row in rows:
        if row.run_id in seen:
            continue
        seen.add(row.run_id)
        if row.not_before is not None and row.not_before > now:
            continue
        batch.append(row)
        if len(batch) == limit:
            break
    return batch


def pack(entries: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Entries in batches of at most 10 and 256 KiB together, in order."""
    batches: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        grown = size + entry_size(entry)
        if current and (len(current) == _BATCH or grown > MAX_MESSAGE_BYTES):
            batches.append(current)
            current, grown = [], entry_size(entry)
        current.append(entry)
        size = grown
    if current:
        batches.append(current)
    return batches


class OutboxRelay:
    def __init__(
        self,
        store: Store,
        publisher: SnsPublisher,
        *,
        poll_interval_s: float = 1.0,
        max_backoff_s: float = 10.0,
        parallel: int = 8,
        max_tries: int = 8,
        retry_base_s: float = 0.5,
        lease_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        on_iteration: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self._parallel = parallel
        self._store = store
        self._publisher = publisher
        self._poll = poll_interval_s
        self._max_backoff = max_backoff_s
        self._max_tries = max_tries
        self._retry_base = retry_base_s
        self._lease_s = lease_s
        self._clock = clock
        self._wake = asyncio.Event()
        self._holder = f"relay-{uuid.uuid4().hex[:12]}"
        self._on_iteration = on_iteration or (lambda error: None)
        self.published = 0
        self.parked = 0

    def notify(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            # Stopping: hand the relay to another process now, not when the lease lapses.
            with contextlib.suppress(Exception):
                await self._store.release_lease("relay", self._holder)
            raise

    async def _run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                if not await self._store.hold_lease(
                    "relay", self._holder, now=self._clock(), ttl_s=self._lease_s
                ):
                    self._on_iteration(None)  # another process relays: stand by
                    await self._sleep(self._lease_s / 3)
                    continue
                progressed = await self.drain_once()
                failures = 0
                self._on_iteration(None)
            except Exception as exc:  # SNS or the store down: keep rows, back off
                failures += 1
                delay = backoff_s(failures, base=0.2, cap=self._max_backoff)
                log.warning("events.publish_failed", error=repr(exc), retry_in_s=delay)
                # SNS down does not make this process unfit to receive callbacks: only a
                # store it cannot reach turns the health checks red.
                self._on_iteration(None if isinstance(exc, PublishError) else exc)
                await asyncio.sleep(delay)
                continue
            if not progressed:
                await self._sleep(self._poll)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def drain_once(self) -> bool:
        """Publish rounds of pending events until none is due; True if any was sent.

        A round takes the oldest due event of up to ``10 * parallel`` distinct runs and
        publishes them as concurrent batches, each marked sent as soon as SNS took it (a
        relay killed mid-round publishes again only what was in flight). Before each
        round the relay lease is renewed; a relay that lost it (it was too slow) stops,
        so two never publish the same events. Raises PublishError when SNS or the network
        failed (nothing is counted against the messages).
        """
        pending = await self._store.pending_events(limit=2000)
        sent_any = False
        while True:
            now = self._clock()
            wave = next_batch(pending, now=now, limit=_BATCH * self._parallel)
            if not wave:
                return sent_any
            if not await self._store.hold_lease(
                "relay", self._holder, now=now, ttl_s=self._lease_s
            ):
                return sent_any
            sent, failed, transport = await self._publish_wave(wave)
            sent_any = sent_any or bool(sent)
            if failed:
                await self._record_failures(wave, failed)
            if transport is not None:  # what went through is marked; the rest waits
                raise transport
            done = set(sent) | set(failed)
            pending = [r for r in pending if r.seq not in done]
            if failed and not sent:
                return sent_any

    async def _publish_wave(
        self, wave: Sequence[OutboxRow]
    ) -> tuple[list[int], dict[int, tuple[str, bool]], BaseException | None]:
        """(sent and marked, failed messages, the error of SNS or the network that stopped
        a batch)."""
        entries: list[dict[str, Any]] = []
        failed: dict[int, tuple[str, bool]] = {}
        for row in wave:
            body = fit(row.body)
            if body is None:
                failed[row.seq] = ("event larger than SNS's 256 KiB limit", True)
                continue
            entries.append(self._publisher.entry(row.seq, row.run_id, body))
        answers = await asyncio.gather(
            *(self._publish_and_mark(batch) for batch in pack(entries)), return_exceptions=True
        )
        sent: list[int] = []
        transport: BaseException | None = None
        for answer in answers:
            if isinstance(answer, BaseException):
                transport = answer
                continue
            sent.extend(answer.sent)
            failed.update(answer.failed)
        return sent, failed, transport

    async def _publish_and_mark(self, batch: list[dict[str, Any]]) -> Published:
        published = await self._publish_batch(batch)
        if published.sent:
            await self._store.mark_sent(published.sent, now=self._clock())
            self.published += len(published.sent)
            EVENTS.labels("published").inc(len(published.sent))
        return published

    async def _publish_batch(self, batch: list[dict[str, Any]]) -> Published:
        try:
            return await self._publisher.publish(batch)
        except PublishError as exc:
            if not exc.sender_fault or len(batch) == 1:
                if exc.sender_fault:  # the one message is at fault
                    return Published([], {int(batch[0]["Id"]): (str(exc), True)})
                raise
        # The request was refused as a whole: find which message by sending each alone.
        sent: list[int] = []
        failed: dict[int, tuple[str, bool]] = {}
        for entry in batch:
            try:
                one = await self._publisher.publish([entry])
            except PublishError as exc:
                if not exc.sender_fault:
                    raise
                one = Published([], {int(entry["Id"]): (str(exc), True)})
            sent.extend(one.sent)
            failed.update(one.failed)
        return Published(sent, failed)

    async def _record_failures(
        self, wave: Sequence[OutboxRow], failed: Mapping[int, tuple[str, bool]]
    ) -> None:
        now = self._clock()
        rows = {row.seq: row for row in wave}
        retry_at: dict[int, float | None] = {}
        for seq, (error, sender_fault) in failed.items():
            tries = rows[seq].tries + 1
            oversized = error.startswith("event larger than")
            if oversized or (sender_fault and tries >= self._max_tries):
                retry_at[seq] = None
                self.parked += 1
                EVENTS.labels("parked").inc()
                log.error(
                    "events.parked",
                    seq=seq,
                    run_id=rows[seq].run_id,
                    event_type=rows[seq].body.get("type"),
                    tries=tries,
                    error=error,
                )
            else:
                retry_at[seq] = now + backoff_s(tries, base=self._retry_base, cap=self._max_backoff)
        await self._store.mark_failed(
            {seq: error for seq, (error, _) in failed.items()}, now=now, retry_at=retry_at
        )
        log.warning("events.entries_failed", count=len(failed))
