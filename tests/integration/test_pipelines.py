"""Pipelines end to end: the real server and the emulator over loopback, webhooks only."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections import Counter
from typing import Any

import pytest

from pipelines import signing
from service import keys
from tests.conftest import TEST_SECRET, EmulatorFactory
from tests.integration.conftest import Wavechain, WavechainFactory

IMG = "wavespeed-ai/hunyuan-image-2.1"
I2V = "wavespeed-ai/hunyuan-video/i2v"
T2V = "wavespeed-ai/hunyuan-video/t2v"
MESH = "wavespeed-ai/hunyuan3d/v2.1"
AIML = "hunyuan/hunyuan-image-v3-text-to-image"

CHAIN = {
    "name": "chain",
    "stages": {
        "image": {"model": IMG, "input": {"prompt": "a fox", "size": "512*512"}},
        "video": {"model": I2V, "input": {"image": "${stages.image.outputs[0]}"}},
        "mesh": {
            "model": MESH,
            "input": {"image": "${stages.image.outputs[0]}"},
            "needs": ["video"],
        },
    },
}
FAN_IN = {
    "name": "fan_in",
    "stages": {
        "a": {"model": IMG, "input": {"prompt": "left", "size": "256*256"}},
        "b": {"model": T2V, "input": {"prompt": "right"}},
        "c": {"model": AIML, "input": {"prompt": "middle", "image_size": "square"}},
        "joined": {
            "model": MESH,
            "input": {"image": "${stages.c.outputs[0]}"},
            "needs": ["a", "b"],
        },
    },
}


def by_name(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in run["stages"]}


async def events(wc: Wavechain, run_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = await wc.app[keys.STORE].outbox(run_id)
    return rows


async def test_chain_with_zero_polls(make_wavechain: WavechainFactory) -> None:
    """image → i2v → 3D completes on webhooks alone; every submit is one request."""
    wc = await make_wavechain()
    run = await wc.wait((await wc.create_run(CHAIN))["id"])
    stages = by_name(run)
    assert run["status"] == "succeeded"
    assert stages["video"]["outputs"][0].endswith(".mp4")
    assert stages["mesh"]["outputs"][0].endswith(".glb")
    # The chain really waited: each stage was submitted after its upstream finished.
    assert stages["video"]["timings"]["submitted_at"] >= stages["image"]["timings"]["finished_at"]
    assert stages["mesh"]["timings"]["submitted_at"] >= stages["video"]["timings"]["finished_at"]
    counters = await wc.emulator.counters()
    assert counters.get("result_polls", 0) == 0
    assert counters["submits"] == 3 and counters["webhooks_delivered"] == 3
    types = [e["type"] for e in await events(wc, run["id"])]
    assert types[0] == "run.started" and types[-1] == "run.succeeded"
    assert types.count("stage.submitted") == 3 and types.count("stage.succeeded") == 3


async def test_fan_out_example(make_wavechain: WavechainFactory) -> None:
    """The bundled image_video_3d example: one image feeds both video and mesh."""
    wc = await make_wavechain()
    run = await wc.wait((await wc.create_run("image_video_3d"))["id"])
    stages = by_name(run)
    assert run["status"] == "succeeded"
    image_done = stages["image"]["timings"]["finished_at"]
    assert stages["video"]["timings"]["submitted_at"] >= image_done
    assert stages["mesh"]["timings"]["submitted_at"] >= image_done
    tasks = {t["id"]: t for t in await wc.emulator.tasks()}
    image_url = stages["image"]["outputs"][0]
    assert tasks[stages["video"]["task_id"]]["input"]["image"] == image_url
    assert tasks[stages["mesh"]["task_id"]]["input"]["image"] == image_url


async def test_fan_in_across_providers(make_wavechain: WavechainFactory) -> None:
    """A stage needing three upstreams (one on the synchronous AI/ML API) runs after all."""
    wc = await make_wavechain()
    run = await wc.wait((await wc.create_run(FAN_IN))["id"])
    stages = by_name(run)
    assert run["status"] == "succeeded", run
    joined = stages["joined"]["timings"]["submitted_at"]
    assert all(stages[n]["timings"]["finished_at"] <= joined for n in ("a", "b", "c"))
    tasks = {t["id"]: t for t in await wc.emulator.tasks()}
    assert tasks[stages["joined"]["task_id"]]["input"]["image"] == stages["c"]["outputs"][0]


async def test_storyboard_example_uses_t2v_and_image3(make_wavechain: WavechainFactory) -> None:
    """The second example runs t2v and Hunyuan Image 3 side by side, then 3D from keyframe 2."""
    wc = await make_wavechain()
    run = await wc.wait((await wc.create_run("storyboard"))["id"])
    stages = by_name(run)
    assert run["status"] == "succeeded"
    assert len(stages["keyframes"]["outputs"]) == 2
    tasks = {t["id"]: t for t in await wc.emulator.tasks()}
    assert tasks[stages["prop"]["task_id"]]["input"]["image"] == stages["keyframes"]["outputs"][1]


@pytest.mark.parametrize("new_id", [False, True])
async def test_duplicates_and_reordering_give_one_transition_per_stage(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory, new_id: bool
) -> None:
    """Every webhook sent 4 times (same or new webhook-id), jittered: one transition each."""
    emulator = await make_emulator(
        latency_s=0.0, duplicate_rate=1.0, duplicate_count=3, duplicate_new_id=new_id,
        delivery_jitter_s=0.15, rng_seed=7,
    )  # fmt: skip
    wc = await make_wavechain(emulator)
    ids = [(await wc.create_run("image_video_3d"))["id"] for _ in range(4)]
    for run_id in ids:
        assert (await wc.wait(run_id))["status"] == "succeeded"
    await asyncio.sleep(0.4)  # let the last copies land
    store = wc.app[keys.STORE]
    for run_id in ids:
        types = Counter(e["type"] for e in await events(wc, run_id))
        assert types["stage.succeeded"] == 3 and types["run.succeeded"] == 1
        effects = Counter(d["effect"] for d in await store.deliveries(run_id))
        assert effects["applied"] == 3
        if new_id:
            assert effects["no_effect"] == 9  # new ids: recorded, caught by the state machine
        else:
            assert effects["no_effect"] == 0  # same id: caught by the delivery key
    assert (await emulator.counters())["webhooks_delivered"] == 4 * 3 * 4


async def test_provider_failure_fails_stage_and_run(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory
) -> None:
    """A failed task fails its stage with the provider's error, and the run fails."""
    emulator = await make_emulator(fail_models=[I2V], failure_error="5000: GPU on fire")
    wc = await make_wavechain(emulator)
    run = await wc.wait((await wc.create_run(CHAIN))["id"])
    stages = by_name(run)
    assert run["status"] == "failed"
    assert stages["video"]["status"] == "failed" and stages["video"]["error"] == "5000: GPU on fire"
    assert stages["mesh"]["status"] == "cancelled" and stages["mesh"]["task_id"] is None
    assert (await emulator.counters())["submits"] == 2
    types = [e["type"] for e in await events(wc, run["id"])]
    assert types[-2:] == ["stage.failed", "run.failed"]


