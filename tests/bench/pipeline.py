"""Benchmark 3: pipeline throughput and memory with many runs in flight.

Throughput: ``RUNS`` runs of the bundled three-stage example (image → i2v and → 3D) through
the emulator at zero latency, with the full product path: webhooks, every output mirrored
to S3 and every lifecycle event published to SNS (moto). Baseline in the same run: a bare
client chaining the same three calls in the emulator's synchronous mode (no store, no
mirror, no events), at the same concurrency: the emulator's own ceiling.

Memory: runs held in flight (the emulator sits on every task for an hour) while the
``serve`` process's RSS is read at each step up to ``IN_FLIGHT`` runs.

The bench process only creates runs and reads the SQLite file (read-only, WAL), so the
CPU it reads off ``/proc`` for ``serve`` is wavechain's own.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.bench.benches import REPEATS, cpu_seconds, emulator, rss_mib, serve

RUNS = 1000
CONCURRENCY = 32
IN_FLIGHT = 10_000
STEPS = 4
IMAGE = "wavespeed-ai/hunyuan-image-2.1"
I2V = "wavespeed-ai/hunyuan-video/i2v"
MESH = "wavespeed-ai/hunyuan3d/v2.1"
PROMPT = "A ceramic fox figurine on a wooden desk, soft morning light"


async def _create_runs(api: str, count: int, concurrency: int = CONCURRENCY) -> None:
    todo = iter(range(count))

    async def worker(http: aiohttp.ClientSession) -> None:
        for _ in todo:
            async with http.post(f"{api}/v1/runs", json={"pipeline": "image_video_3d"}) as resp:
                resp.raise_for_status()

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))


def _counts(db: Path, sql: str) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return {str(k): int(v) for k, v in conn.execute(sql)}
    finally:
        conn.close()


def _count(db: Path, table_where: str) -> int:
    return _counts(db, f"SELECT 'n', COUNT(*) FROM {table_where}")["n"]  # noqa: S608 - fixed text


def _run_statuses(db: Path) -> dict[str, int]:
    return _counts(db, "SELECT status, COUNT(*) FROM runs GROUP BY status")


def _wait(predicate: Any, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.25)


def _wavechain_once(api: str, db: Path, pid: int, done_before: int) -> dict[str, float]:
    events_before = _count(db, "outbox")
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    asyncio.run(_create_runs(api, RUNS))
    _wait(lambda: _run_statuses(db).get("succeeded", 0) >= done_before + RUNS, "runs to finish")
    _wait(lambda: _count(db, "outbox WHERE sent_at IS NULL") == 0, "events to be published")
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu_before
    events = _count(db, "outbox") - events_before
    statuses = _run_statuses(db)
    return {
        "seconds": elapsed,
        "runs_per_s": RUNS / elapsed,
        "cpu_s": cpu,
        "transitions": events,
        "cpu_ms_per_transition": cpu * 1000 / events,
        "cpu_ms_per_stage": cpu * 1000 / (RUNS * 3),
        "failed": statuses.get("failed", 0),
    }


async def _bare_chain(emu: str, count: int) -> float:
    """The same three calls chained by a bare client in sync mode: the emulator's ceiling."""
    auth = {"Authorization": "Bearer bench"}
    todo = iter(range(count))

    async def call(http: aiohttp.ClientSession, model: str, body: dict[str, Any]) -> str:
        body = {**body, "enable_sync_mode": True}
        async with http.post(f"{emu}/api/v3/{model}", json=body, headers=auth) as resp:
            resp.raise_for_status()
            data = (await resp.json())["data"]
        assert data["status"] == "completed", data
        return str(data["outputs"][0])

    async def worker(http: aiohttp.ClientSession) -> None:
        for _ in todo:
            image = await call(http, IMAGE, {"prompt": PROMPT, "size": "1280*720", "seed": 42,
                                             "output_format": "png"})  # fmt: skip
            await call(http, I2V, {"image": image, "prompt": f"The camera slowly orbits: {PROMPT}",
                                   "duration": 5, "size": "1280*720", "seed": 42})  # fmt: skip
            await call(http, MESH, {"image": image})

    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(worker(http) for _ in range(CONCURRENCY)))
    return count / (time.perf_counter() - started)


