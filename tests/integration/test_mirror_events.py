"""Outputs mirrored to S3 and lifecycle events on SNS, against a real local endpoint over HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
from collections import Counter, defaultdict
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import pytest
from aiohttp import web
from PIL import Image

from pipelines.mirror import (
    MirrorConfig,
    MirrorRejectedError,
    MirrorSourceError,
    S3Mirror,
    mirror_session,
)
from service import keys
from service.aws import make_clients
from service.settings import Settings
from tests.conftest import EmulatorFactory
from tests.integration.conftest import Wavechain, WavechainFactory
from tests.support.aws import AwsSandbox
from tests.support.proxy import FlakyProxy

T2V = "wavespeed-ai/hunyuan-video/t2v"


def aws_settings(aws: AwsSandbox, endpoint: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "s3_bucket": aws.bucket,
        "s3_prefix": "media/",
        "aws_endpoint_url": endpoint or aws.endpoint,
        "sns_topic_arn": aws.topic_arn,
        **extra,
    }


def stages_of(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in run["stages"]}


async def test_outputs_land_in_s3_with_type_and_metadata(
    make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    """Every output is in the bucket under runs/{run}/{stage}/{n}.{ext}, byte for byte."""
    wc = await make_wavechain(**aws_settings(aws))
    run = await wc.wait((await wc.create_run("image_video_3d"))["id"])
    assert run["status"] == "succeeded"
    objects = aws.objects()
    expected = {
        f"media/runs/{run['id']}/image/0.png": "image/png",
        f"media/runs/{run['id']}/video/0.mp4": "video/mp4",
        f"media/runs/{run['id']}/mesh/0.glb": "model/gltf-binary",
    }
    manifests = {f"{key}.json": "application/json" for key in expected}  # provenance
    assert {k: v["ContentType"] for k, v in objects.items()} == expected | manifests
    stages = stages_of(run)
    for name, stage in stages.items():
        (uri,) = stage["outputs"]
        key = uri.removeprefix(f"s3://{aws.bucket}/")
        _, _, provider_bytes = await wc.emulator.fetch(stage["provider_outputs"][0])
        stored = aws.s3.get_object(Bucket=aws.bucket, Key=key)["Body"].read()
        assert stored == provider_bytes
        meta = objects[key]["Metadata"]
        assert meta == {
            "run-id": run["id"], "stage": name, "model": stage["model"],
            "task-id": stage["task_id"],
        }  # fmt: skip
        assert aws.sha256_tag(key) == hashlib.sha256(stored).hexdigest()


async def test_downstream_gets_presigned_url_of_mirror(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    """The i2v stage is fed our copy (presigned), so it works after the provider deletes it.

    Timeline: the image's provider copy lives 0.3 s; we mirror it within milliseconds; the
    i2v task fetches its input 0.5 s after submit, when the provider's copy is gone.
    """
    emulator = await make_emulator(latency_s=2.0, output_ttl_s=0.3)
    wc = await make_wavechain(emulator, **aws_settings(aws))
    run = await wc.wait((await wc.create_run("image_video_3d"))["id"])
    assert run["status"] == "succeeded", run
    stages = stages_of(run)
    (task,) = [t for t in await emulator.tasks() if t["id"] == stages["video"]["task_id"]]
    fed = task["input"]["image"]
    assert fed.startswith(aws.endpoint) and "X-Amz-Signature=" in fed
    assert urlsplit(fed).path.endswith(f"/media/runs/{run['id']}/image/0.png")
    assert (await emulator.fetch(stages["image"]["provider_outputs"][0]))[0] == 404


async def test_provider_urls_mode(make_wavechain: WavechainFactory, aws: AwsSandbox) -> None:
    """DOWNSTREAM_URLS=provider passes the provider's own URL downstream instead."""
    wc = await make_wavechain(**aws_settings(aws, downstream_urls="provider"))
    run = await wc.wait((await wc.create_run("image_video_3d"))["id"])
    stages = stages_of(run)
    (task,) = [t for t in await wc.emulator.tasks() if t["id"] == stages["video"]["task_id"]]
    assert task["input"]["image"] == stages["image"]["provider_outputs"][0]