async def test_retry_policy_resubmits_then_gives_up(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory
) -> None:
    """retry.attempts=3 on a failing stage: three submits with new tokens, then failed."""
    emulator = await make_emulator(fail_models=[T2V], failure_error="5003: busy")
    wc = await make_wavechain(emulator)
    spec = {"stages": {"v": {"model": T2V, "input": {"prompt": "x"},
                             "retry": {"attempts": 3, "backoff": 0.05}}}}  # fmt: skip
    run = await wc.wait((await wc.create_run(spec))["id"])
    assert run["status"] == "failed" and run["stages"][0]["attempt"] == 3
    hooks = {t["webhook"] for t in await emulator.tasks()}
    assert len(hooks) == 3  # every attempt had its own token


async def test_non_retryable_error_is_not_retried(make_wavechain: WavechainFactory) -> None:
    """An input the provider cannot fetch (1402) fails at once despite a retry policy."""
    wc = await make_wavechain()
    missing = f"{wc.emulator.base_url}/media/outputs/none/0.png"
    spec = {"stages": {"v": {"model": MESH, "input": {"image": missing}, "retry": 3}}}
    run = await wc.wait((await wc.create_run(spec))["id"])
    assert run["status"] == "failed" and "1402" in run["stages"][0]["error"]
    assert (await wc.emulator.counters())["submits"] == 1


