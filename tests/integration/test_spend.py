"""What runs cost and the caps that hold them (issue 25 §2, §3): the real server and the
emulator over loopback. Costs come from the price table (WaveSpeed) or the provider's
own figure (the AI/ML API's credits_used); they show on the run, its stages, its events
and GET /v1/spend; budgets refuse a run at creation with a 402 naming the cap."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from service import keys
from tests.conftest import EmulatorFactory
from tests.integration.conftest import Wavechain, WavechainFactory

IMG = "wavespeed-ai/hunyuan-image-2.1"
I2V = "wavespeed-ai/hunyuan-video/i2v"
MESH = "wavespeed-ai/hunyuan3d/v2.1"
AIML = "hunyuan/hunyuan-image-v3-text-to-image"
T2V = "wavespeed-ai/hunyuan-video/t2v"

PRICES = f"""
models:
  {IMG}: {{usd: 0.03}}
  {I2V}: {{usd: 0.40}}
  {MESH}: {{usd: 0.20}}
  {T2V}: {{usd: null}}
  {AIML}: {{usd: null}}
"""
IMAGE_ONLY = {"name": "one_image", "stages": {"a": {"model": IMG, "input": {"prompt": "p"}}}}


@pytest.fixture
def prices(tmp_path: Path) -> str:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES)
    return str(path)


async def post(wc: Wavechain, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with wc.http.post(f"{wc.base_url}{path}", json=body) as resp:
        return resp.status, await resp.json()


async def get(wc: Wavechain, path: str) -> dict[str, Any]:
    async with wc.http.get(f"{wc.base_url}{path}") as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def test_a_run_costs_what_the_price_table_says_and_shows_it_everywhere(
    make_wavechain: WavechainFactory, prices: str
) -> None:
    wc = await make_wavechain(prices_file=prices)
    run = await wc.wait((await wc.create_run("image_video_3d"))["id"])
    assert run["status"] == "succeeded"
    assert {s["name"]: s["cost_usd"] for s in run["stages"]} == {
        "image": 0.03, "video": 0.4, "mesh": 0.2
    }  # fmt: skip
    assert run["cost_usd"] == pytest.approx(0.63) and run["cost_known_usd"] == run["cost_usd"]
    events = await wc.app[keys.STORE].outbox(run["id"])
    ended = [e for e in events if e["type"] == "run.succeeded"]
    assert len(ended) == 1 and ended[0]["cost_usd"] == pytest.approx(0.63)
    video = [e for e in events if e["type"] == "stage.succeeded" and e["stage"] == "video"]
    assert video[0]["cost_usd"] == 0.4
    report = await get(wc, "/v1/spend?by=model&since=1h")
    assert {g["key"]: g["usd"] for g in report["groups"]} == {IMG: 0.03, I2V: 0.4, MESH: 0.2}
    assert report["total_usd"] == pytest.approx(0.63) and report["attempts"] == 3
    by_day = await get(wc, "/v1/spend")
    assert [g["attempts"] for g in by_day["groups"]] == [3]


async def test_an_unknown_price_is_unknown_never_zero(
    make_wavechain: WavechainFactory, prices: str
) -> None:
    wc = await make_wavechain(prices_file=prices)
    spec = {
        "stages": {
            "a": {"model": IMG, "input": {"prompt": "p"}},
            "b": {"model": T2V, "input": {"prompt": "q"}},
        }
    }
    run = await wc.wait((await wc.create_run(spec))["id"])
    assert {s["name"]: s["cost_usd"] for s in run["stages"]} == {"a": 0.03, "b": None}
    assert run["cost_usd"] is None and run["cost_known_usd"] == 0.03
    report = await get(wc, "/v1/spend?by=pipeline&since=1h")
    assert report["unknown"] == 1 and report["total_usd"] == 0.03


async def test_the_aiml_api_credits_become_the_recorded_cost(
    make_wavechain: WavechainFactory, prices: str
) -> None:
    wc = await make_wavechain(prices_file=prices, aimlapi_usd_per_credit=1e-7)
    spec = {"stages": {"a": {"model": AIML, "input": {"prompt": "p", "num_images": 2}}}}
    run = await wc.wait((await wc.create_run(spec))["id"])
    # The emulator answers credits_used 210,000 per image, as the real API did.
    assert run["stages"][0]["cost_usd"] == pytest.approx(0.042)
    assert run["cost_usd"] == pytest.approx(0.042)


@pytest.mark.parametrize(
    ("overrides", "body", "cap"),
    [
        ({}, {"pipeline": "image_video_3d", "budget_usd": 0.5}, "budget_usd of $0.50"),
        ({"daily_budget_usd": 0.5}, {"pipeline": "image_video_3d"}, "DAILY_BUDGET_USD"),
        (
            {"daily_budget_usd": 5.0},
            {"pipeline": {**IMAGE_ONLY, "stages": {"b": {"model": T2V, "input": {"prompt": "q"}}}}},
            "no known price",
        ),
    ],
)
async def test_a_run_over_a_cap_is_refused_at_creation_naming_it(
    make_wavechain: WavechainFactory,
    prices: str,
    overrides: dict[str, Any],
    body: dict[str, Any],
    cap: str,
) -> None:
    wc = await make_wavechain(prices_file=prices, **overrides)
    status, answer = await post(wc, "/v1/runs", body)
    assert status == 402 and cap in answer["error"], answer
    assert (await wc.emulator.counters()).get("submits", 0) == 0
    runs = await get(wc, "/v1/runs")
    assert runs["runs"] == []  # nothing half-created


async def test_the_daily_cap_counts_what_was_spent_today(
    make_wavechain: WavechainFactory, prices: str
) -> None:
    wc = await make_wavechain(prices_file=prices, daily_budget_usd=0.1)
    for _ in range(3):  # 3 x $0.03 = $0.09
        run = await wc.wait((await wc.create_run(IMAGE_ONLY))["id"])
        assert run["status"] == "succeeded" and run["cost_usd"] == 0.03
    status, answer = await post(wc, "/v1/runs", {"pipeline": IMAGE_ONLY})
    assert status == 402 and "DAILY_BUDGET_USD" in answer["error"]
    assert "$0.01 of $0.10" in answer["error"]  # what is left, of the cap


async def test_a_run_the_balance_cannot_pay_for_is_refused(
    make_wavechain: WavechainFactory, make_emulator: EmulatorFactory, prices: str
) -> None:
    emulator = await make_emulator(balance_usd=0.5)
    wc = await make_wavechain(emulator, prices_file=prices, check_balance=True)
    status, answer = await post(wc, "/v1/runs", {"pipeline": "image_video_3d"})
    assert status == 402 and "balance ($0.50)" in answer["error"], answer
    status, _ = await post(wc, "/v1/runs", {"pipeline": IMAGE_ONLY})
    assert status == 201
    assert (await emulator.counters())["balance_checks"] == 1  # the answer was kept


async def test_a_run_budget_in_the_pipeline_is_shown_and_held(
    make_wavechain: WavechainFactory, prices: str
) -> None:
    wc = await make_wavechain(prices_file=prices)
    run = await wc.create_run({**IMAGE_ONLY, "budget_usd": 0.05, "deadline": 600})
    assert run["budget_usd"] == 0.05 and run["deadline_at"] is not None
    done = await wc.wait(run["id"])
    assert done["cost_usd"] == 0.03 and done["status"] == "succeeded"


async def test_with_budget_exceeded_wait_a_retry_over_the_cap_waits_unsubmitted(
    make_wavechain: WavechainFactory, make_emulator: EmulatorFactory, prices: str
) -> None:
    """The first attempt ($0.03) fails; its retry would cross the $0.05 cap: with
    BUDGET_EXCEEDED=wait it waits (the run keeps running) and is never sent."""
    emulator = await make_emulator(fail_models=[IMG])
    wc = await make_wavechain(
        emulator,
        prices_file=prices,
        daily_budget_usd=0.05,
        budget_exceeded="wait",
        budget_wait_s=0.2,
    )
    stage = {"model": IMG, "input": {"prompt": "p"}, "retry": {"attempts": 2, "backoff": 0.1}}
    run = await wc.create_run({"stages": {"a": stage}})
    await asyncio.sleep(2.0)  # the failure, the retry's backoff, several waits of 0.2 s
    waiting = await wc.get_run(run["id"])
    assert waiting["status"] == "running" and waiting["stages"][0]["status"] == "pending"
    assert waiting["stages"][0]["attempt"] == 2 and waiting["cost_usd"] == 0.03
    assert (await wc.emulator.counters())["submits"] == 1
    status, _ = await post(wc, f"/v1/runs/{run['id']}/cancel", None)
    assert status == 200


async def test_without_wait_a_retry_over_the_cap_fails_the_run_saying_why(
    make_wavechain: WavechainFactory, make_emulator: EmulatorFactory, prices: str
) -> None:
    emulator = await make_emulator(fail_models=[IMG])
    wc = await make_wavechain(emulator, prices_file=prices, daily_budget_usd=0.05)
    stage = {"model": IMG, "input": {"prompt": "p"}, "retry": {"attempts": 2, "backoff": 0.1}}
    run = await wc.wait((await wc.create_run({"stages": {"a": stage}}))["id"])
    assert run["status"] == "failed" and run["cost_usd"] == 0.03
    assert "DAILY_BUDGET_USD of $0.05 would be crossed" in run["stages"][0]["error"]
    events = await wc.app[keys.STORE].outbox(run["id"])
    (failed,) = [e for e in events if e["type"] == "run.failed"]
    assert "DAILY_BUDGET_USD" in failed["error"] and failed["cost_usd"] == 0.03
    assert (await wc.emulator.counters())["submits"] == 1


async def test_a_request_sent_again_gets_its_run_even_once_the_cap_is_reached(
    make_wavechain: WavechainFactory, prices: str
) -> None:
    wc = await make_wavechain(prices_file=prices, daily_budget_usd=0.05)
    headers = {"Idempotency-Key": "order-1"}
    body = {"pipeline": IMAGE_ONLY}
    async with wc.http.post(f"{wc.base_url}/v1/runs", json=body, headers=headers) as resp:
        assert resp.status == 201
        first = await resp.json()
    await wc.wait(first["id"])  # $0.03 of $0.05 spent: another run is over the cap
    status, _ = await post(wc, "/v1/runs", body)
    assert status == 402
    async with wc.http.post(f"{wc.base_url}/v1/runs", json=body, headers=headers) as resp:
        assert resp.status == 200 and resp.headers["Idempotent-Replayed"] == "true"
        assert (await resp.json())["id"] == first["id"]
