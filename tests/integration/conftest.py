"""A real wavechain server wired to a real emulator, both on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer

from pipelines.secrets import Secret
from service.app import create_app
from service.settings import Settings
from tests.conftest import Emulator, EmulatorFactory
from tests.support.procs import free_port


@dataclass
class Wavechain:
    base_url: str
    emulator: Emulator
    http: aiohttp.ClientSession
    app: Any

    async def create_run(self, pipeline: Any, **inputs: Any) -> dict[str, Any]:
        async with self.http.post(
            f"{self.base_url}/v1/runs", json={"pipeline": pipeline, "inputs": inputs}
        ) as resp:
            body: dict[str, Any] = await resp.json()
            assert resp.status == 201, body
            return body

    async def get_run(self, run_id: str) -> dict[str, Any]:
        async with self.http.get(f"{self.base_url}/v1/runs/{run_id}") as resp:
            assert resp.status == 200
            body: dict[str, Any] = await resp.json()
            return body

    async def wait(self, run_id: str, limit_s: float = 30) -> dict[str, Any]:
        """Wait until the run is no longer running (reads our own API, not the provider)."""
        async with asyncio.timeout(limit_s):
            while True:
                run = await self.get_run(run_id)
                if run["status"] != "running":
                    return run
                await asyncio.sleep(0.02)


WavechainFactory = Callable[..., Awaitable[Wavechain]]


@pytest.fixture
async def make_wavechain(
    aiohttp_server: AiohttpServer, make_emulator: EmulatorFactory, tmp_path: Path
) -> AsyncIterator[WavechainFactory]:
    sessions: list[aiohttp.ClientSession] = []

    async def factory(emulator: Emulator | None = None, **overrides: Any) -> Wavechain:
        emulator = emulator or await make_emulator()
        port = free_port()
        defaults: dict[str, Any] = {
            "port": port,
            "database_url": f"sqlite:///{tmp_path}/state-{port}.db",
            "wavespeed_base_url": emulator.base_url,
            "aimlapi_base_url": emulator.base_url,
            "wavespeed_api_key": Secret("test-key"),
            "aimlapi_key": Secret("test-key"),
            "poll_interval_s": 0.05,
        }
        settings = Settings(**{**defaults, **overrides})
        app = create_app(settings)
        await aiohttp_server(app, host="127.0.0.1", port=port)
        http = aiohttp.ClientSession()
        sessions.append(http)
        return Wavechain(base_url=settings.base_url, emulator=emulator, http=http, app=app)

    yield factory
    for http in sessions:
        await http.close()