async def test_events_reach_subscribed_queue(
    make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    """A subscribed queue gets every lifecycle event, envelope and attributes as specified."""
    filtered = aws.subscribe({"event_type": ["stage.succeeded"]})
    wc = await make_wavechain(**aws_settings(aws))
    run = await wc.wait((await wc.create_run("image_video_3d"))["id"])
    await _until_published(wc, run["id"])
    got = aws.receive()
    types = Counter(m["body"]["type"] for m in got)
    assert types == {
        "run.started": 1,
        "stage.submitted": 3,
        "stage.succeeded": 3,
        "run.succeeded": 1,
    }
    assert len({m["body"]["id"] for m in got}) == len(got)
    (image_done,) = [
        m for m in got if m["body"]["type"] == "stage.succeeded" and m["body"]["stage"] == "image"
    ]
    body = image_done["body"]
    assert body["version"] == 1 and body["run_id"] == run["id"]
    assert (
        body["pipeline"] == "image_video_3d" and body["model"] == "wavespeed-ai/hunyuan-image-2.1"
    )
    assert body["status"] == "succeeded" and body["task_id"] == stages_of(run)["image"]["task_id"]
    assert body["outputs"] == [f"s3://{aws.bucket}/media/runs/{run['id']}/image/0.png"]
    assert body["error"] is None and body["time"]
    assert image_done["attributes"] == {
        "event_type": "stage.succeeded", "pipeline": "image_video_3d", "run_id": run["id"],
        "stage": "image", "model": "wavespeed-ai/hunyuan-image-2.1", "status": "succeeded",
    }  # fmt: skip
    only = aws.receive(filtered)
    assert sorted(m["body"]["stage"] for m in only) == ["image", "mesh", "video"]
    assert {m["body"]["type"] for m in only} == {"stage.succeeded"}


async def _until_published(wc: Wavechain, run_id: str, limit_s: float = 20) -> None:
    store = wc.app[keys.STORE]
    async with asyncio.timeout(limit_s):
        while any(r.run_id == run_id for r in await store.pending_events(limit=1000)):
            await asyncio.sleep(0.05)


async def test_failed_stage_event_carries_error(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    """stage.failed and run.failed carry the provider's error."""
    emulator = await make_emulator(fail_models=[T2V], failure_error="5000: boom")
    wc = await make_wavechain(emulator, **aws_settings(aws))
    spec = {"stages": {"clip": {"model": T2V, "input": {"prompt": "x"}}}}
    run = await wc.wait((await wc.create_run(spec))["id"])
    await _until_published(wc, run["id"])
    by_type = {m["body"]["type"]: m["body"] for m in aws.receive()}
    assert by_type["stage.failed"]["error"] == "5000: boom"
    assert "5000: boom" in by_type["run.failed"]["error"]
    assert aws.objects() == {}


async def test_output_over_size_cap_fails_stage(
    make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    """An output larger than MIRROR_MAX_BYTES fails the stage with a clear error."""
    wc = await make_wavechain(**aws_settings(aws, mirror_max_bytes=10_000))
    spec = {"stages": {"clip": {"model": T2V, "input": {"prompt": "x"}}}}
    run = await wc.wait((await wc.create_run(spec))["id"])
    assert run["status"] == "failed"
    assert "cap" in run["stages"][0]["error"] and aws.objects() == {}


# The mirror on its own -----------------------------------------------------------------


@pytest.fixture
async def mirror(aws: AwsSandbox):
    s3 = make_clients(Settings(aws_endpoint_url=aws.endpoint)).s3  # configured as in `serve`
    sessions: list[aiohttp.ClientSession] = []

    def make(**config: Any) -> S3Mirror:
        defaults = {"allowed_hosts": ("127.0.0.1",), "allow_loopback": True}
        cfg = MirrorConfig(bucket=aws.bucket, **{**defaults, **config})
        session = mirror_session(allow_loopback=cfg.allow_loopback)  # as `serve` pairs them
        sessions.append(session)
        return S3Mirror(s3, session, cfg, limiter=anyio.CapacityLimiter(4))

    yield make
    for session in sessions:
        await session.close()


async def test_mirror_is_idempotent(
    mirror: Any, make_emulator: EmulatorFactory, aws: AwsSandbox
) -> None:
    """Copying the same task's output twice leaves one object and downloads once."""
    emulator = await make_emulator()
    async with emulator.http.post(
        f"{emulator.base_url}/api/v3/wavespeed-ai/hunyuan-image-2.1",
        json={"prompt": "x", "enable_sync_mode": True},
    ) as resp:
        url = (await resp.json())["data"]["outputs"][0]
    m = mirror()
    meta = {"run-id": "r", "stage": "s", "model": "m", "task-id": "t1"}
    first = await m.copy(url, stem="runs/r/s/0", metadata=meta)
    second = await m.copy(url, stem="runs/r/s/0", metadata=meta)
    assert not first.reused and second.reused and first.sha256 == second.sha256
    assert list(aws.objects()) == ["runs/r/s/0.jpeg"]
    assert (await emulator.counters())["media_downloads"] == 1
    # A job's first try skips the lookup (nothing can be there yet): it copies again.
    third = await m.copy(url, stem="runs/r/s/0", metadata=meta, first_try=True)
    assert not third.reused and third.sha256 == first.sha256
    assert (await emulator.counters())["media_downloads"] == 2


async def test_mirror_refuses_other_hosts_and_schemes(mirror: Any) -> None:
    """Only allowed hosts and http(s): anything else is a permanent, named refusal."""
    m = mirror(allowed_hosts=("*.wavespeed.ai",))
    with pytest.raises(
        MirrorRejectedError, match=r"host '127\.0\.0\.1' is not in MIRROR_ALLOWED_HOSTS"
    ):
        await m.copy("http://127.0.0.1:9/x.png", stem="a/0", metadata={"task-id": "t"})
    with pytest.raises(MirrorRejectedError, match="neither an http"):
        await m.copy("file:///etc/passwd", stem="a/0", metadata={"task-id": "t"})


async def test_mirror_decodes_base64(mirror: Any, aws: AwsSandbox) -> None:
    """Inline base64 outputs are decoded and stored like downloads, type sniffed."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    encoded = base64.b64encode(buf.getvalue()).decode()
    for source in (encoded, "data:image/png;base64," + encoded):
        got = await mirror().copy(source, stem="b/0", metadata={"task-id": source[-6:]})
        stored = aws.s3.get_object(Bucket=aws.bucket, Key=got.key)
        assert got.key == "b/0.png" and stored["ContentType"] == "image/png"
        assert stored["Body"].read() == buf.getvalue()


async def _large_output(make_emulator: EmulatorFactory, size: int) -> tuple[str, bytes]:
    emulator = await make_emulator(large_output_bytes=size)
    async with emulator.http.post(
        f"{emulator.base_url}/api/v3/{T2V}", json={"prompt": "x", "enable_sync_mode": True}
    ) as resp:
        url = (await resp.json())["data"]["outputs"][0]
    _, _, body = await emulator.fetch(url)
    return url, body


@pytest.mark.parametrize("single_put_max", [0, 64 * 1024 * 1024], ids=["multipart", "one-put"])
async def test_large_output_streams_up(
    mirror: Any, make_emulator: EmulatorFactory, aws: AwsSandbox, single_put_max: int
) -> None:
    """A 20 MiB output, as 5 MiB parts or one streamed PutObject: bytes, type, sha256 tag."""
    url, body = await _large_output(make_emulator, 20 * 1024 * 1024)
    m = mirror(part_size=5 * 1024 * 1024, single_put_max=single_put_max)
    got = await m.copy(url, stem="c/0", metadata={"task-id": "t"})
    head = aws.s3.head_object(Bucket=aws.bucket, Key="c/0.mp4")
    assert got.size == len(body) == head["ContentLength"]
    assert got.sha256 == aws.sha256_tag("c/0.mp4") == hashlib.sha256(body).hexdigest()
    assert aws.s3.get_object(Bucket=aws.bucket, Key="c/0.mp4")["Body"].read() == body
    assert head["ContentType"] == "video/mp4" and head["Metadata"] == {"task-id": "t"}
    multipart = head["ETag"].strip('"').endswith("-4")
    assert multipart == (single_put_max == 0)
    assert aws.s3.list_multipart_uploads(Bucket=aws.bucket).get("Uploads", []) == []
    again = await m.copy(url, stem="c/0", metadata={"task-id": "t"})
    assert again.reused and again.sha256 == got.sha256


async def test_source_ending_early_fails_the_streamed_put(mirror: Any, aws: AwsSandbox) -> None:
    """A download cut short mid-stream fails the copy (retryable) and stores nothing."""
    declared, sent = 20 * 1024 * 1024, 6 * 1024 * 1024

    async def cut_short(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        resp.content_length = declared
        await resp.prepare(request)
        await resp.write(b"\0" * sent)
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_get("/out.mp4", cut_short)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with pytest.raises((aiohttp.ClientPayloadError, MirrorSourceError)) as caught:
            await mirror().copy(
                f"http://127.0.0.1:{port}/out.mp4", stem="d/0", metadata={"task-id": "t"}
            )
        assert not isinstance(caught.value, MirrorRejectedError)  # worth retrying
    finally:
        await runner.cleanup()
    assert aws.objects() == {}


# Faults ----------------------------------------------------------------------------------


@pytest.fixture
async def flaky_aws(aws: AwsSandbox):
    host, port = urlsplit(aws.endpoint).hostname, urlsplit(aws.endpoint).port
    assert host and port
    proxy = FlakyProxy(host, port)
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_s3_outage_during_mirror_is_retried(
    make_wavechain: WavechainFactory, aws: AwsSandbox, flaky_aws: FlakyProxy
) -> None:
    """S3 unreachable: the mirror job is retried; the stage completes once S3 returns."""
    wc = await make_wavechain(**aws_settings(aws, endpoint=flaky_aws.url))
    flaky_aws.cut()
    run_id = (await wc.create_run({"stages": {"clip": {"model": T2V, "input": {"prompt": "x"}}}}))[
        "id"
    ]
    await asyncio.sleep(2.5)
    run = await wc.get_run(run_id)
    assert run["status"] == "running" and run["stages"][0]["status"] == "processing"
    assert flaky_aws.refused > 0
    flaky_aws.restore()
    run = await wc.wait(run_id, limit_s=30)
    assert run["status"] == "succeeded"
    key = f"media/runs/{run_id}/clip/0.mp4"
    assert list(aws.objects()) == [key, f"{key}.json"]


async def test_sns_outage_keeps_events_until_it_returns(
    make_wavechain: WavechainFactory, aws: AwsSandbox, flaky_aws: FlakyProxy
) -> None:
    """SNS unreachable: runs still finish, events wait, then all arrive in order, once each."""
    # No bucket: mirroring is off, so only SNS sits behind the cut proxy.
    wc = await make_wavechain(aws_endpoint_url=flaky_aws.url, sns_topic_arn=aws.topic_arn)
    flaky_aws.cut()
    ids = [(await wc.create_run("image_video_3d"))["id"] for _ in range(2)]
    for run_id in ids:
        assert (await wc.wait(run_id))["status"] == "succeeded"
    store = wc.app[keys.STORE]
    assert len(await store.pending_events(limit=1000)) == 16
    flaky_aws.restore()
    for run_id in ids:
        await _until_published(wc, run_id, limit_s=40)
    got = aws.receive()
    per_run: dict[str, list[str]] = defaultdict(list)
    for m in got:
        per_run[m["body"]["run_id"]].append(m["body"]["id"])
    assert len(got) == 16 and len({m["body"]["id"] for m in got}) == 16
    for run_id in ids:
        stored = [e["id"] for e in await store.outbox(run_id)]
        assert per_run[run_id] == stored  # published in the order they were written


async def test_an_oversized_event_and_a_refused_batch_are_parked_and_the_rest_go_once(
    make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    """An event over SNS's 256 KiB limit is parked at once; an event whose batch SNS
    refuses as a whole is isolated, retried alone and parked after EVENT_MAX_TRIES; each
    run's later events still go out, and every other event is published exactly once
    (no batch is published again because another failed)."""
    import sqlite3
    import time as _time

    from tests.support.sns_gate import SnsGate

    gate = SnsGate(aws.endpoint, marker="BOOM-BATCH")
    await gate.start()
    try:
        wc = await make_wavechain(
            aws_endpoint_url=gate.url, sns_topic_arn=aws.topic_arn,
            event_max_tries=3, event_retry_base_s=0.05,
        )  # fmt: skip
        path = wc.app[keys.SETTINGS].database_url.removeprefix("sqlite:///")

        def event(run_id: str, n: int, **extra: Any) -> tuple[str, str, str, str, float]:
            body = {"version": 1, "id": f"evt_{run_id}_{n}", "type": "stage.succeeded",
                    "run_id": run_id, "status": "succeeded", **extra}  # fmt: skip
            return (body["id"], run_id, "stage.succeeded", json.dumps(body), _time.time())

        with sqlite3.connect(path, timeout=30) as conn:
            conn.executemany(
                "INSERT INTO outbox (event_id, run_id, type, body, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    event("run_x", 1, note="x" * 300_000),  # over 256 KiB whatever is cut
                    event("run_y", 1, note="BOOM-BATCH"),  # refused with its whole batch
                    event("run_x", 2),
                    event("run_y", 2),
                ],
            )
        ids = [(await wc.create_run("image_video_3d"))["id"] for _ in range(3)]
        for run_id in ids:
            assert (await wc.wait(run_id))["status"] == "succeeded"
        store = wc.app[keys.STORE]
        async with asyncio.timeout(30):
            while await store.pending_events(limit=100):
                wc.app[keys.RELAY].notify()
                await asyncio.sleep(0.1)
        parked = {p["body"]["id"]: p for p in await store.parked_events()}
        assert set(parked) == {"evt_run_x_1", "evt_run_y_1"}
        assert "256 KiB" in parked["evt_run_x_1"]["error"]
        assert "BatchRequestTooLong" in parked["evt_run_y_1"]["error"]
        assert parked["evt_run_y_1"]["tries"] == 3
        received = Counter(m["body"]["id"] for m in aws.receive())
        stored = {e["id"] for e in await store.outbox()} - set(parked)
        assert set(received) == stored and set(received.values()) == {1}
        assert {"evt_run_x_2", "evt_run_y_2"} <= set(received)
        assert gate.counts["refused"] >= 3
    finally:
        await gate.close()


async def test_compressed_outputs_are_stored_as_served_and_counted(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    """The provider's CDN serves outputs gzip-compressed (a 9 MiB video, Content-Length
    the compressed size): they are stored as served, with their Content-Encoding and the
    digest of the stored bytes, under a 2 MiB cap that counts the bytes downloaded."""
    emulator = await make_emulator(output_encoding="gzip", large_output_bytes=9 * 1024 * 1024)
    wc = await make_wavechain(emulator, mirror_max_bytes=2 * 1024 * 1024, **aws_settings(aws))
    spec = {"stages": {"clip": {"model": T2V, "input": {"prompt": "x"}}}}
    run = await wc.wait((await wc.create_run(spec))["id"], limit_s=60)
    assert run["status"] == "succeeded", run
    key, manifest = aws.objects()
    assert manifest == f"{key}.json"
    head = aws.objects()[key]
    assert head["ContentEncoding"] == "gzip" and head["ContentType"] == "video/mp4"
    stored = aws.s3.get_object(Bucket=aws.bucket, Key=key)["Body"].read()
    url = run["stages"][0]["provider_outputs"][0]
    async with aiohttp.ClientSession(auto_decompress=False) as raw, raw.get(url) as resp:
        served = await resp.read()
    assert stored == served and len(served) < 2 * 1024 * 1024
    assert aws.sha256_tag(key) == hashlib.sha256(served).hexdigest()
    import gzip

    assert len(gzip.decompress(stored)) >= 9 * 1024 * 1024  # the whole video is in there


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("169.254.169.254", "link-local"),
        ("10.1.2.3", "private"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("localhost", "loopback"),
        ("127.0.0.1", "loopback"),
    ],
)
async def test_outputs_from_private_addresses_are_refused(
    mirror: Any, aws: AwsSandbox, host: str, why: str
) -> None:
    """An output URL on the allow-list that names, or resolves to, a private, loopback or
    link-local address (cloud metadata) is refused without a request, as a permanent
    failure; loopback only when no local endpoint is configured."""
    m = mirror(allowed_hosts=("*",), allow_loopback=False)
    with pytest.raises(MirrorRejectedError, match=why):
        await m.copy(f"http://{host}:9/latest/x.png", stem="p/0", metadata={"task-id": "t"})
    assert aws.objects() == {}


async def test_a_redirect_into_a_private_address_is_refused(mirror: Any, aws: AwsSandbox) -> None:
    """An allowed host redirecting to the metadata address (or to a name resolving there)
    is refused at that hop."""

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    app = web.Application()
    app.router.add_get("/out.png", hop)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        m = mirror(allowed_hosts=("*",), allow_loopback=True)  # the first hop is local
        for target in ("http://169.254.169.254/latest/meta-data", "http://10.0.0.7/x.png"):
            with pytest.raises(MirrorRejectedError, match=r"link-local|private"):
                await m.copy(
                    f"http://127.0.0.1:{port}/out.png?to={target}",
                    stem="r/0",
                    metadata={"task-id": "t"},
                )
    finally:
        await runner.cleanup()
    assert aws.objects() == {}
