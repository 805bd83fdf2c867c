"""Three `wavechain serve` replicas on one PostgreSQL database behind nginx, the way a
cluster runs them: duplicate deliveries land on different replicas, one replica is
killed with SIGKILL and another is restarted with SIGTERM (a rolling deploy)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.aws import AwsSandbox, sandbox
from tests.support.nginx import nginx_ingress
from tests.support.postgres import Databases
from tests.support.procs import free_port, wavechain
from tests.support.sns_gate import SnsGate

SECRET = "whsec_cmVwbGljYXMtdGVzdA=="
RUNS = 100


class _GateThread:
    """The SNS gate on an event loop of its own, for a synchronous test."""

    def __init__(self, upstream: str) -> None:
        self.gate = SnsGate(upstream)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> SnsGate:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.gate.start(), self._loop).result(10)
        return self.gate

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self.gate.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@contextlib.contextmanager
def replica(
    n: int, port: int, env: dict[str, str], logs: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with wavechain(
        "--log-json", "serve", port=port, log=logs / f"replica-{n}.log", env=env
    ) as proc:
        yield proc


def _runs(api: str, ids: list[str]) -> list[dict[str, Any]]:
    return [requests.get(f"{api}/v1/runs/{i}", timeout=10).json() for i in ids]


@pytest.mark.timeout(300)
def test_three_replicas_behind_nginx_survive_a_kill_and_a_rolling_restart(
    tmp_path: Path, pg_databases: Databases, moto_endpoint: str
) -> None:
    """100 runs of image_video_3d over three replicas; every webhook delivered three
    times at once. Every run succeeds, each stage attempt reached the provider once,
    each output is one S3 object, each transition one event, published at least once,
    and every replica did some of the work."""
    aws: AwsSandbox = sandbox(moto_endpoint)
    database = asyncio.run(pg_databases.create())
    emu_port, ingress = free_port(), free_port()
    ports = [free_port() for _ in range(3)]
    emu = f"http://127.0.0.1:{emu_port}"
    api = f"http://127.0.0.1:{ingress}"
    with _GateThread(moto_endpoint) as gate:
        env = {
            "WAVESPEED_BASE_URL": emu,
            "AIMLAPI_BASE_URL": emu,
            "WAVESPEED_WEBHOOK_SECRETS": SECRET,
            "DATABASE_URL": database,
            "PUBLIC_BASE_URL": api,
            "S3_BUCKET": aws.bucket,
            "AWS_ENDPOINT_URL": gate.url,
            "SNS_TOPIC_ARN": aws.topic_arn,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "JOB_LEASE_S": "3",
            "CALLBACK_TIMEOUT_S": "3",
            "RECONCILE_INTERVAL_S": "1",
            "DRAIN_DELAY_S": "1",
            "SHUTDOWN_GRACE_S": "5",
            "WAVECHAIN_WORKERS": "16",
        }
        with contextlib.ExitStack() as stack:
            stack.enter_context(
                wavechain(
                    "emulator", "--port", str(emu_port), "--latency", "0.3",
                    "--webhook-secret", SECRET, "--fault", "duplicate_rate=1",
                    "--fault", "duplicate_count=2", "--fault", "webhook_retries=10",
                    "--fault", "webhook_backoff_s=0.5", port=emu_port, log=tmp_path / "emu.log",
                )
            )  # fmt: skip
            replicas = [
                stack.enter_context(
                    replica(n, port, {**env, "WAVECHAIN_PORT": str(port)}, tmp_path)
                )
                for n, port in enumerate(ports)
            ]
            stack.enter_context(nginx_ingress(ingress, ports))
            ids = []
            for _ in range(RUNS):
                answer = requests.post(
                    f"{api}/v1/runs", json={"pipeline": "image_video_3d"}, timeout=10
                )
                assert answer.status_code == 201, answer.text
                ids.append(answer.json()["id"])
            time.sleep(1.0)
            replicas[0].send_signal(signal.SIGKILL)  # a node lost
            replicas[0].wait()
            replicas[1].send_signal(signal.SIGTERM)  # a rolling deploy: stop, start again
            assert replicas[1].wait(timeout=20) == 0
            stack.enter_context(
                replica(3, ports[1], {**env, "WAVECHAIN_PORT": str(ports[1])}, tmp_path)
            )
            deadline = time.monotonic() + 150
            while True:
                runs = _runs(api, ids)
                if all(r["status"] != "running" for r in runs) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert [r["status"] for r in runs].count("succeeded") == RUNS, [
                r for r in runs if r["status"] != "succeeded"
            ][:3]
            tasks = requests.get(f"{emu}/_emulator/tasks", timeout=30).json()
            outbox = _wait_published(api, gate, ids)
        attempts = sum(s["attempt"] for r in runs for s in r["stages"])
        # One provider task per attempt at most (fewer where a kill caught a submit before
        # it left: that attempt timed out and the stage retried), none bought twice.
        by_webhook = Counter(t["webhook"] for t in tasks)
        assert len(tasks) <= attempts and set(by_webhook.values()) == {1}
        everything = aws.objects()
        objects = {k: o for k, o in everything.items() if not k.endswith(".json")}
        assert len(objects) == 3 * RUNS
        assert set(everything) - set(objects) == {f"{k}.json" for k in objects}  # provenance
        assert {o["Metadata"]["task-id"] for o in objects.values()} == {
            s["task_id"] for r in runs for s in r["stages"]
        }
        types = Counter(e["type"] for e in outbox)
        assert types["run.started"] == types["run.succeeded"] == RUNS
        assert types["stage.succeeded"] == 3 * RUNS
        assert len({e["id"] for e in outbox}) == len(outbox)
        unpublished = [e["id"] for e in outbox if gate.published[e["id"]] == 0]
        assert unpublished == []
        worked: Counter[int] = Counter()
        for n in range(4):
            log = tmp_path / f"replica-{n}.log"
            worked[n] = sum(
                json.loads(line).get("event") == "stage.submitted"
                for line in log.read_text().splitlines()
                if line.startswith("{")
            )
        assert sum(1 for count in worked.values() if count) >= 2, worked
        duplicates = sum(count - 1 for count in gate.published.values() if count > 1)
        print(
            f"\n{RUNS} runs, {attempts} attempts, {len(tasks)} provider tasks, "
            f"{len(objects)} objects, {len(outbox)} events ({duplicates} published again "
            f"after the kill), submits per replica {dict(worked)}"
        )


def _wait_published(api: str, gate: SnsGate, ids: list[str]) -> list[dict[str, Any]]:
    """Every run's events, once the relay has published them all (or 60 s passed)."""
    deadline = time.monotonic() + 60
    while True:
        events = [
            e
            for run_id in ids
            for e in requests.get(f"{api}/v1/runs/{run_id}/events", timeout=10).json()["events"]
        ]
        if all(gate.published[e["id"]] for e in events) or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_processes_share_one_port_on_postgres_and_are_refused_on_sqlite(
    tmp_path: Path, pg_databases: Databases
) -> None:
    """`serve --processes 2` on PostgreSQL: two serving processes behind one port, runs
    complete, SIGTERM stops them all cleanly. On SQLite it is refused, saying why."""
    emu_port, port = free_port(), free_port()
    emu = f"http://127.0.0.1:{emu_port}"
    base = {"WAVESPEED_BASE_URL": emu, "AIMLAPI_BASE_URL": emu, "WAVESPEED_WEBHOOK_SECRETS":
            SECRET, "WAVECHAIN_PORT": str(port)}  # fmt: skip
    refused = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--processes", "2"],
        env={**os.environ, **base, "DATABASE_URL": f"sqlite:///{tmp_path}/s.db"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "--processes needs DATABASE_URL=postgresql" in (
        refused.stderr
    )
    env = {**base, "DATABASE_URL": asyncio.run(pg_databases.create())}
    log = tmp_path / "serve.log"
    with (
        wavechain("emulator", "--port", str(emu_port), "--latency", "0.1", "--webhook-secret",
                  SECRET, port=emu_port, log=tmp_path / "emu.log"),
        wavechain("--log-json", "serve", "--processes", "2", port=port, log=log, env=env) as sup,
    ):  # fmt: skip
        api = f"http://127.0.0.1:{port}"
        ids = [
            requests.post(f"{api}/v1/runs", json={"pipeline": "image_video_3d"}, timeout=10).json()[
                "id"
            ]
            for _ in range(6)
        ]
        deadline = time.monotonic() + 60
        while any(r["status"] == "running" for r in _runs(api, ids)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        statuses = {r["status"] for r in _runs(api, ids)}
        # Whichever process answers /metrics counts for both (multiprocess mode).
        applied = set()
        for _ in range(6):
            text = requests.get(f"{api}/metrics", timeout=10).text
            applied.add(
                _sample(text, 'wavechain_webhook_deliveries_total{effect="applied",reason=""}')
            )
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=30) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    (started,) = [line for line in lines if line["event"] == "service.processes"]
    ready = [line for line in lines if line["event"] == "service.ready"]
    assert statuses == {"succeeded"} and len(started["pids"]) == 2 and len(ready) == 2
    assert applied == {18.0}  # 6 runs, 3 callbacks each, over both processes
    assert len([line for line in lines if line["event"] == "service.stopped"]) == 2


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
