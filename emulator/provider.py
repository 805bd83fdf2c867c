"""The emulated provider: tasks, their lifecycle, outputs, and webhook deliveries.

A task moves created → processing → completed | failed over ``latency_s``. When
it ends, a webhook (if one was given) is POSTed, signed as WaveSpeed signs, and
redelivered with exponential backoff while the receiver does not answer 2xx. A task
deleted (``DELETE /api/v3/predictions/{id}``) stops where it is and reports
``deleted``; a task deleted while running still sends its webhook, now ``deleted``,
as a late callback from the real API may.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import secrets
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
import anyio.to_thread

from emulator import media
from emulator.faults import Faults
from emulator.rules import ModelRules, output_size

Status = Literal["created", "processing", "completed", "failed", "deleted"]
MAX_INPUT_IMAGE_BYTES = 32 * 1024 * 1024


@dataclass(slots=True)
class Task:
    id: str
    rules: ModelRules
    params: dict[str, Any]
    origin: str
    webhook: str | None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    status: Status = "created"
    outputs: list[str] = field(default_factory=list)
    error: str = ""
    inference_ms: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: Media paths of this task's outputs; their TTL starts when the task completes.
    paths: list[str] = field(default_factory=list)
    #: Emulator-clock instants, for latency measurements (submit arrived, task ended).
    submitted_mono: float = field(default_factory=time.monotonic)
    finished_mono: float | None = None
    #: Flagged as NSFW (a fault knob).
    nsfw: bool = False
    #: What runs the task (cancelled by a delete).
    runner: asyncio.Task[None] | None = field(default=None, repr=False)

    def prediction(self, *, with_input: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "model": self.rules.model_id,
            "outputs": list(self.outputs) if self.status == "completed" else [],
            "urls": {"get": f"{self.origin}/api/v3/predictions/{self.id}/result"},
            "has_nsfw_contents": [self.nsfw] * len(self.outputs),
            "status": self.status,
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
            "error": self.error,
            "timings": {"inference": self.inference_ms},
            "executionTime": self.inference_ms,
        }
        if with_input:
            data["input"] = self.params
            if self.params.get("seed", -1) == -1 and "seed" in self.rules.params:
                # A real provider picks a seed for -1 and reports the one it used.
                data["input"] = {**self.params, "seed": int(self.id[:8], 16) % 2_147_483_647}
        return data


@dataclass(slots=True)
class StoredFile:
    content_type: str
    expires_at: float | None
    data: bytes
    #: Served size. Past ``len(data)`` comes one MP4 ``free`` box of zeros, streamed,
    #: so a large output stays a valid file without being held in memory.
    padded_size: int = 0

    @property
    def size(self) -> int:
        return max(self.padded_size, len(self.data))


@dataclass(slots=True)
class Delivery:
    task_id: str
    webhook_id: str
    attempt: int
    status: int | None
    error: str = ""
    at: float = field(default_factory=time.monotonic)


class MediaStore:
    """Outputs by path, bounded in bytes (oldest evicted first) and by optional TTL."""

    def __init__(self, max_bytes: int) -> None:
        self._files: OrderedDict[str, StoredFile] = OrderedDict()
        self._bytes = 0
        self._max = max_bytes

    def put(self, path: str, stored: StoredFile) -> None:
        self._files[path] = stored
        self._bytes += len(stored.data)
        while self._bytes > self._max and len(self._files) > 1:
            _, old = self._files.popitem(last=False)
            self._bytes -= len(old.data)

    def expire(self, path: str, at: float) -> None:
        if (stored := self._files.get(path)) is not None:
            stored.expires_at = at

    def get(self, path: str, now: float) -> StoredFile | None:
        stored = self._files.get(path)
        if stored is not None and stored.expires_at is not None and now >= stored.expires_at:
            del self._files[path]
            self._bytes -= len(stored.data)
            return None
        return stored


def _padded(size: int, target: int | None) -> int:
    """At least ``target`` bytes, leaving room for a ``free`` box header if padding at all."""
    if target is None or target <= size:
        return size
    return max(target, size + 16)


def sign_v3(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    key = secret.removeprefix("whsec_").encode()
    content = f"{webhook_id}.{timestamp}.".encode() + body
    return "v3," + hmac.new(key, content, hashlib.sha256).hexdigest()


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


class Provider:
    """All emulator state. One instance per running emulator."""

    def __init__(self, faults: Faults, *, webhook_secret: str, max_media_bytes: int) -> None:
        self.faults = faults
        self.webhook_secret = webhook_secret
        self.tasks: dict[str, Task] = {}
        self.media = MediaStore(max_media_bytes)
        self.uploads: dict[str, StoredFile] = {}
        self.stats: Counter[str] = Counter()
        self.deliveries: list[Delivery] = []
        self.rng = random.Random(faults.rng_seed)
        self._background: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        #: The account's rate window (its number) and the submits counted in it.
        self._window = (-1, 0)
        self._slots = _Slots(faults.max_concurrent)

    # lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
        )

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def set_faults(self, faults: Faults) -> None:
        if faults.max_concurrent != self.faults.max_concurrent:
            self._slots.resize(faults.max_concurrent)
        self.faults = faults
        if faults.rng_seed is not None:
            self.rng = random.Random(faults.rng_seed)

    def reset(self) -> None:
        self.stats.clear()
        self.deliveries.clear()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Provider.start() was not called")
        return self._session

    def chance(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    # tasks -------------------------------------------------------------------

    def throttled(self) -> float | None:
        """Count a submit against the account's rate limit: None if it may go on, else the
        seconds until the window resets (a 429's Retry-After)."""
        limit, window = self.faults.rate_limit, self.faults.rate_window_s
        if limit is None:
            return None
        now = time.monotonic()
        number = int(now // window)
        current, count = self._window
        count = count + 1 if number == current else 1
        self._window = (number, count)
        if count > limit:
            self.stats["submits_throttled"] += 1
            return (number + 1) * window - now
        return None

    def create_task(
        self, rules: ModelRules, params: dict[str, Any], origin: str, webhook: str | None
    ) -> Task:
        task = Task(id=uuid.uuid4().hex, rules=rules, params=params, origin=origin, webhook=webhook)
        self.tasks[task.id] = task
        self.stats["submits"] += 1
        self.stats[f"submits:{rules.model_id}"] += 1
        task.runner = self.spawn(self._run(task))
        return task

    def delete_task(self, task: Task) -> None:
        """Stop ``task`` if it still runs and mark it ``deleted``; its outputs, if any,
        stay until they expire (as the real API keeps a completed task's files)."""
        self.stats["deletes"] += 1
        if task.status == "deleted":
            return
        running = task.status in ("created", "processing")
        if running and task.runner is not None:
            task.runner.cancel()
        task.status = "deleted"
        task.finished_mono = task.finished_mono or time.monotonic()
        task.done.set()
        if running:
            self.stats["tasks_deleted_running"] += 1
            if task.webhook is not None:
                self._schedule_webhook(task, task.webhook)

    async def _run(self, task: Task) -> None:
        async with self._slots:  # above the account's concurrency, tasks queue
            running = self._slots.running
            self.stats["max_running"] = max(self.stats["max_running"], running)
            await self._work(task)

    async def _work(self, task: Task) -> None:
        started = time.monotonic()
        latency = self.faults.latency_s
        await asyncio.sleep(latency * 0.25)
        task.status = "processing"
        try:
            outputs = await self._produce(task)
            await asyncio.sleep(max(0.0, latency - (time.monotonic() - started)))
            if self.chance(self.faults.failure_rate) or task.rules.model_id in (
                self.faults.fail_models
            ):
                raise TaskFailure(self.faults.failure_error)
        except TaskFailure as failure:
            task.status, task.error = "failed", str(failure)
            self.stats["tasks_failed"] += 1
        except Exception as exc:  # a real provider reports its own crashes as failed tasks
            task.status, task.error = "failed", f"5000: internal error: {type(exc).__name__}"
            self.stats["tasks_failed"] += 1
        else:
            task.outputs = outputs
            task.status = "completed"
            self.stats["tasks_completed"] += 1
            if self.faults.output_ttl_s is not None:
                expires = time.monotonic() + self.faults.output_ttl_s
                for path in task.paths:
                    self.media.expire(path, expires)
        task.inference_ms = int((time.monotonic() - started) * 1000)
        task.finished_mono = time.monotonic()
        task.done.set()
        if task.webhook is not None:
            self._schedule_webhook(task, task.webhook)

    async def _produce(self, task: Task) -> list[str]:
        params, rules = task.params, task.rules
        source = await self._fetch_input(params["image"]) if "image" in params else None
        material = media.digest(
            rules.model_id,
            params.get("prompt", ""),
            # A real provider draws a random seed for -1; the emulator keeps the same
            # request giving the same bytes so that tests and demos are reproducible.
            params.get("seed", -1),
            params.get("size"),
            params.get("width"),
            params.get("height"),
            hashlib.sha256(source or b"").digest(),
        )
        model = rules.model_id
        task.nsfw = model in self.faults.nsfw_models
        half = 2 if model in self.faults.wrong_size_models else 1
        if rules.kind == "image":
            width, height = output_size(params, "1024*1024")
            width, height = width // half, height // half
            fmt = params.get("output_format", "jpeg")
            data = await anyio.to_thread.run_sync(media.render_image, width, height, fmt, material)
            if params.get("enable_base64_output"):
                return [base64.b64encode(data).decode()]
            return [self._task_output(task, fmt, data)]
        if rules.kind == "video":
            width, height = output_size(params, "1280*720")
            width, height = width // half // 2 * 2, height // half // 2 * 2  # H.264: even
            duration = int(params.get("duration", 5))
            data = await anyio.to_thread.run_sync(
                media.render_video, width, height, duration, material, source
            )
            return [self._task_output(task, "mp4", data, padded_to=self.faults.large_output_bytes)]
        texture = await anyio.to_thread.run_sync(media.as_texture, source) if source else None
        data = await anyio.to_thread.run_sync(media.render_mesh, material, texture)
        return [self._task_output(task, "glb", data)]

    def _task_output(
        self, task: Task, fmt: str, data: bytes, *, padded_to: int | None = None
    ) -> str:
        if task.rules.model_id in self.faults.truncate_models:
            data = data[: len(data) * 6 // 10]
        url = self.store_output(task.origin, f"{task.id}/0", fmt, data, padded_to=padded_to)
        task.paths.append(f"{task.id}/0.{media.EXTENSIONS[fmt]}")
        return url

    def store_output(
        self, origin: str, stem: str, fmt: str, data: bytes, *, padded_to: int | None = None
    ) -> str:
        # Task outputs get their expiry when the task completes; synchronous ones now.
        ttl = self.faults.output_ttl_s
        path = f"{stem}.{media.EXTENSIONS[fmt]}"
        stored = StoredFile(
            content_type=media.CONTENT_TYPES[fmt],
            expires_at=time.monotonic() + ttl if ttl is not None else None,
            data=data,
            padded_size=_padded(len(data), padded_to),
        )
        self.media.put(path, stored)
        return f"{origin}/media/outputs/{path}"

    async def _fetch_input(self, url: str) -> bytes:
        """Download an input image as the provider would; failure is task error 1402."""
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                if resp.status != 200:
                    raise TaskFailure(f"1402: input media URL not fetchable: HTTP {resp.status}")
                body = b""
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_INPUT_IMAGE_BYTES:
                        break
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TaskFailure(f"1402: input media URL not fetchable: {type(exc).__name__}") from exc
        if len(body) > MAX_INPUT_IMAGE_BYTES:
            raise TaskFailure("1402: input media too large")
        if not body.startswith((b"\x89PNG", b"\xff\xd8", b"RIFF")):
            raise TaskFailure("1401: input media is not a PNG, JPEG or WebP image")
        return body

    # webhooks ----------------------------------------------------------------

    def _schedule_webhook(self, task: Task, url: str) -> None:
        faults = self.faults
        if self.chance(faults.drop_rate):
            self.stats["webhooks_dropped"] += 1
            return
        copies = 1 + (faults.duplicate_count if self.chance(faults.duplicate_rate) else 0)
        body = json.dumps(task.prediction(with_input=True), separators=(",", ":")).encode()
        webhook_id = f"msg_{uuid.uuid4().hex}"
        for copy in range(copies):
            copy_id = f"msg_{uuid.uuid4().hex}" if copy and faults.duplicate_new_id else webhook_id
            delay = faults.delivery_delay_s + self.rng.random() * faults.delivery_jitter_s
            _ = self.spawn(self._deliver(url, task.id, copy_id, body, delay))

    async def _deliver(
        self, url: str, task_id: str, webhook_id: str, body: bytes, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        faults = self.faults
        for attempt in range(faults.webhook_retries + 1):
            if attempt:
                await asyncio.sleep(faults.webhook_backoff_s * 2 ** (attempt - 1))
            timestamp = int(time.time())
            headers = {
                "content-type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign_v3(self.webhook_secret, webhook_id, timestamp, body),
                "user-agent": "wavechain-emulator",
            }
            self.stats["webhook_attempts"] += 1
            try:
                async with self.session.post(
                    url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=faults.webhook_timeout_s),
                ) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.deliveries.append(Delivery(task_id, webhook_id, attempt, None, repr(exc)))
                continue
            self.deliveries.append(Delivery(task_id, webhook_id, attempt, status))
            if 200 <= status < 300:
                self.stats["webhooks_delivered"] += 1
                return
        self.stats["webhooks_abandoned"] += 1


class _Slots:
    """Tasks running at once, up to a limit (None: no limit) that may change."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.running = 0
        self._freed = asyncio.Condition()

    def resize(self, limit: int | None) -> None:
        self.limit = limit

    async def __aenter__(self) -> None:
        async with self._freed:
            await self._freed.wait_for(lambda: self.limit is None or self.running < self.limit)
            self.running += 1

    async def __aexit__(self, *_: object) -> None:
        async with self._freed:
            self.running -= 1
            self._freed.notify_all()


class TaskFailure(Exception):
    """Ends a task with status ``failed`` and this message as its ``error``."""
