"""Every seed parameter rule: a violating value gets a 400 naming field and rule, and no task."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Emulator

IMG = "wavespeed-ai/hunyuan-image-2.1"
I2V = "wavespeed-ai/hunyuan-video/i2v"
T2V = "wavespeed-ai/hunyuan-video/t2v"
MESH = "wavespeed-ai/hunyuan3d/v2.1"
AIML = "hunyuan/hunyuan-image-v3-text-to-image"
URL = "http://127.0.0.1:9/x.png"

VALID: dict[str, dict[str, Any]] = {
    IMG: {"prompt": "p"},
    I2V: {"image": URL},
    T2V: {"prompt": "p"},
    MESH: {"image": URL},
    AIML: {"model": AIML, "prompt": "p"},
}

# (model, change to a valid body, field named in the message, rule fragment)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    (IMG, {"prompt": None}, "prompt", "is required"),
    (IMG, {"prompt": 42}, "prompt", "must be a string"),
    (IMG, {"size": "1024x1024"}, "size", "WIDTH*HEIGHT"),
    (IMG, {"size": "255*512"}, "size", "256..1536"),
    (IMG, {"size": "512*1537"}, "size", "256..1536"),
    (IMG, {"size": 1024}, "size", "must be a string"),
    (IMG, {"width": 255, "height": 512}, "width", "256..1536"),
    (IMG, {"width": 512, "height": 1537}, "height", "256..1536"),
    (IMG, {"width": 512}, "width", "together"),
    (IMG, {"seed": -2}, "seed", "-1..2147483647"),
    (IMG, {"seed": 2147483648}, "seed", "-1..2147483647"),
    (IMG, {"seed": "5"}, "seed", "must be an integer"),
    (IMG, {"seed": 1.5}, "seed", "must be an integer"),
    (IMG, {"seed": True}, "seed", "must be an integer"),
    (IMG, {"output_format": "gif"}, "output_format", "jpeg, png, webp"),
    (IMG, {"enable_sync_mode": "yes"}, "enable_sync_mode", "must be a boolean"),
    (IMG, {"enable_base64_output": 1}, "enable_base64_output", "must be a boolean"),
    (I2V, {"image": None}, "image", "is required"),
    (I2V, {"image": "file:///etc/passwd"}, "image", "http(s) URL"),
    (I2V, {"prompt": 7}, "prompt", "must be a string"),
    (I2V, {"num_inference_steps": 0}, "num_inference_steps", "1..30"),
    (I2V, {"num_inference_steps": 31}, "num_inference_steps", "1..30"),
    (I2V, {"duration": 4}, "duration", "5..10"),
    (I2V, {"duration": 11}, "duration", "5..10"),
    (I2V, {"duration": "5"}, "duration", "must be an integer"),
    (I2V, {"seed": -2}, "seed", "-1..2147483647"),
    (I2V, {"size": "1024*1024"}, "size", "1280*720, 720*1280"),
    (I2V, {"enable_safety_checker": "true"}, "enable_safety_checker", "must be a boolean"),
    (T2V, {"prompt": None}, "prompt", "is required"),
    (T2V, {"size": "1920*1080"}, "size", "1280*720, 720*1280"),
    (T2V, {"seed": 2147483648}, "seed", "-1..2147483647"),
    (T2V, {"num_inference_steps": 1}, "num_inference_steps", "2..30"),
    (T2V, {"num_inference_steps": 31}, "num_inference_steps", "2..30"),
    (MESH, {"image": None}, "image", "is required"),
    (MESH, {"image": 12}, "image", "must be a string"),
    (AIML, {"model": "other/model"}, "model", "must be one of"),
    (AIML, {"prompt": None}, "prompt", "is required"),
    (AIML, {"prompt": "x" * 4001}, "prompt", "at most 4000"),
    (AIML, {"num_images": 0}, "num_images", "1..4"),
    (AIML, {"num_images": 5}, "num_images", "1..4"),
    (AIML, {"num_images": 1.5}, "num_images", "must be an integer"),
    (AIML, {"seed": 0}, "seed", ">= 1"),
    (AIML, {"image_size": "huge"}, "image_size", "square_hd"),
    (AIML, {"image_size": {"width": 512}}, "image_size.height", "is required"),
    (AIML, {"image_size": 5}, "image_size", "preset name or an object"),
    (AIML, {"num_inference_steps": 0}, "num_inference_steps", "1..50"),
    (AIML, {"num_inference_steps": 51}, "num_inference_steps", "1..50"),
    (AIML, {"guidance_scale": 0.5}, "guidance_scale", "1..20"),
    (AIML, {"guidance_scale": 21}, "guidance_scale", "1..20"),
    (AIML, {"enable_safety_checker": "no"}, "enable_safety_checker", "must be a boolean"),
    (AIML, {"sync_mode": 1}, "sync_mode", "must be a boolean"),
    (AIML, {"output_format": "webp"}, "output_format", "jpeg, png"),
    (AIML, {"negative_prompt": 3}, "negative_prompt", "must be a string"),
    (AIML, {"enable_prompt_expansion": "y"}, "enable_prompt_expansion", "must be a boolean"),
]


def _path(model: str) -> str:
    return "/v1/images/generations" if model == AIML else f"/api/v3/{model}"


@pytest.mark.parametrize(
    ("model", "change", "field", "rule"),
    CASES,
    ids=[f"{m.rsplit('/', 1)[-1]}-{f}-{i}" for i, (m, _, f, _) in enumerate(CASES)],
)
async def test_violation_is_clear_400_and_creates_nothing(
    emulator: Emulator, model: str, change: dict[str, Any], field: str, rule: str
) -> None:
    """The 400 names the field and the rule; no task is created, nothing is charged."""
    body = {k: v for k, v in {**VALID[model], **change}.items() if v is not None}
    async with emulator.http.post(emulator.base_url + _path(model), json=body) as resp:
        payload = await resp.json()
    assert resp.status == 400
    message = payload["message"]
    assert f"'{field}'" in message and rule in message
    stats = await emulator.stats()
    assert stats["tasks"] == {} and "submits" not in stats["counters"]


@pytest.mark.parametrize("model", [IMG, I2V, T2V, MESH, AIML])
async def test_valid_bodies_are_accepted(emulator: Emulator, model: str) -> None:
    """The baseline bodies the violations start from are themselves valid."""
    async with emulator.http.post(emulator.base_url + _path(model), json=VALID[model]) as resp:
        assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"x"'])
async def test_non_object_body_is_400(emulator: Emulator, raw: bytes) -> None:
    """A body that is not a JSON object is a 400 naming the body."""
    async with emulator.http.post(
        f"{emulator.base_url}/api/v3/{T2V}", data=raw, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400 and "body" in (await resp.json())["message"]


async def test_fault_endpoint_refuses_bad_values(emulator: Emulator) -> None:
    """PUT /_emulator/faults with a bad value is a 400 naming it; nothing changes."""
    before = await emulator.set_faults()
    async with emulator.http.put(
        f"{emulator.base_url}/_emulator/faults", json={"latency_s": 1, "drop_rate": 2}
    ) as resp:
        assert resp.status == 400 and "drop_rate" in (await resp.json())["error"]
    assert await emulator.set_faults() == before