@pytest.mark.parametrize(
    ("pipeline", "inputs", "fragment"),
    [
        ("image_video_3d", {"seed": -7}, "stage 'image': input.seed: must be in range"),
        ("image_video_3d", {"seed": "7"}, "inputs.seed: must be an integer"),
        ("image_video_3d", {"colour": "red"}, "inputs.colour: not declared"),
        ({"stages": {"a": {"model": I2V, "input": {"image": "x", "duration": 30}}}}, {},
         "input.duration: must be in range 5..10"),
        ({"stages": {"a": {"model": "acme/x"}}}, {}, "unknown model"),
        ("no_such_pipeline", {}, "unknown pipeline 'no_such_pipeline'"),
    ],
)  # fmt: skip
async def test_invalid_run_is_refused_before_any_request(
    make_wavechain: WavechainFactory, pipeline: Any, inputs: dict[str, Any], fragment: str
) -> None:
    """Bad parameters get a 400 naming them; the provider sees no request; no run is stored."""
    wc = await make_wavechain()
    async with wc.http.post(
        f"{wc.base_url}/v1/runs", json={"pipeline": pipeline, "inputs": inputs}
    ) as resp:
        body = await resp.json()
    assert resp.status == 400 and fragment in body["error"], body
    await asyncio.sleep(0.2)
    assert (await wc.emulator.counters()).get("submits", 0) == 0
    assert (await wc.app[keys.STORE].list_runs()).runs == []


async def test_submit_throttling_is_retried(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory
) -> None:
    """429 on submit is retried no sooner than Retry-After; the run completes once it clears."""
    emulator = await make_emulator(submit_error_rate=1.0, retry_after_s=2)
    wc = await make_wavechain(emulator)
    run_id = (await wc.create_run({"stages": {"v": {"model": T2V, "input": {"prompt": "x"}}}}))[
        "id"
    ]
    await asyncio.sleep(1.0)
    assert (await emulator.counters())["submits_refused"] == 1  # Retry-After: 2 honoured
    await asyncio.sleep(1.5)
    assert (await emulator.counters())["submits_refused"] == 2
    await emulator.set_faults(submit_error_rate=0.0)
    run = await wc.wait(run_id)
    assert run["status"] == "succeeded" and (await emulator.counters())["submits"] == 1


# forged and broken callbacks -----------------------------------------------------------


async def _silent_run(make_emulator: EmulatorFactory, make_wavechain: WavechainFactory):
    """A run whose only task completed but whose webhook was dropped."""
    emulator = await make_emulator(drop_rate=1.0)
    wc = await make_wavechain(emulator)
    run_id = (await wc.create_run({"stages": {"v": {"model": T2V, "input": {"prompt": "x"}}}}))[
        "id"
    ]
    async with asyncio.timeout(10):
        while not (tasks := await emulator.tasks()) or tasks[0]["status"] != "completed":
            await asyncio.sleep(0.02)
    task = tasks[0]
    hook = task.pop("webhook")
    body = json.dumps(task).encode()
    return wc, run_id, hook, body


async def post(wc: Wavechain, url: str, body: bytes, headers: dict[str, str]) -> int:
    async with wc.http.post(url, data=io.BytesIO(body), headers=headers) as resp:
        return resp.status


@pytest.mark.parametrize(
    "forgery", ["tampered", "stale", "future", "unsigned", "wrong_secret", "wrong_scheme"]
)
async def test_forged_callbacks_get_401_and_change_nothing(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory, forgery: str
) -> None:
    """Bad signatures and timestamps are 401; the stage stays submitted; nothing recorded."""
    wc, run_id, hook, body = await _silent_run(make_emulator, make_wavechain)
    now = int(time.time())
    ts = {"stale": now - 301, "future": now + 301}.get(forgery, now)
    secret = "whsec_b3RoZXItc2VjcmV0" if forgery == "wrong_secret" else TEST_SECRET
    scheme = signing.STANDARD_V1 if forgery == "wrong_scheme" else signing.WAVESPEED_V3
    headers = signing.sign(body, secret=secret, webhook_id="msg_x", timestamp=ts, scheme=scheme)
    sent = body.replace(b'"completed"', b'"failed"') if forgery == "tampered" else body
    if forgery == "unsigned":
        headers = {}
    assert await post(wc, hook, sent, headers) == 401
    run = await wc.get_run(run_id)
    assert run["stages"][0]["status"] == "submitted"
    assert await wc.app[keys.STORE].deliveries(run_id) == []
    # The genuine article still works afterwards.
    good = signing.sign(body, secret=TEST_SECRET, webhook_id="msg_ok", timestamp=now)
    assert await post(wc, hook, body, good) == 200
    assert (await wc.wait(run_id))["status"] == "succeeded"


