"""The emulator's webhooks, received by a small aiohttp app and verified from PROVIDERS.md."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from pipelines import signing
from pipelines.errors import WebhookVerificationError
from pipelines.secrets import Secret
from tests.conftest import Emulator, EmulatorFactory

T2V = "wavespeed-ai/hunyuan-video/t2v"


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]


@dataclass
class Receiver:
    """Records every POST; answers the statuses queued in ``replies``, then 200."""

    url: str
    got: list[Received] = field(default_factory=list)
    replies: list[int] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, count: int, limit_s: float = 10) -> None:
        async with asyncio.timeout(limit_s):
            while len(self.got) < count:
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> Receiver:
    app = web.Application()
    state = Receiver(url="")

    async def hook(request: web.Request) -> web.Response:
        state.got.append(Received(await request.read(), dict(request.headers)))
        state.arrived.set()
        return web.Response(status=state.replies.pop(0) if state.replies else 200)

    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app, host="127.0.0.1")
    state.url = str(server.make_url("/hook"))
    return state


async def submit(emulator: Emulator, receiver: Receiver, **params: Any) -> dict[str, Any]:
    async with emulator.http.post(
        f"{emulator.base_url}/api/v3/{T2V}",
        params={"webhook": receiver.url},
        json={"prompt": "a kite", **params},
    ) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = (await resp.json())["data"]
        return data


def verify(delivery: Received, secret: str) -> signing.VerifiedDelivery:
    return signing.verify(delivery.body, delivery.headers, [Secret(secret)], now=time.time())


async def test_completion_webhook_is_signed_v3(emulator: Emulator, receiver: Receiver) -> None:
    """The completion POST carries the bare prediction and a v3 signature that verifies."""
    task = await submit(emulator, receiver)
    await receiver.wait_for(1)
    (delivery,) = receiver.got
    verified = verify(delivery, emulator.secret)
    assert delivery.headers["webhook-signature"].startswith("v3,")
    assert abs(verified.timestamp - time.time()) < 5
    body = json.loads(delivery.body)
    assert "code" not in body and "data" not in body
    assert body["id"] == task["id"] and body["status"] == "completed"
    assert body["model"] == T2V and body["outputs"][0].endswith(".mp4")
    assert body["input"]["prompt"] == "a kite" and "executionTime" in body


async def test_tampered_body_and_wrong_secret_fail(emulator: Emulator, receiver: Receiver) -> None:
    """The real delivery verifies; the same with one byte changed, or another secret, does not."""
    await submit(emulator, receiver)
    await receiver.wait_for(1)
    (delivery,) = receiver.got
    verify(delivery, emulator.secret)
    tampered = Received(
        delivery.body.replace(b"completed", b"failed\x20\x20\x20"), delivery.headers
    )
    with pytest.raises(WebhookVerificationError, match="bad_signature"):
        verify(tampered, emulator.secret)
    with pytest.raises(WebhookVerificationError, match="bad_signature"):
        verify(delivery, "whsec_c29tZW9uZS1lbHNlcw==")


async def test_failed_task_is_delivered(make_emulator: EmulatorFactory, receiver: Receiver) -> None:
    """A failed task is delivered too, with status failed and the error."""
    emulator = await make_emulator(failure_rate=1.0, failure_error="1200: content moderation")
    await submit(emulator, receiver)
    await receiver.wait_for(1)
    body = json.loads(receiver.got[0].body)
    assert body["status"] == "failed" and body["error"] == "1200: content moderation"
    assert body["outputs"] == []


async def test_non_2xx_is_retried_with_backoff(
    make_emulator: EmulatorFactory, receiver: Receiver
) -> None:
    """Two 500s then a 200: three attempts, same webhook-id, growing gaps."""
    emulator = await make_emulator(webhook_backoff_s=0.1)
    receiver.replies = [500, 503]
    await submit(emulator, receiver)
    await receiver.wait_for(3)
    ids = {d.headers["webhook-id"] for d in receiver.got}
    assert len(ids) == 1
    log = await emulator.deliveries()
    assert [d["attempt"] for d in log] == [0, 1, 2]
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(log)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2
    assert (await emulator.counters())["webhooks_delivered"] == 1


async def test_retries_are_bounded(make_emulator: EmulatorFactory, receiver: Receiver) -> None:
    """A receiver that never answers 2xx gets 1 + webhook_retries attempts, then none."""
    emulator = await make_emulator(webhook_retries=3, webhook_backoff_s=0.02)
    receiver.replies = [500] * 10
    task = await submit(emulator, receiver)
    await receiver.wait_for(4)
    await asyncio.sleep(0.5)
    assert len(receiver.got) == 4
    assert (await emulator.counters())["webhooks_abandoned"] == 1
    async with emulator.http.get(task["urls"]["get"]) as resp:
        assert (await resp.json())["data"]["status"] == "completed"


async def test_duplicates_same_and_new_id(
    make_emulator: EmulatorFactory, receiver: Receiver
) -> None:
    """duplicate_rate=1 sends extra copies; by default they reuse the webhook-id."""
    emulator = await make_emulator(duplicate_rate=1.0, duplicate_count=2)
    await submit(emulator, receiver)
    await receiver.wait_for(3)
    assert len({d.headers["webhook-id"] for d in receiver.got}) == 1
    assert len({d.body for d in receiver.got}) == 1

    await emulator.set_faults(duplicate_new_id=True)
    await submit(emulator, receiver)
    await receiver.wait_for(6)
    assert len({d.headers["webhook-id"] for d in receiver.got[3:]}) == 3


async def test_dropped_delivery_still_pollable(
    make_emulator: EmulatorFactory, receiver: Receiver
) -> None:
    """drop_rate=1 sends nothing, yet the task completes and its result can be polled."""
    emulator = await make_emulator(drop_rate=1.0)
    task = await submit(emulator, receiver)
    await asyncio.sleep(0.4)
    assert receiver.got == []
    async with emulator.http.get(task["urls"]["get"]) as resp:
        assert (await resp.json())["data"]["status"] == "completed"
    assert (await emulator.counters())["webhooks_dropped"] == 1


async def test_jitter_reorders_deliveries(
    make_emulator: EmulatorFactory, receiver: Receiver
) -> None:
    """With delivery jitter, callbacks arrive in another order than the tasks were submitted."""
    emulator = await make_emulator(latency_s=0.0, delivery_jitter_s=0.5, rng_seed=3)
    submitted = [(await submit(emulator, receiver))["id"] for _ in range(8)]
    await receiver.wait_for(8)
    arrived = [json.loads(d.body)["id"] for d in receiver.got]
    assert sorted(arrived) == sorted(submitted) and arrived != submitted


async def test_base64_with_webhook_is_rejected(emulator: Emulator, receiver: Receiver) -> None:
    """enable_base64_output cannot be combined with a webhook: 400, no task."""
    async with emulator.http.post(
        f"{emulator.base_url}/api/v3/wavespeed-ai/hunyuan-image-2.1",
        params={"webhook": receiver.url},
        json={"prompt": "x", "enable_base64_output": True},
    ) as resp:
        body = await resp.json()
    assert resp.status == 400 and "does not support base64" in body["message"]
    assert (await emulator.stats())["tasks"] == {}


@pytest.mark.parametrize("hook", ["ftp://x/hook", "not a url", "/relative"])
async def test_bad_webhook_url_is_rejected(emulator: Emulator, hook: str) -> None:
    """A webhook that is not an absolute http(s) URL is a 400 naming it."""
    async with emulator.http.post(
        f"{emulator.base_url}/api/v3/{T2V}", params={"webhook": hook}, json={"prompt": "x"}
    ) as resp:
        assert resp.status == 400 and "webhook" in (await resp.json())["message"]


async def test_an_account_level_throttles_over_its_rate_and_queues_over_its_concurrency(
    make_emulator: EmulatorFactory, receiver: Receiver
) -> None:
    """Over the rate (a fixed window) a submit is a 429 with Retry-After, as the real API
    answers; over the concurrency, tasks wait in `created` and run one after another."""
    window = 2.0
    emulator = await make_emulator(
        rate_limit=2, rate_window_s=window, max_concurrent=1, latency_s=0.3
    )
    # The emulator runs in this process: start right after one of its windows begins.
    await asyncio.sleep(window - time.monotonic() % window + 0.05)
    answers = []
    for _ in range(3):
        async with emulator.http.post(
            f"{emulator.base_url}/api/v3/{T2V}",
            params={"webhook": receiver.url},
            json={"prompt": "a kite"},
        ) as resp:
            answers.append((resp.status, resp.headers.get("Retry-After")))
    assert answers == [(200, None), (200, None), (429, "2")]
    assert sorted(t["status"] for t in await emulator.tasks()) == ["created", "created"]
    await receiver.wait_for(2)
    counters = await emulator.counters()
    assert counters["max_running"] == 1 and counters["submits_throttled"] == 1
    await asyncio.sleep(window - time.monotonic() % window + 0.05)  # the next window
    assert (await submit(emulator, receiver))["status"] == "created"
