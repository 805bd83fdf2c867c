"""Load generator (its own process): fire prepared requests over N connections, report.

Usage: python -m tests.bench.loadgen REQUESTS.jsonl SECONDS CONNECTIONS
Each line: {"url": ..., "headers": {...}, "body": "<latin-1 text>"}. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp


async def main(path: str, seconds: float, connections: int) -> dict[str, float]:
    requests = [json.loads(line) for line in open(path, encoding="utf-8")]  # noqa: ASYNC230, SIM115
    prepared = [(r["url"], r["headers"], r["body"].encode("latin-1")) for r in requests]
    latencies: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    cursor = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal cursor, errors
            while time.perf_counter() < deadline and cursor < len(prepared):
                url, headers, body = prepared[cursor]
                cursor += 1
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        statuses[resp.status] = statuses.get(resp.status, 0) + 1
                        if resp.status >= 300:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "requests": len(latencies), "errors": errors, "seconds": elapsed,
        "rps": (len(latencies) - errors) / elapsed, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
        "statuses": statuses,  # type: ignore[dict-item]
    }  # fmt: skip


if __name__ == "__main__":
    out = asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
    print(json.dumps(out))
