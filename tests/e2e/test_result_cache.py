"""The result cache over real processes (issue 25 §5): a `serve` with RESULT_CACHE=on,
the emulator and the local S3 (moto) as processes. A repeated run with a fixed seed makes
no provider call; `wavechain status` shows its stages cached and its cost $0.00."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.aws import sandbox
from tests.support.procs import run_ended, stack

pytestmark = pytest.mark.e2e

SECRET = "whsec_cmVzdWx0LWNhY2hlLXRlc3Q="
I2V = "wavespeed-ai/hunyuan-video/i2v"


def test_a_repeated_run_makes_no_provider_call(tmp_path: Path, moto_endpoint: str) -> None:
    aws = sandbox(moto_endpoint)
    prices = tmp_path / "prices.yaml"
    prices.write_text(f"models:\n  {I2V}: {{usd: 0.40}}\n")
    env = {
        "S3_BUCKET": aws.bucket, "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "RESULT_CACHE": "on", "PRICES_FILE": str(prices),
    }  # fmt: skip
    with stack(tmp_path, SECRET, env, latency=0.2) as urls:
        body: dict[str, Any] = {"pipeline": "image_video_3d", "inputs": {"seed": 11}}
        runs = []
        for _ in range(2):
            r = requests.post(f"{urls.api}/v1/runs", json=body, timeout=10)
            assert r.status_code == 201, r.text
            runs.append(run_ended(urls.api, r.json()["id"]))
        first, second = runs
        assert first["status"] == second["status"] == "succeeded"
        counters = requests.get(f"{urls.emulator}/_emulator/stats", timeout=5).json()["counters"]
        assert counters["submits"] == 3  # the first run's three tasks, and no more
        assert [s["cached"] for s in second["stages"]] == [True, True, True]
        assert first["cost_known_usd"] == 0.4 and second["cost_usd"] == 0.0
        status = subprocess.run(
            [sys.executable, "-m", "service.cli", "status", second["id"], "--server", urls.api],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert status.stdout.count("(cached)") == 3 and "cost $0.00" in status.stdout
        metrics = requests.get(f"{urls.api}/metrics", timeout=5).text
        assert 'wavechain_cache_lookups_total{result="hit"} 3.0' in metrics
        assert 'wavechain_cache_lookups_total{result="miss"} 3.0' in metrics
