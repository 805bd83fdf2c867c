"""`make demo-cluster`: the demo's chain on PostgreSQL, three replicas behind nginx.

Uses the PostgreSQL at 127.0.0.1:5432 (or a throwaway cluster from the installed server)
and nginx (installed from Debian's packages if missing), as the tests do. Prints each
run's stages and which replica submitted each stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import requests

from tests.support.nginx import nginx_ingress
from tests.support.postgres import Databases, postgres_admin
from tests.support.procs import free_port, wavechain

SECRET = "whsec_ZGVtby1jbHVzdGVy"
RUNS = 3


def main() -> int:
    with postgres_admin() as admin, tempfile.TemporaryDirectory(prefix="wavechain-") as tmp:
        logs = Path(tmp)
        databases = Databases(admin)
        database = asyncio.run(databases.create())
        try:
            return _demo(database, logs)
        finally:
            asyncio.run(databases.drop_all())


def _demo(database: str, logs: Path) -> int:
    emu_port, ingress = free_port(), free_port()
    ports = [free_port() for _ in range(3)]
    emu, api = f"http://127.0.0.1:{emu_port}", f"http://127.0.0.1:{ingress}"
    env = {
        "WAVESPEED_BASE_URL": emu,
        "AIMLAPI_BASE_URL": emu,
        "WAVESPEED_WEBHOOK_SECRETS": SECRET,
        "DATABASE_URL": database,
        "PUBLIC_BASE_URL": api,
    }
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            wavechain("emulator", "--port", str(emu_port), "--latency", "1",
                      "--webhook-secret", SECRET, port=emu_port, log=logs / "emulator.log")
        )  # fmt: skip
        for n, port in enumerate(ports):
            stack.enter_context(
                wavechain("--log-json", "serve", port=port, log=logs / f"replica-{n}.log",
                          env={**env, "WAVECHAIN_PORT": str(port)})
            )  # fmt: skip
        stack.enter_context(nginx_ingress(ingress, ports))
        print(f"emulator   {emu}")
        print(f"postgres   {database.rsplit('@', 1)[-1]}")
        print(f"replicas   {', '.join(f'127.0.0.1:{p}' for p in ports)}")
        print(f"nginx      {api}  (PUBLIC_BASE_URL: callbacks go through it)\n")
        ids = [
            requests.post(f"{api}/v1/runs", json={"pipeline": "image_video_3d"}, timeout=10).json()[
                "id"
            ]
            for _ in range(RUNS)
        ]
        while True:
            runs = [requests.get(f"{api}/v1/runs/{i}", timeout=10).json() for i in ids]
            if all(r["status"] != "running" for r in runs):
                break
            time.sleep(0.2)
        counters = requests.get(f"{emu}/_emulator/stats", timeout=10).json()["counters"]
    submitted_by: dict[tuple[str, str], int] = {}
    per_replica: defaultdict[int, int] = defaultdict(int)
    for n in range(3):
        for line in (logs / f"replica-{n}.log").read_text().splitlines():
            if line.startswith("{") and (event := json.loads(line)).get("event") == (
                "stage.submitted"
            ):
                submitted_by[(event["run_id"], event["stage"])] = n
                per_replica[n] += 1
    for run in runs:
        print(f"run {run['id']}: {run['status']}")
        for stage in run["stages"]:
            by = submitted_by.get((run["id"], stage["name"]))
            print(f"  {stage['name']:<6} {stage['status']:<10} task {stage['task_id'][:12]}"
                  f"  submitted by replica {by}")  # fmt: skip
    print(
        f"\nprovider: {counters.get('submits', 0)} submits, "
        f"{counters.get('webhooks_delivered', 0)} signed webhooks through nginx, "
        f"{counters.get('result_polls', 0)} result polls; submits per replica "
        f"{dict(per_replica)}; {time.monotonic() - started:.1f}s in all"
    )
    return 0 if all(r["status"] == "succeeded" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
