"""The official wavespeed SDK cannot tell the emulator from the real API.

Each test drives a real emulator on loopback with ``wavespeed.Client`` and checks
that what comes back really is what it claims to be.
"""

from __future__ import annotations

import asyncio
import base64
import io
import tempfile
from typing import Any

import pytest
import wavespeed
from PIL import Image

from tests.conftest import API_KEY, Emulator, EmulatorFactory
from tests.support.formats import parse_glb, parse_mp4

IMAGE = "wavespeed-ai/hunyuan-image-2.1"
I2V = "wavespeed-ai/hunyuan-video/i2v"
T2V = "wavespeed-ai/hunyuan-video/t2v"
MESH = "wavespeed-ai/hunyuan3d/v2.1"


def client(emulator: Emulator) -> Any:
    return wavespeed.Client(api_key=API_KEY, base_url=emulator.base_url, max_retries=0)


async def sdk_run(emulator: Emulator, model: str, params: dict[str, Any], **kw: Any) -> list[str]:
    kw.setdefault("poll_interval", 0.02)
    kw.setdefault("timeout", 30)
    result = await asyncio.to_thread(client(emulator).run, model, params, **kw)
    outputs: list[str] = result["outputs"]
    return outputs


async def image_url(emulator: Emulator, **params: Any) -> str:
    (url,) = await sdk_run(emulator, IMAGE, {"prompt": "a lighthouse at dusk", **params})
    return url


@pytest.mark.parametrize(
    ("fmt", "pil_format", "ctype"),
    [("jpeg", "JPEG", "image/jpeg"), ("png", "PNG", "image/png"), ("webp", "WEBP", "image/webp")],
)
async def test_image_21_output_is_real_image(
    emulator: Emulator, fmt: str, pil_format: str, ctype: str
) -> None:
    """hunyuan-image-2.1 yields one image of the requested size and format."""
    url = await image_url(emulator, size="640*384", output_format=fmt, seed=7)
    status, content_type, body = await emulator.fetch(url)
    assert status == 200 and content_type == ctype
    assert url.endswith(f".{fmt}")
    image = Image.open(io.BytesIO(body))
    assert image.format == pil_format
    assert image.size == (640, 384)


async def test_image_21_default_size_and_width_height_form(emulator: Emulator) -> None:
    """Without a size the image is 1024*1024; the newer width/height form is honoured too."""
    _, _, body = await emulator.fetch(await image_url(emulator))
    assert Image.open(io.BytesIO(body)).size == (1024, 1024)
    _, _, body = await emulator.fetch(await image_url(emulator, width=300, height=1500))
    assert Image.open(io.BytesIO(body)).size == (300, 1500)


@pytest.mark.parametrize(("size", "duration"), [("1280*720", 5), ("720*1280", 10)])
async def test_i2v_output_is_mp4_of_requested_size_and_duration(
    emulator: Emulator, size: str, duration: int
) -> None:
    """hunyuan-video/i2v turns an image URL into an MP4 as long as ``duration``."""
    source = await image_url(emulator)
    (url,) = await sdk_run(
        emulator, I2V, {"image": source, "prompt": "waves", "size": size, "duration": duration}
    )
    status, content_type, body = await emulator.fetch(url)
    assert status == 200 and content_type == "video/mp4"
    info = parse_mp4(body)
    assert info.top_level[0] == b"ftyp" and b"moov" in info.top_level and b"mdat" in info.top_level
    width, height = (int(v) for v in size.split("*"))
    assert (info.width, info.height) == (width, height)
    assert info.duration_s == pytest.approx(duration, abs=0.01)
    assert info.sample_count >= duration


async def test_t2v_output_is_mp4(emulator: Emulator) -> None:
    """hunyuan-video/t2v needs only a prompt; the default is 1280*720 and 5 s."""
    (url,) = await sdk_run(emulator, T2V, {"prompt": "a red kite over hills"})
    _, content_type, body = await emulator.fetch(url)
    info = parse_mp4(body)
    assert content_type == "video/mp4"
    assert (info.width, info.height) == (1280, 720)
    assert info.duration_s == pytest.approx(5, abs=0.01)


async def test_3d_output_is_glb_embedding_input_image(emulator: Emulator) -> None:
    """hunyuan3d/v2.1 yields a binary glTF 2.0 whose JSON chunk describes a textured mesh."""
    source = await image_url(emulator, output_format="png")
    (url,) = await sdk_run(emulator, MESH, {"image": source})
    assert url.endswith(".glb")
    _, content_type, body = await emulator.fetch(url)
    assert content_type == "model/gltf-binary"
    glb = parse_glb(body)
    assert glb.version == 2 and glb.length == len(body)
    doc = glb.document
    assert doc["asset"]["version"] == "2.0"
    assert doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"] == 0
    assert doc["images"][0]["mimeType"] == "image/png"
    assert glb.bin_length >= sum(v["byteLength"] for v in doc["bufferViews"])


