"""Fixtures shared by every layer: a clean environment and the emulator as a real server."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer

from emulator.app import create_emulator_app
from emulator.faults import Faults
from tests.support.aws import AwsSandbox, moto_server, sandbox
from tests.support.postgres import Databases, postgres_admin

TEST_SECRET = "whsec_dGVzdC1zZWNyZXQtZm9yLXdhdmVjaGFpbg=="
API_KEY = "test-key"


_LAYERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked with its layer, by folder: `pytest -m unit` runs the pure ones."""
    for item in items:
        layer = item.path.parent.name
        if layer in _LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a real provider or AWS account through the environment."""
    for name in list(os.environ):
        if name.startswith(("WAVESPEED_", "AIMLAPI_", "AWS_", "S3_", "SNS_", "DATABASE_URL")):
            monkeypatch.delenv(name, raising=False)


@dataclass
class Emulator:
    """A running emulator and a session that talks to it."""

    base_url: str
    secret: str
    http: aiohttp.ClientSession

    async def set_faults(self, **changes: Any) -> dict[str, Any]:
        async with self.http.put(f"{self.base_url}/_emulator/faults", json=changes) as resp:
            assert resp.status == 200, await resp.text()
            result: dict[str, Any] = await resp.json()
            return result

    async def stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.base_url}/_emulator/stats") as resp:
            result: dict[str, Any] = await resp.json()
            return result

    async def counters(self) -> dict[str, int]:
        counters: dict[str, int] = (await self.stats())["counters"]
        return counters

    async def deliveries(self) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.base_url}/_emulator/deliveries") as resp:
            result: list[dict[str, Any]] = await resp.json()
            return result

    async def tasks(self) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.base_url}/_emulator/tasks") as resp:
            result: list[dict[str, Any]] = await resp.json()
            return result

    async def fetch(self, url: str) -> tuple[int, str, bytes]:
        async with self.http.get(url) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


EmulatorFactory = Callable[..., Awaitable[Emulator]]


@pytest.fixture
async def make_emulator(aiohttp_server: AiohttpServer) -> AsyncIterator[EmulatorFactory]:
    """Start emulators on 127.0.0.1, free port, over real TCP; each with its own faults."""
    sessions: list[aiohttp.ClientSession] = []

    async def factory(**faults: Any) -> Emulator:
        faults.setdefault("latency_s", 0.05)
        faults.setdefault("webhook_backoff_s", 0.05)
        app = create_emulator_app(Faults().updated(faults), webhook_secret=TEST_SECRET)
        server = await aiohttp_server(app, host="127.0.0.1")
        http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"})
        sessions.append(http)
        return Emulator(
            base_url=str(server.make_url("")).rstrip("/"), secret=TEST_SECRET, http=http
        )

    yield factory
    for http in sessions:
        await http.close()


@pytest.fixture
async def emulator(make_emulator: EmulatorFactory) -> Emulator:
    return await make_emulator()


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One local S3/SNS/SQS endpoint (a moto server process) for the session."""
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


@pytest.fixture
def aws(moto_endpoint: str) -> AwsSandbox:
    """A fresh bucket, topic and subscribed queue for one test."""
    return sandbox(moto_endpoint)


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[Databases]:
    """A real PostgreSQL server for the session (the local one, or a throwaway cluster);
    the databases tests make on it are dropped at the end."""
    with postgres_admin() as admin:
        databases = Databases(admin)
        try:
            yield databases
        finally:
            asyncio.run(databases.drop_all())


@pytest.fixture
async def pg_url(pg_databases: Databases) -> str:
    """A fresh, empty PostgreSQL database."""
    return await pg_databases.create()
