"""`wavechain demo`: the emulator and the receiver on free ports, one pipeline, end to end."""

from __future__ import annotations

import sys
import tempfile
import time
from typing import Any, TextIO

import aiohttp
from aiohttp import web

from pipelines.secrets import Secret
from service.app import create_app
from service.client import ApiClient, follow, summary
from service.settings import Settings


async def _start(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, int(runner.addresses[0][1])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_demo(
    pipeline: str = "image_video_3d",
    inputs: dict[str, Any] | None = None,
    *,
    out: TextIO = sys.stdout,
    latency_s: float = 1.0,
) -> dict[str, Any]:
    from emulator.app import create_emulator_app
    from emulator.faults import Faults

    started = time.monotonic()
    emulator, emulator_port = await _start(create_emulator_app(Faults(latency_s=latency_s)))
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    runners = [emulator]
    try:
        with tempfile.TemporaryDirectory(prefix="wavechain-demo-") as tmp:
            port = _free_port()
            settings = Settings(
                port=port,
                database_url=f"sqlite:///{tmp}/state.db",
                wavespeed_base_url=emulator_url,
                aimlapi_base_url=emulator_url,
                wavespeed_api_key=Secret("emulator"),
                aimlapi_key=Secret("emulator"),
                poll_interval_s=0.2,
            )
            runner, _ = await _start(create_app(settings), port)
            runners.append(runner)
            print(f"emulator   {emulator_url}  (offline WaveSpeed + AI/ML API)", file=out)
            print(f"wavechain  {settings.base_url}  (receiver + API, SQLite in {tmp})", file=out)
            async with aiohttp.ClientSession() as session:
                client = ApiClient(session, settings.base_url)
                run = await client.create_run(pipeline, inputs or {})
                print(f"\nrun {run['id']}: {pipeline}", file=out)
                final = await follow(client, run["id"], out)
                async with session.get(f"{emulator_url}/_emulator/stats") as resp:
                    counters = (await resp.json())["counters"]
            print(file=out)
            summary(final, out)
            polls = counters.get("result_polls", 0)
            print(
                f"\nprovider: {counters.get('submits', 0)} submits, "
                f"{counters.get('webhooks_delivered', 0)} signed webhooks, "
                f"{polls} result polls; {time.monotonic() - started:.1f}s in all",
                file=out,
            )
            return {"run": final, "provider": counters}
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
