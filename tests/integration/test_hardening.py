"""The failure review's scenarios, over the real app, emulator, moto and PostgreSQL:
a database outage, unclear submit answers, unbounded requests, paging, secrets."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import pytest

from service import keys
from tests.conftest import EmulatorFactory
from tests.integration.conftest import WavechainFactory
from tests.support.postgres import Databases
from tests.support.proxy import FlakyProxy

FAST_RECONCILE = {"callback_timeout_s": 0.5, "reconcile_interval_s": 0.1}


async def _status(wc: Any, path: str) -> tuple[int, dict[str, Any]]:
    async with wc.http.get(f"{wc.base_url}{path}") as resp:
        return resp.status, await resp.json()


async def test_a_database_outage_turns_readiness_red_and_every_run_completes_after(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory, pg_databases: Databases
) -> None:
    """PostgreSQL unreachable (a cut TCP proxy) while runs are in flight: the workers keep
    trying, readiness and then liveness turn red and say which loops fail; when the
    database is back, readiness turns green again and every run completes, each stage
    submitted once."""
    url = await pg_databases.create()
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    proxy = FlakyProxy(parts.hostname, parts.port)
    await proxy.start()
    try:
        emulator = await make_emulator(latency_s=0.6, webhook_retries=10, webhook_backoff_s=0.5)
        wc = await make_wavechain(
            emulator,
            database_url=url.replace(f":{parts.port}/", f":{proxy.port}/"),
            liveness_failure_s=1.5,
            **FAST_RECONCILE,
        )
        assert (await _status(wc, "/readyz"))[0] == 200
        ids = [(await wc.create_run("image_video_3d"))["id"] for _ in range(4)]
        await asyncio.sleep(0.2)
        proxy.cut()
        red, dead = None, None
        deadline = time.monotonic() + 15
        while (red is None or dead is None) and time.monotonic() < deadline:
            status, body = await _status(wc, "/readyz")
            if status == 503 and red is None:
                red = body
            status, body = await _status(wc, "/healthz")
            if status == 503 and dead is None:
                dead = body
            await asyncio.sleep(0.1)
        assert red is not None and "workers" in red["loops"], red
        assert dead is not None and "workers" in dead["loops"], dead
        proxy.restore()
        for run_id in ids:
            assert (await wc.wait(run_id, limit_s=60))["status"] == "succeeded"
        deadline = time.monotonic() + 15  # each loop's next iteration goes well
        while (await _status(wc, "/readyz"))[0] != 200:
            assert time.monotonic() < deadline, await _status(wc, "/readyz")
            await asyncio.sleep(0.1)
        assert (await _status(wc, "/healthz"))[0] == 200
        tasks = await emulator.tasks()
        assert len(tasks) == 4 * 3  # one provider task per stage: nothing bought twice
    finally:
        await proxy.close()


@pytest.mark.parametrize("answer", ["malformed", "502", "504"])
async def test_an_unclear_submit_answer_is_settled_by_the_callback_not_bought_twice(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory, answer: str
) -> None:
    """Every submit creates its task but answers with a cut-off 200 or a gateway error:
    nothing is submitted again; the signed callback on each attempt's token names the
    task and the run completes, with one provider task per stage."""
    emulator = await make_emulator(
        latency_s=0.1, submit_unclear_rate=1.0, submit_unclear_answer=answer
    )
    wc = await make_wavechain(emulator, submit_backoff_s=0.05)
    run = await wc.wait((await wc.create_run("image_video_3d"))["id"], limit_s=30)
    assert run["status"] == "succeeded", run
    counters = await emulator.counters()
    assert counters["submits"] == 3 and counters["submits_unclear"] == 3
    tasks = await emulator.tasks()
    assert Counter(t["model"] for t in tasks) == {
        "wavespeed-ai/hunyuan-image-2.1": 1,
        "wavespeed-ai/hunyuan-video/i2v": 1,
        "wavespeed-ai/hunyuan3d/v2.1": 1,
    }
    assert {s["task_id"] for s in run["stages"]} == {t["id"] for t in tasks}
    assert all(s["attempt"] == 1 for s in run["stages"])


async def _post(wc: Any, body: bytes) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    async with wc.http.post(f"{wc.base_url}/v1/runs", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_unbounded_requests_get_clear_4xx_and_nothing_is_written(
    make_wavechain: WavechainFactory,
) -> None:
    """Too many stages (413, naming the limit), a body over MAX_SPEC_BYTES (413), JSON
    nested deeper than Python's stack (400, not a RecursionError's 500): each refused
    with a message, no run written; the server goes on serving."""
    wc = await make_wavechain(max_spec_bytes=64 * 1024)
    img = {"model": "wavespeed-ai/hunyuan-image-2.1", "input": {"prompt": "x"}}
    many = {"pipeline": {"stages": {f"s{i}": img for i in range(101)}}}
    status, body = await _post(wc, json.dumps(many).encode())
    assert status == 413 and "101 stages, over the limit of 100" in body["error"]
    big = {"pipeline": "image_video_3d", "inputs": {"prompt": "x" * 70_000}}
    status, body = await _post(wc, json.dumps(big).encode())
    assert status == 413 and "MAX_SPEC_BYTES" in body["error"]
    for deep in (b"[" * 50 + b"]" * 50, b'{"a":' * 20_000 + b"1" + b"}" * 20_000):
        status, body = await _post(wc, deep[: 60 * 1024] if len(deep) > 60 * 1024 else deep)
        assert status == 400, body
    chain = {"pipeline": {"stages": {f"s{i:03d}": {**img, "needs": [f"s{i + 1:03d}"]}
                                     for i in range(99)} | {"s099": img}}}  # fmt: skip
    status, body = await _post(wc, json.dumps(chain).encode())
    assert status == 201, body  # 100 stages in a chain named against their order: fine
    page = await wc.app[keys.STORE].list_runs(limit=10)
    assert len(page.runs) == 1


async def test_runs_are_listed_a_page_at_a_time_with_a_capped_limit(
    make_wavechain: WavechainFactory,
) -> None:
    """GET /v1/runs pages with next_cursor until null, newest first; a limit over the cap
    or a forged cursor is a 400 naming the parameter."""
    wc = await make_wavechain()
    spec = {"stages": {"a": {"model": "wavespeed-ai/hunyuan-image-2.1", "input": {"prompt": "x"}}}}
    made = [(await wc.create_run(spec))["id"] for _ in range(5)]
    seen: list[str] = []
    cursor = ""
    while True:
        async with wc.http.get(f"{wc.base_url}/v1/runs?limit=2&cursor={cursor}") as resp:
            body = await resp.json()
        assert resp.status == 200 and len(body["runs"]) <= 2
        seen += [r["id"] for r in body["runs"]]
        if body["next_cursor"] is None:
            break
        cursor = body["next_cursor"]
    assert seen == list(reversed(made))
    for query, named in (("limit=201", "limit"), ("limit=0", "limit"), ("cursor=zz", "cursor")):
        async with wc.http.get(f"{wc.base_url}/v1/runs?{query}") as resp:
            assert resp.status == 400 and named in (await resp.json())["error"]


async def test_a_rotated_provider_secret_is_fetched_again(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory
) -> None:
    """With the secret fetched from the provider (none configured), a rotation there is
    picked up by the periodic refresh: callbacks signed with the new secret apply."""
    emulator = await make_emulator(latency_s=0.05)
    wc = await make_wavechain(emulator, webhook_secret_refresh_s=0.2)  # fetched, not set
    first = (await wc.wait((await wc.create_run("image_video_3d"))["id"]))["status"]
    async with emulator.http.post(
        f"{emulator.base_url}/_emulator/webhook-secret", json={"secret": "whsec_cm90YXRlZA=="}
    ) as resp:
        assert resp.status == 200
    await asyncio.sleep(0.6)
    second = await wc.wait((await wc.create_run("image_video_3d"))["id"], limit_s=20)
    assert (first, second["status"]) == ("succeeded", "succeeded")
    secrets = wc.app[keys.WEBHOOK_SECRETS].current
    assert secrets[0].reveal() == "whsec_cm90YXRlZA=="
    assert (await emulator.counters()).get("result_polls", 0) == 0  # all by webhook
