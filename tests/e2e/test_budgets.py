"""One daily cap across two `wavechain serve` processes on one PostgreSQL database
(issue 25 §2), over real processes: twenty runs started at once on both never buy more
than the cap, as the emulator (which counts what was submitted) shows; the runs refused
say which cap; `wavechain spend` reports what was spent."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.postgres import Databases
from tests.support.procs import free_port, run_ended, serve_env, wavechain

pytestmark = pytest.mark.e2e

SECRET = "whsec_YnVkZ2V0cy10ZXN0LXNlY3JldA=="
IMG = "wavespeed-ai/hunyuan-image-2.1"
PIPELINE: dict[str, Any] = {
    "name": "one_image",
    "stages": {"a": {"model": IMG, "input": {"prompt": "p"}}},
}
RUNS = 20


def test_two_processes_on_one_database_never_cross_the_daily_cap(
    tmp_path: Path, pg_databases: Databases
) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text(f"models:\n  {IMG}: {{usd: 0.25}}\n")
    database = asyncio.run(pg_databases.create())
    emu_port, ports = free_port(), [free_port(), free_port()]
    emu = f"http://127.0.0.1:{emu_port}"
    apis = [f"http://127.0.0.1:{port}" for port in ports]
    envs = [
        {
            **serve_env(emu, port, tmp_path / "unused.db", SECRET),
            "DATABASE_URL": database,
            "PRICES_FILE": str(prices),
            "DAILY_BUDGET_USD": "1.00",
        }
        for port in ports
    ]
    with (
        wavechain("emulator", "--port", str(emu_port), "--latency", "0.5",
                  "--webhook-secret", SECRET, port=emu_port, log=tmp_path / "emu.log"),
        wavechain("--log-json", "serve", port=ports[0], log=tmp_path / "a.log", env=envs[0]),
        wavechain("--log-json", "serve", port=ports[1], log=tmp_path / "b.log", env=envs[1]),
    ):  # fmt: skip

        def start(n: int) -> requests.Response:
            return requests.post(f"{apis[n % 2]}/v1/runs", json={"pipeline": PIPELINE}, timeout=30)

        with ThreadPoolExecutor(RUNS) as pool:
            answers = list(pool.map(start, range(RUNS)))
        assert {r.status_code for r in answers} <= {201, 402}, [r.text for r in answers]
        refused = [r.json()["error"] for r in answers if r.status_code == 402]
        assert all("DAILY_BUDGET_USD" in error for error in refused), refused
        created = [r.json()["id"] for r in answers if r.status_code == 201]
        assert len(created) >= 4  # enough to reach the cap
        runs = [run_ended(apis[0], run_id) for run_id in created]
        print(f"{len(created)} runs created, {len(refused)} refused at creation")

        counters = requests.get(f"{emu}/_emulator/stats", timeout=5).json()["counters"]
        assert counters["submits"] == 4  # $1.00 / $0.25: not one more was bought
        succeeded = [r for r in runs if r["status"] == "succeeded"]
        failed = [r for r in runs if r["status"] == "failed"]
        assert len(succeeded) == 4 and len(failed) == len(created) - 4
        for run in failed:
            (stage,) = run["stages"]
            assert "DAILY_BUDGET_USD of $1.00 would be crossed" in stage["error"], stage
            assert stage["cost_usd"] == 0.0
        for api in apis:  # both processes read the one ledger
            report = requests.get(f"{api}/v1/spend?by=pipeline", timeout=5).json()
            assert report["total_usd"] == 1.0 and report["attempts"] == 4
            assert report["groups"] == [
                {"key": "one_image", "usd": 1.0, "unknown": 0, "attempts": 4}
            ]
        cli = [sys.executable, "-m", "service.cli", "spend", "--server", apis[1]]
        text = subprocess.run([*cli, "--by", "model"], capture_output=True, text=True, check=True)
        assert IMG in text.stdout and "$1.00" in text.stdout, text.stdout
        as_json = subprocess.run([*cli, "--json"], capture_output=True, text=True, check=True)
        assert json.loads(as_json.stdout)["total_usd"] == 1.0
        bad = subprocess.run([*cli, "--since", "last week"], capture_output=True, text=True)
        assert bad.returncode == 2 and "since: 'last week' is not" in bad.stderr
    for log in ("a.log", "b.log"):
        assert '"level": "error"' not in (tmp_path / log).read_text()