async def test_same_request_same_bytes(emulator: Emulator) -> None:
    """Outputs derive from prompt and seed: same request, same bytes; other seed, other bytes."""
    first = (await emulator.fetch(await image_url(emulator, seed=42)))[2]
    again = (await emulator.fetch(await image_url(emulator, seed=42)))[2]
    other = (await emulator.fetch(await image_url(emulator, seed=43)))[2]
    assert first == again and first != other


async def test_get_result_follows_lifecycle(make_emulator: EmulatorFactory) -> None:
    """A task is created, then processing, then completed, as get_result() observes."""
    emulator = await make_emulator(latency_s=0.6)
    sdk = client(emulator)
    task_id, _ = await asyncio.to_thread(sdk._submit, T2V, {"prompt": "x"})
    seen: list[str] = []
    for _ in range(100):
        data = (await asyncio.to_thread(sdk.get_result, task_id))["data"]
        if not seen or seen[-1] != data["status"]:
            seen.append(data["status"])
        if data["status"] == "completed":
            break
        await asyncio.sleep(0.05)
    assert seen == ["created", "processing", "completed"]
    assert data["urls"]["get"].endswith(f"/api/v3/predictions/{task_id}/result")
    assert data["has_nsfw_contents"] == [False] and data["timings"]["inference"] > 0


async def test_sync_mode_returns_outputs_in_one_request(emulator: Emulator) -> None:
    """enable_sync_mode answers with the finished outputs and needs no result poll."""
    outputs = await sdk_run(emulator, IMAGE, {"prompt": "x"}, enable_sync_mode=True)
    assert len(outputs) == 1
    assert (await emulator.counters()).get("result_polls", 0) == 0


async def test_sync_mode_timeout_is_reported_and_task_finishes(
    make_emulator: EmulatorFactory,
) -> None:
    """A sync request that outlives sync_timeout_s says so; the task still completes."""
    emulator = await make_emulator(latency_s=0.5, sync_timeout_s=0.1)
    with pytest.raises(RuntimeError, match="Sync mode timed out"):
        await sdk_run(emulator, IMAGE, {"prompt": "x"}, enable_sync_mode=True)
    await asyncio.sleep(0.6)
    assert (await emulator.stats())["tasks"] == {"completed": 1}


async def test_base64_output_is_bare_base64(emulator: Emulator) -> None:
    """enable_base64_output returns the image itself as base64 without a data: prefix."""
    (out,) = await sdk_run(
        emulator,
        IMAGE,
        {"prompt": "x", "enable_base64_output": True, "size": "256*300", "output_format": "png"},
        enable_sync_mode=True,
    )
    assert not out.startswith("data:")
    image = Image.open(io.BytesIO(base64.b64decode(out, validate=True)))
    assert image.format == "PNG" and image.size == (256, 300)


async def test_failed_task_surfaces_provider_error(make_emulator: EmulatorFactory) -> None:
    """With failure_rate=1 the SDK sees status failed and the task's error text."""
    emulator = await make_emulator(failure_rate=1.0, failure_error="5003: model unavailable")
    with pytest.raises(RuntimeError, match="5003: model unavailable"):
        await sdk_run(emulator, T2V, {"prompt": "x"})


async def test_unfetchable_input_image_fails_task_with_1402(emulator: Emulator) -> None:
    """An i2v input URL that cannot be downloaded ends the task failed with code 1402."""
    missing = f"{emulator.base_url}/media/outputs/nope/0.jpeg"
    with pytest.raises(RuntimeError, match="1402"):
        await sdk_run(emulator, I2V, {"image": missing})


async def test_throttled_submit_is_not_resent(make_emulator: EmulatorFactory) -> None:
    """A 429 on submit reaches the SDK with Retry-After; no task is created."""
    emulator = await make_emulator(submit_error_rate=1.0, retry_after_s=7)
    with pytest.raises(RuntimeError, match="HTTP 429"):
        await sdk_run(emulator, T2V, {"prompt": "x"})
    async with emulator.http.post(
        f"{emulator.base_url}/api/v3/{T2V}", json={"prompt": "x"}
    ) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "7"
    stats = await emulator.stats()
    assert stats["tasks"] == {} and stats["counters"]["submits_refused"] == 2


async def test_5xx_on_submit(make_emulator: EmulatorFactory) -> None:
    """submit_error_status=503 yields a 503 in the WaveSpeed envelope."""
    emulator = await make_emulator(submit_error_rate=1.0, submit_error_status=503)
    async with emulator.http.post(f"{emulator.base_url}/api/v3/{T2V}", json={"prompt": "x"}) as r:
        assert r.status == 503 and (await r.json())["code"] == 503


