"""Crash safety and shutdown, with real processes: kill -9 mid-flight, SIGTERM draining."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import requests
import yaml

from pipelines import spec as specs
from tests.support.aws import sandbox
from tests.support.procs import free_port, serve_env, wavechain

SECRET = "whsec_Y3Jhc2gtdGVzdA=="

EXAMPLES = Path(specs.__file__).parent / "examples"


def wait_runs(api: str, ids: list[str], limit_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + limit_s
    while True:
        runs = [requests.get(f"{api}/v1/runs/{i}", timeout=10).json() for i in ids]
        if all(r["status"] != "running" for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def test_kill_9_mid_flight_loses_nothing(tmp_path: Path, moto_endpoint: str) -> None:
    """kill -9 while callbacks are in flight; after restart every run succeeds, each stage
    was submitted once per attempt, each output stored once, every event published."""
    aws = sandbox(moto_endpoint)
    emu_port, port = free_port(), free_port()
    emu = f"http://127.0.0.1:{emu_port}"
    env = serve_env(
        emu, port, tmp_path / "state.db", SECRET,
        S3_BUCKET=aws.bucket, AWS_ENDPOINT_URL=moto_endpoint, SNS_TOPIC_ARN=aws.topic_arn,
        JOB_LEASE_S="2", CALLBACK_TIMEOUT_S="4", RECONCILE_INTERVAL_S="1",
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}"
    runs = 6
    # The example, with a video timeout that fits the test: a submit killed between its
    # attempt row and the request leaving is never re-sent blindly; that attempt waits
    # for its callback until the stage's timeout (900 s in the example), then retries.
    spec = yaml.safe_load((EXAMPLES / "image_video_3d.yaml").read_text())
    spec["stages"]["video"]["timeout"] = 20
    with wavechain(
        "emulator", "--port", str(emu_port), "--latency", "0.4", "--webhook-secret", SECRET,
        "--fault", "webhook_retries=8", "--fault", "webhook_backoff_s=0.5",
        port=emu_port, log=tmp_path / "emu.log",
    ):  # fmt: skip
        with wavechain("serve", port=port, log=tmp_path / "serve1.log", env=env) as first:
            ids = [
                requests.post(f"{api}/v1/runs", json={"pipeline": spec}, timeout=10).json()["id"]
                for _ in range(runs)
            ]
            time.sleep(0.6)  # images done, videos and meshes submitted, callbacks coming
            first.send_signal(signal.SIGKILL)
            first.wait()
        time.sleep(1.0)  # deliveries fail meanwhile; the emulator keeps retrying
        with wavechain("serve", port=port, log=tmp_path / "serve2.log", env=env):
            finished = wait_runs(api, ids, limit_s=90)
            assert [r["status"] for r in finished] == ["succeeded"] * runs, finished
            attempts = sum(s["attempt"] for r in finished for s in r["stages"])
            tasks = requests.get(f"{emu}/_emulator/tasks", timeout=10).json()
            deliveries = requests.get(f"{emu}/_emulator/deliveries", timeout=10).json()
            db = sqlite3.connect(f"{tmp_path}/state.db")
            deadline = time.monotonic() + 60
            while db.execute("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").fetchone()[0]:
                assert time.monotonic() < deadline, "outbox did not drain"
                time.sleep(0.2)
            stored_ids = [r[0] for r in db.execute("SELECT event_id FROM outbox")]
    failed = [d for d in deliveries if d["status"] is None]
    assert failed, "no callback hit the dead server: the kill was not mid-flight"
    # One provider task per attempt at most: fewer if the kill caught a submit before it
    # left (that attempt timed out and the stage retried), never more (nothing re-sent).
    assert len(tasks) <= attempts, "a stage was submitted more than once for one attempt"
    assert len(stored_ids) == len(set(stored_ids)), "an event id was stored twice"
    everything = aws.objects()
    objects = {k: o for k, o in everything.items() if not k.endswith(".json")}
    assert len(objects) == 3 * runs
    assert set(everything) - set(objects) == {f"{k}.json" for k in objects}  # provenance
    by_task = {o["Metadata"]["task-id"] for o in objects.values()}
    assert by_task == {s["task_id"] for r in finished for s in r["stages"]}
    received = {m["body"]["id"] for m in aws.receive()}
    assert set(stored_ids) <= received, "an event was never published"
    print(f"\n{runs} runs, {attempts} attempts, {len(tasks)} provider tasks, "
          f"{len(objects)} objects, {len(stored_ids)} events, "
          f"{len(failed)} deliveries refused while down")  # fmt: skip


def test_sigterm_drains_then_exits(tmp_path: Path) -> None:
    """SIGTERM: readiness turns false at once, in-flight work finishes, exit code 0."""
    emu_port, port = free_port(), free_port()
    emu = f"http://127.0.0.1:{emu_port}"
    env = serve_env(
        emu, port, tmp_path / "state.db", SECRET, DRAIN_DELAY_S="1", SHUTDOWN_GRACE_S="10"
    )
    api = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with (
        wavechain("emulator", "--port", str(emu_port), "--latency", "0.2",
                  "--webhook-secret", SECRET, port=emu_port, log=tmp_path / "emu.log"),
        wavechain("--log-json", "serve", port=port, log=log, env=env) as proc,
    ):  # fmt: skip
        assert requests.get(f"{api}/readyz", timeout=5).status_code == 200
        requests.post(f"{api}/v1/runs", json={"pipeline": "image_video_3d"}, timeout=10)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert requests.get(f"{api}/readyz", timeout=5).status_code == 503
        assert proc.wait(timeout=20) == 0
    events = {e["event"]: e for e in map(json.loads, log.read_text().splitlines())}
    assert "service.draining" in events and "service.stopped" in events
    assert events["workers.stopped"]["drained"] is True
