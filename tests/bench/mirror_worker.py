"""One mirror of one URL in a fresh process; prints seconds and peak-RSS growth as JSON.

Usage: python -m tests.bench.mirror_worker stream|multipart|memory URL ENDPOINT BUCKET KEY
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import anyio

from pipelines.mirror import SINGLE_PUT_MAX, MirrorConfig, S3Mirror, mirror_session
from service.aws import make_clients
from service.settings import Settings
from tests.bench.benches import rss_mib


def peak_mib() -> float:
    return rss_mib(os.getpid(), "VmHWM")


async def main(mode: str, url: str, endpoint: str, bucket: str, key: str) -> dict[str, float]:
    s3 = make_clients(Settings(aws_endpoint_url=endpoint)).s3  # as `serve` builds it
    s3.head_bucket(Bucket=bucket)  # warm the client before the baseline reading
    async with mirror_session(allow_loopback=True) as session:
        before = peak_mib()
        started = time.perf_counter()
        if mode in ("stream", "multipart"):
            config = MirrorConfig(
                bucket=bucket, allowed_hosts=("127.0.0.1",), max_bytes=2**34, allow_loopback=True,
                single_put_max=0 if mode == "multipart" else SINGLE_PUT_MAX,
            )  # fmt: skip
            mirror = S3Mirror(s3, session, config, limiter=anyio.CapacityLimiter(4))
            done = await mirror.copy(url, stem=key, metadata={"task-id": key})
            size = done.size
        else:
            async with session.get(url) as resp:
                data = await resp.read()
            await anyio.to_thread.run_sync(
                lambda: s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType="video/mp4")
            )
            size = len(data)
        elapsed = time.perf_counter() - started
    return {"bytes": size, "seconds": elapsed, "mb_per_s": size / elapsed / 1e6,
            "peak_rss_growth_mib": peak_mib() - before}  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:6]))))
