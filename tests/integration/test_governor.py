"""The governor against a provider that pushes back harder than it was told (another
client on the account, or limits set too high): each 429 is obeyed and lowers the rate
for every replica, and every run still succeeds."""

from __future__ import annotations

import asyncio
import sqlite3

from pipelines import metrics
from service import keys
from tests.conftest import EmulatorFactory
from tests.integration.conftest import WavechainFactory

IMG = "wavespeed-ai/hunyuan-image-2.1"
SPEC = {"stages": {"a": {"model": IMG, "input": {"prompt": "p"}}}}


async def test_a_429_lowers_the_rate_and_every_run_still_succeeds(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory
) -> None:
    emulator = await make_emulator(rate_limit=2, rate_window_s=1.0)
    wc = await make_wavechain(
        emulator, wavespeed_tasks_per_min=8, wavespeed_rate_window_s=1.0, submit_backoff_s=0.1
    )
    throttled_before = metrics.GOVERNOR_THROTTLED.labels("wavespeed")._value.get()
    runs = [await wc.create_run(SPEC) for _ in range(12)]
    ended = await asyncio.gather(*(wc.wait(r["id"], limit_s=60) for r in runs))
    assert {r["status"] for r in ended} == {"succeeded"}
    counters = await emulator.counters()
    assert counters["submits_throttled"] >= 1  # the provider pushed back ...
    throttled = metrics.GOVERNOR_THROTTLED.labels("wavespeed")._value.get() - throttled_before
    assert throttled == counters["submits_throttled"]  # ... and each 429 was counted
    # ... and lowered the rate every replica reads (the store's governor_state).
    path = wc.app[keys.SETTINGS].database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        (factor,) = conn.execute(
            "SELECT factor FROM governor_state WHERE provider = 'wavespeed'"
        ).fetchone()
    assert factor < 1.0
