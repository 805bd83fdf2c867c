"""Benchmark 8: what the result cache saves (issue 25 §5).

A batch of ``RUNS`` runs of the bundled ``image_video_3d``, half of them repeats of the
other half (the same prompt and fixed seed): ``RUNS // 2`` distinct seeds, then the same
seeds again once the first half has finished. Two `wavechain serve` processes, the cache
off (the baseline) and on (RESULT_CACHE=on), each with its own database and bucket,
against one emulator and one local S3 (moto); the emulator counts the tasks each batch
submitted, and `GET /v1/spend` says what each batch cost by the price table below.

Prices: Hunyuan Video i2v's $0.40 is published; the image and 3D prices are assumptions
for the benchmark (the shipped table leaves them unknown), so that spend can be summed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.bench.benches import emulator, serve
from tests.bench.pipeline import _aws_env

RUNS = 100
CONCURRENCY = 16
PRICES = """models:
  wavespeed-ai/hunyuan-image-2.1: {usd: 0.03}
  wavespeed-ai/hunyuan-video/i2v: {usd: 0.40}
  wavespeed-ai/hunyuan3d/v2.1: {usd: 0.20}
"""


async def _batch(api: str, seeds: list[int]) -> list[dict[str, Any]]:
    """Start one run per seed (CONCURRENCY at a time) and wait for all to end."""
    todo = iter(seeds)
    ids: list[str] = []

    async with aiohttp.ClientSession() as http:

        async def start() -> None:
            for seed in todo:
                body = {"pipeline": "image_video_3d", "inputs": {"seed": seed}}
                async with http.post(f"{api}/v1/runs", json=body) as resp:
                    resp.raise_for_status()
                    ids.append((await resp.json())["id"])

        await asyncio.gather(*(start() for _ in range(CONCURRENCY)))
        runs = []
        for run_id in ids:
            while True:
                async with http.get(f"{api}/v1/runs/{run_id}") as resp:
                    run: dict[str, Any] = await resp.json()
                if run["status"] != "running":
                    runs.append(run)
                    break
                await asyncio.sleep(0.05)
        return runs


async def _json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        resp.raise_for_status()
        return await resp.json()


def _side(work: Path, emu: str, endpoint: str, name: str, cache: bool) -> dict[str, Any]:
    prices = work / "cache-prices.yaml"
    prices.write_text(PRICES)
    env = {**_aws_env(endpoint, f"bench-{name}"), "PRICES_FILE": str(prices),
           "RESULT_CACHE": "on" if cache else "off"}  # fmt: skip
    api, ctx = serve(work, emu, name, level="WARNING", **env)
    with ctx:
        before = asyncio.run(_json(f"{emu}/_emulator/stats"))["counters"].get("submits", 0)
        half = list(range(1, RUNS // 2 + 1))
        started = time.perf_counter()
        runs = asyncio.run(_batch(api, half))
        runs += asyncio.run(_batch(api, half))  # the repeats
        wall = time.perf_counter() - started
        after = asyncio.run(_json(f"{emu}/_emulator/stats"))["counters"]["submits"]
        spend = asyncio.run(_json(f"{api}/v1/spend?by=model&since=1h"))
    statuses = {r["status"] for r in runs}
    if statuses != {"succeeded"}:
        raise RuntimeError(f"{name}: runs ended {statuses}")
    return {
        "provider_calls": after - before,
        "spend_usd": spend["total_usd"],
        "spend_by_model": {g["key"]: g["usd"] for g in spend["groups"]},
        "cached_stages": sum(s["cached"] for r in runs for s in r["stages"]),
        "wall_s": round(wall, 1),
    }


def cache(work: Path) -> dict[str, Any]:
    from tests.support.aws import moto_server

    emu, emu_ctx = emulator(work)
    with emu_ctx, moto_server(work / "moto-cache.log") as endpoint:
        off = _side(work, emu, endpoint, "cache-off", cache=False)
        on = _side(work, emu, endpoint, "cache-on", cache=True)
    return {
        "runs": RUNS,
        "repeats": RUNS // 2,
        "off": off,
        "on": on,
        "provider_calls_saved": off["provider_calls"] - on["provider_calls"],
        "spend_ratio": round(on["spend_usd"] / off["spend_usd"], 3),
    }


def markdown(r: dict[str, Any]) -> list[str]:
    off, on = r["off"], r["on"]
    return [
        "## 8. The result cache",
        "",
        f"{r['runs']} runs of `image_video_3d`, {r['repeats']} of them repeats of the other",
        "half (same prompt, fixed seed, started once the first half ended); cache off (the",
        "baseline) and RESULT_CACHE=on, each its own `serve` process, database and bucket,",
        "one emulator (which counts the tasks submitted). Prices: i2v's published $0.40;",
        "image $0.03 and 3D $0.20 assumed for the benchmark.",
        "",
        "| | provider calls | spend | stages from the cache | wall |",
        "|---|---:|---:|---:|---:|",
        f"| cache off | {off['provider_calls']} | ${off['spend_usd']:.2f} | "
        f"{off['cached_stages']} | {off['wall_s']} s |",
        f"| cache on | {on['provider_calls']} | ${on['spend_usd']:.2f} | "
        f"{on['cached_stages']} | {on['wall_s']} s |",
        "",
        f"Provider calls saved: {r['provider_calls_saved']}; spend with the cache "
        f"{r['spend_ratio']} of without.",
        "",
        "Reproduce: `.venv/bin/python -m tests.bench cache` (about a minute).",
        "",
    ]