async def test_upload_then_use_as_i2v_input(emulator: Emulator) -> None:
    """client.upload() works against the emulator, and the upload feeds a model."""
    buf = io.BytesIO()
    Image.new("RGB", (320, 200), (10, 200, 30)).save(buf, format="PNG")
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        f.write(buf.getvalue())
        f.flush()
        url = await asyncio.to_thread(client(emulator).upload, f.name)
    status, _, body = await emulator.fetch(url)
    assert status == 200 and body == buf.getvalue()
    (video,) = await sdk_run(emulator, I2V, {"image": url, "duration": 5})
    assert parse_mp4((await emulator.fetch(video))[2]).duration_s == pytest.approx(5, abs=0.01)


async def test_outputs_expire_after_ttl(make_emulator: EmulatorFactory) -> None:
    """With output_ttl_s the provider deletes outputs, as WaveSpeed does after 7 days."""
    emulator = await make_emulator(output_ttl_s=0.3)
    url = await image_url(emulator)
    assert (await emulator.fetch(url))[0] == 200
    await asyncio.sleep(0.4)
    assert (await emulator.fetch(url))[0] == 404


async def test_large_output_is_streamed_valid_mp4(make_emulator: EmulatorFactory) -> None:
    """large_output_bytes pads a video to that size with a free box; it still parses."""
    size = 40 * 1024 * 1024 + 3
    emulator = await make_emulator(large_output_bytes=size)
    (url,) = await sdk_run(emulator, T2V, {"prompt": "x"})
    _, _, body = await emulator.fetch(url)
    assert len(body) == size
    info = parse_mp4(body)
    assert info.top_level[-1] == b"free" and info.duration_s == pytest.approx(5, abs=0.01)


async def test_missing_key_is_401_in_envelope(emulator: Emulator) -> None:
    """No Bearer key: 401 in the {code, message, data} envelope, for submit and result."""
    for method, path in [("POST", f"/api/v3/{T2V}"), ("GET", "/api/v3/predictions/x/result")]:
        async with emulator.http.request(
            method, emulator.base_url + path, headers={"Authorization": ""}, json={}
        ) as resp:
            body = await resp.json()
        assert resp.status == 401 and body["code"] == 401 and "API key" in body["message"]


async def test_unknown_model_and_task_are_404(emulator: Emulator) -> None:
    """An unknown model id or prediction id is a 404 that names it."""
    async with emulator.http.post(f"{emulator.base_url}/api/v3/acme/nope", json={}) as resp:
        assert resp.status == 404 and "acme/nope" in (await resp.json())["message"]
    async with emulator.http.get(f"{emulator.base_url}/api/v3/predictions/zzz/result") as resp:
        assert resp.status == 404


async def test_webhook_secret_endpoint(emulator: Emulator) -> None:
    """GET /api/v3/webhook/secret returns the signing secret under data.secret."""
    async with emulator.http.get(f"{emulator.base_url}/api/v3/webhook/secret") as resp:
        body = await resp.json()
    assert body["data"]["secret"] == emulator.secret


# AI/ML API ------------------------------------------------------------------------------

AIML = "hunyuan/hunyuan-image-v3-text-to-image"


async def aiml(emulator: Emulator, **params: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": AIML, "prompt": "a T-Rex on a beach", **params}
    async with emulator.http.post(f"{emulator.base_url}/v1/images/generations", json=body) as r:
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [
        ("landscape_16_9", (1280, 768)),
        (None, (1024, 1024)),
        ({"width": 640, "height": 480}, (640, 480)),
    ],
)
async def test_aimlapi_sync_generation(
    emulator: Emulator, image_size: Any, expected: tuple[int, int]
) -> None:
    """The AI/ML API answers synchronously with image URLs of the requested size (png default)."""
    params = {"image_size": image_size} if image_size is not None else {}
    status, body = await aiml(emulator, num_images=2, **params)
    assert status == 200 and len(body["data"]) == 2 and body["meta"]["usage"]["credits_used"] > 0
    for item in body["data"]:
        _, ctype, data = await emulator.fetch(item["url"])
        image = Image.open(io.BytesIO(data))
        assert ctype == "image/png" and image.format == "PNG" and image.size == expected


async def test_aimlapi_b64_json(emulator: Emulator) -> None:
    """sync_mode returns the images inline as b64_json."""
    status, body = await aiml(emulator, sync_mode=True, output_format="jpeg")
    assert status == 200
    image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert image.format == "JPEG"


async def test_aimlapi_error_shape(emulator: Emulator) -> None:
    """Errors carry message, path, requestId, statusCode and timestamp."""
    status, body = await aiml(emulator, num_images=5)
    assert status == 400
    assert set(body) == {"message", "path", "requestId", "statusCode", "timestamp"}
    assert "num_images" in body["message"] and body["path"] == "/v1/images/generations"
    async with emulator.http.post(
        f"{emulator.base_url}/v1/images/generations", json={}, headers={"Authorization": ""}
    ) as r:
        assert r.status == 401 and (await r.json())["statusCode"] == 401