def _aws_env(endpoint: str, name: str) -> dict[str, str]:
    from tests.support.aws import clients

    s3, sns, _ = clients(endpoint)
    s3.create_bucket(Bucket=name)
    topic = sns.create_topic(Name=name)["TopicArn"]
    return {"AWS_ENDPOINT_URL": endpoint, "S3_BUCKET": name, "SNS_TOPIC_ARN": topic,
            "MIRROR_ALLOWED_HOSTS": "127.0.0.1"}  # fmt: skip


def throughput(work: Path) -> dict[str, Any]:
    from tests.support.aws import moto_server

    raw: dict[str, list[Any]] = {"wavechain": [], "bare_chain_runs_per_s": []}
    emu, emu_ctx = emulator(work)
    with emu_ctx, moto_server(work / "moto-pipeline.log") as endpoint:
        api, serve_ctx = serve(work, emu, "pipeline", **_aws_env(endpoint, "bench-pipeline"))
        with serve_ctx as server:
            db = work / "pipeline.db"
            # Warm-up: the emulator renders each distinct output once, then serves it again.
            asyncio.run(_create_runs(api, 2, 2))
            _wait(lambda: _run_statuses(db).get("succeeded", 0) == 2, "warm-up runs")
            asyncio.run(_bare_chain(emu, 2))
            for _ in range(REPEATS):
                done = _run_statuses(db).get("succeeded", 0)
                raw["wavechain"].append(_wavechain_once(api, db, server.pid, done))
                raw["bare_chain_runs_per_s"].append(asyncio.run(_bare_chain(emu, RUNS)))
            rss = rss_mib(server.pid)
    ours = statistics.median(r["runs_per_s"] for r in raw["wavechain"])
    bare = statistics.median(raw["bare_chain_runs_per_s"])
    return {
        "runs": RUNS,
        "concurrency": CONCURRENCY,
        "runs_per_s": {"wavechain": round(ours, 1), "bare_chain": round(bare, 1)},
        "ratio": round(ours / bare, 2),
        "cpu_ms_per_transition": round(
            statistics.median(r["cpu_ms_per_transition"] for r in raw["wavechain"]), 2
        ),
        "cpu_ms_per_stage": round(
            statistics.median(r["cpu_ms_per_stage"] for r in raw["wavechain"]), 2
        ),
        "transitions_per_run": round(raw["wavechain"][0]["transitions"] / RUNS, 1),
        "failed_runs": sum(r["failed"] for r in raw["wavechain"]),
        "serve_rss_mib_after": round(rss, 1),
        "raw": raw,
    }


def memory(work: Path) -> dict[str, Any]:
    from tests.support.aws import moto_server

    emu, emu_ctx = emulator(work, latency=3600.0)
    samples: list[dict[str, float]] = []
    with emu_ctx, moto_server(work / "moto-inflight.log") as endpoint:
        api, serve_ctx = serve(work, emu, "inflight", **_aws_env(endpoint, "bench-inflight"))
        with serve_ctx as server:
            db = work / "inflight.db"

            def submitted(n: int) -> bool:
                return _count(db, "stages WHERE task_id IS NOT NULL") >= n and not _count(
                    db, "outbox WHERE sent_at IS NULL"
                )

            asyncio.run(_create_runs(api, 10))
            _wait(lambda: submitted(10), "warm-up submits")
            samples.append({"in_flight": 0, "rss_mib": rss_mib(server.pid)})
            for step in range(1, STEPS + 1):
                asyncio.run(_create_runs(api, IN_FLIGHT // STEPS))
                n = IN_FLIGHT * step // STEPS
                _wait(lambda n=n: submitted(n + 10), f"{n} runs submitted")
                samples.append({"in_flight": n, "rss_mib": rss_mib(server.pid)})
            running = _run_statuses(db).get("running", 0)
            peak = rss_mib(server.pid, "VmHWM")
    first, last = samples[1], samples[-1]
    slope = (last["rss_mib"] - first["rss_mib"]) / ((last["in_flight"] - first["in_flight"]) / 1000)
    return {
        "runs_in_flight": running,
        "rss_mib": [{k: round(v, 1) for k, v in s.items()} for s in samples],
        "mib_per_1000_runs": round(slope, 2),
        "peak_rss_mib": round(peak, 1),
    }


def pipeline(work: Path) -> dict[str, Any]:
    return {"throughput": throughput(work), "memory": memory(work)}
