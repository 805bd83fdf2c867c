"""A batch of runs through two `wavechain serve` processes on one PostgreSQL database
against an emulator that enforces an account's rate (429 above it), with the governor
set to the same limit; an interactive run started mid-batch. Used by the governor's test
(small) and its benchmark (200 runs)."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from tests.support.procs import free_port, run_ended, serve_env, wavechain

SECRET = "whsec_Z292ZXJub3ItdGVzdC1zZWNyZXQ="
IMG = "wavespeed-ai/hunyuan-image-2.1"
PIPELINE = {"name": "governed", "stages": {"a": {"model": IMG, "input": {"prompt": "p"}}}}


def governed_batch(
    tmp: Path, database: str, *, runs: int, per_window: int, window_s: float
) -> dict[str, Any]:
    """Run the batch; what the emulator saw, and how long the interactive run waited."""
    emu_port, ports = free_port(), [free_port(), free_port()]
    emu = f"http://127.0.0.1:{emu_port}"
    apis = [f"http://127.0.0.1:{port}" for port in ports]
    envs = [
        {
            **serve_env(emu, port, tmp / "unused.db", SECRET),
            "DATABASE_URL": database,
            "WAVESPEED_TASKS_PER_MIN": str(per_window),
            "WAVESPEED_RATE_WINDOW_S": str(int(window_s)),
        }
        for port in ports
    ]
    faults = [f"rate_limit={per_window}", f"rate_window_s={window_s}"]
    fault_args = [a for f in faults for a in ("--fault", f)]
    with (
        wavechain("emulator", "--port", str(emu_port), "--latency", "0.3", "--webhook-secret",
                  SECRET, *fault_args, port=emu_port, log=tmp / "emu.log"),
        wavechain("--log-json", "serve", port=ports[0], log=tmp / "a.log", env=envs[0]),
        wavechain("--log-json", "serve", port=ports[1], log=tmp / "b.log", env=envs[1]),
    ):  # fmt: skip

        def start(n: int, priority: str = "batch") -> str:
            body: dict[str, Any] = {"pipeline": PIPELINE, "priority": priority}
            r = requests.post(f"{apis[n % 2]}/v1/runs", json=body, timeout=30)
            r.raise_for_status()
            run_id: str = r.json()["id"]
            return run_id

        with ThreadPoolExecutor(16) as pool:
            batch = list(pool.map(start, range(runs)))
        time.sleep(window_s / 2)  # the batch is waiting on the governor now
        asked = time.monotonic()  # the emulator, another process, reads the same clock
        urgent = start(1, "interactive")
        ended = [run_ended(apis[0], run_id, timeout=runs / per_window * window_s * 3 + 30)
                 for run_id in [*batch, urgent]]  # fmt: skip
        tasks = requests.get(f"{emu}/_emulator/tasks", timeout=10).json()
        counters = requests.get(f"{emu}/_emulator/stats", timeout=10).json()["counters"]
    statuses = {r["status"] for r in ended}
    urgent_task = next(t for t in tasks if t["id"] == ended[-1]["stages"][0]["task_id"])
    times = sorted(t["submitted_mono"] for t in tasks)
    took = times[-1] - times[0]
    # At the limit, the tasks after the first window's take one window per `per_window`.
    ideal = (math.ceil(len(times) / per_window) - 1) * window_s
    return {
        "runs": runs + 1,
        "per_window": per_window,
        "window_s": window_s,
        "statuses": sorted(statuses),
        "provider_calls": counters.get("submits", 0),
        "throttled_429": counters.get("submits_throttled", 0),
        "submit_span_s": round(took, 2),
        "at_the_limit_s": ideal,
        "ratio_to_limit": round(ideal / took, 3) if took else None,
        "interactive_wait_s": round(urgent_task["submitted_mono"] - asked, 2),
        "batch_left_when_interactive_went": sum(
            1 for t in tasks if t["submitted_mono"] > urgent_task["submitted_mono"]
        ),
        "logs_with_errors": [
            name for name in ("a.log", "b.log") if '"level": "error"' in (tmp / name).read_text()
        ],
    }