async def test_malformed_unknown_and_oversized(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory
) -> None:
    """Signed but malformed: 400. Unknown token: 404. Over the cap: 413. Other task: 409."""
    wc, run_id, hook, body = await _silent_run(make_emulator, make_wavechain)
    now = int(time.time())

    def signed(data: bytes, wid: str) -> dict[str, str]:
        return signing.sign(data, secret=TEST_SECRET, webhook_id=wid, timestamp=now)

    assert await post(wc, hook, b"{not json", signed(b"{not json", "m1")) == 400
    shape = b'{"id": 5, "status": "completed"}'
    assert await post(wc, hook, shape, signed(shape, "m2")) == 400
    unknown = hook.rsplit("/", 1)[0] + "/" + "x" * 43
    assert await post(wc, unknown, body, signed(body, "m3")) == 404
    big = b" " * (1024 * 1024 + 1)
    assert await post(wc, hook, big, signed(big, "m4")) == 413
    other = body.replace(json.loads(body)["id"].encode(), b"another-task")
    assert await post(wc, hook, other, signed(other, "m5")) == 409
    assert (await wc.get_run(run_id))["stages"][0]["status"] == "submitted"


async def test_cancel_then_late_callback(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory
) -> None:
    """Cancel stops the run; the late callback is recorded with no effect; re-cancel is 409."""
    emulator = await make_emulator(delivery_delay_s=0.3)
    wc = await make_wavechain(emulator)
    run_id = (await wc.create_run(CHAIN))["id"]
    async with asyncio.timeout(5):
        while (await wc.get_run(run_id))["stages"][0]["status"] != "submitted":
            await asyncio.sleep(0.01)
    async with wc.http.post(f"{wc.base_url}/v1/runs/{run_id}/cancel") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    store = wc.app[keys.STORE]
    async with asyncio.timeout(10):  # the late callback arrives about 0.3 s later
        while not (deliveries := await store.deliveries(run_id)):
            await asyncio.sleep(0.05)
    run = await wc.get_run(run_id)
    assert run["status"] == "cancelled" and {s["status"] for s in run["stages"]} == {"cancelled"}
    assert [d["effect"] for d in deliveries] == ["no_effect"]
    assert (await emulator.counters())["submits"] == 1
    async with wc.http.post(f"{wc.base_url}/v1/runs/{run_id}/cancel") as resp:
        assert resp.status == 200  # cancelling a cancelled run is idempotent
    done = await wc.wait(
        (await wc.create_run({"stages": {"v": {"model": T2V, "input": {"prompt": "x"}}}}))["id"]
    )
    async with wc.http.post(f"{wc.base_url}/v1/runs/{done['id']}/cancel") as resp:
        assert resp.status == 409


async def test_rest_api_surface(make_wavechain: WavechainFactory) -> None:
    """List, get, 404s, pipelines, health and readiness."""
    wc = await make_wavechain()
    run = await wc.wait((await wc.create_run("image_video_3d"))["id"])
    async with wc.http.get(f"{wc.base_url}/v1/runs") as resp:
        assert [r["id"] for r in (await resp.json())["runs"]] == [run["id"]]
    async with wc.http.get(f"{wc.base_url}/v1/runs?status=failed") as resp:
        assert (await resp.json())["runs"] == []
    for path in ("/v1/runs/run_missing", "/v1/runs/run_missing/cancel"):
        async with wc.http.request(
            "GET" if "cancel" not in path else "POST", wc.base_url + path
        ) as r:
            assert r.status == 404
    async with wc.http.get(f"{wc.base_url}/v1/pipelines") as resp:
        names = {p["name"] for p in (await resp.json())["pipelines"]}
    assert {"image_video_3d", "storyboard"} <= names
    for path in ("/healthz", "/readyz"):
        async with wc.http.get(wc.base_url + path) as resp:
            assert resp.status == 200
    async with wc.http.post(f"{wc.base_url}/v1/runs", data=b"[]") as resp:
        assert resp.status == 400
