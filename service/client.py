"""A small client of wavechain's REST API, and the live progress view the CLI prints."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, TextIO
from urllib.parse import urlencode

import aiohttp

from service.views import MARK, stage_tree

TERMINAL_RUN = {"succeeded", "failed", "cancelled"}


class ApiError(Exception):
    """The server answered with an error; the message is its error text."""


class ApiClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._base = base_url.rstrip("/")

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self._session.request(method, self._base + path, json=body) as resp:
                payload = await resp.json(content_type=None)
        except aiohttp.ClientConnectorError as exc:
            raise ApiError(
                f"cannot reach wavechain at {self._base} ({exc.os_error}); start it with "
                "`wavechain serve`, or pass --server"
            ) from exc
        if resp.status >= 400:
            message = payload.get("error") if isinstance(payload, dict) else None
            raise ApiError(message or f"HTTP {resp.status}")
        return payload

    async def create_run(
        self,
        pipeline: Any,
        inputs: dict[str, Any],
        *,
        deadline: float | str | None = None,
        budget_usd: float | None = None,
        priority: str | int | None = None,
        concurrency: tuple[str | None, int | None] = (None, None),
    ) -> dict[str, Any]:
        body = {"pipeline": pipeline, "inputs": inputs}
        optional = {
            "deadline": deadline,
            "budget_usd": budget_usd,
            "priority": priority,
            "concurrency_key": concurrency[0],
            "concurrency_limit": concurrency[1],
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        result: dict[str, Any] = await self._call("POST", "/v1/runs", body)
        return result

    async def spend(self, *, since: str, by: str) -> dict[str, Any]:
        query = urlencode({"since": since, "by": by})
        result: dict[str, Any] = await self._call("GET", f"/v1/spend?{query}")
        return result

    async def get_run(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/v1/runs/{run_id}")
        return result

    async def list_runs(
        self, limit: int = 20, *, status: str | None = None, pipeline: str | None = None
    ) -> list[dict[str, Any]]:
        query = urlencode(
            {"limit": limit, **({"status": status} if status else {}),
             **({"pipeline": pipeline} if pipeline else {})}
        )  # fmt: skip
        result: list[dict[str, Any]] = (await self._call("GET", f"/v1/runs?{query}"))["runs"]
        return result

    async def pipelines(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self._call("GET", "/v1/pipelines"))["pipelines"]
        return result

    async def retry(self, run_id: str, from_stage: str | None) -> dict[str, Any]:
        body = {"from": from_stage} if from_stage else {}
        result: dict[str, Any] = await self._call("POST", f"/v1/runs/{run_id}/retry", body)
        return result

    async def cancel(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/runs/{run_id}/cancel")
        return result


def stage_line(stage: dict[str, Any]) -> str:
    mark = MARK.get(stage["status"], "?")
    task = f" task {stage['task_id'][:12]}" if stage.get("task_id") else ""
    elapsed = (stage.get("timings") or {}).get("elapsed_s")
    took = f" {elapsed:.2f}s" if elapsed is not None else ""
    error = f"  {stage['error']}" if stage.get("error") else ""
    return f"  {mark} {stage['name']:<12} {stage['status']:<10}{task}{took}{error}"


async def follow(
    client: ApiClient, run_id: str, out: TextIO, *, quiet: bool = False, interval: float = 0.1
) -> dict[str, Any]:
    """Print each stage change until the run ends; return the final run."""
    seen: dict[str, str] = {}
    while True:
        run = await client.get_run(run_id)
        for stage in run["stages"]:
            if not quiet and seen.get(stage["name"]) != stage["status"]:
                print(stage_line(stage), file=out, flush=True)
            seen[stage["name"]] = stage["status"]
        if run["status"] in TERMINAL_RUN:
            return run
        await asyncio.sleep(interval)


def summary(run: dict[str, Any], out: TextIO) -> None:
    """The run as the tree of its stages (service/views.py)."""
    print(stage_tree(run, time.time()), file=out)


def dump(value: Any, out: TextIO) -> None:
    print(json.dumps(value, indent=2), file=out)
