"""What `wavechain serve` writes at INFO: one JSON object per line, an access line per
request with its route template and request id, and never a webhook token."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

from tests.support.procs import free_port, serve_env, wavechain

SECRET = "whsec_bG9ncy10ZXN0LXNlY3JldA=="


def test_serve_logs_one_json_line_per_event_with_route_templates(tmp_path: Path) -> None:
    emu_port, port = free_port(), free_port()
    emu, api = f"http://127.0.0.1:{emu_port}", f"http://127.0.0.1:{port}"
    env = serve_env(emu, port, tmp_path / "state.db", SECRET)
    log = tmp_path / "serve.log"
    with (
        wavechain("emulator", "--port", str(emu_port), "--webhook-secret", SECRET,
                  port=emu_port, log=tmp_path / "emu.log"),
        wavechain("--log-json", "--log-level", "INFO", "serve", port=port, log=log, env=env),
    ):  # fmt: skip
        run = requests.post(f"{api}/v1/runs", json={"pipeline": "image_video_3d"}, timeout=10)
        run_id = run.json()["id"]
        deadline = time.monotonic() + 60
        while requests.get(f"{api}/v1/runs/{run_id}", timeout=10).json()["status"] == "running":
            assert time.monotonic() < deadline, "run did not finish"
            time.sleep(0.1)
        # A request aiohttp cannot parse never reaches routing; it is still logged.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"NOT HTTP\r\n\r\n")
            assert raw.recv(64).startswith(b"HTTP/1.")
        assert requests.get(f"{api}/healthz", timeout=5).status_code == 200
        tokens = [urlsplit(t["webhook"]).path.rsplit("/", 1)[1]
                  for t in requests.get(f"{emu}/_emulator/tasks", timeout=10).json()]  # fmt: skip
    text = log.read_text()
    events = [json.loads(line) for line in text.splitlines()]  # each line whole JSON
    access = [e for e in events if e["event"] == "http.request"]
    webhooks = [e for e in access if e["route"] == "/webhooks/wavespeed/{token}"]
    assert len(tokens) == 3 and len(webhooks) >= 3
    assert all(e["status"] == 200 and e["method"] == "POST" for e in webhooks)
    created = [e for e in access if e["route"] == "/v1/runs" and e["method"] == "POST"]
    assert [e["status"] for e in created] == [201]
    assert len({e["request_id"] for e in access if e["route"] != "unmatched"}) == len(access) - 1
    assert [e["status"] for e in access if e["route"] == "unmatched"] == [400]
    # A delivery's access line says what it did: one line per delivery.
    assert {e["effect"] for e in webhooks} <= {"applied", "no_effect", "duplicate"}
    assert {e["stage"] for e in webhooks if e["effect"] == "applied"} == {"image", "video", "mesh"}
    assert all(e["webhook_id"] and e["run_id"] == run_id for e in webhooks)
    assert not [e for e in events if e["event"] == "webhook.received"]
    # Each submit says how long after it became due it left: for the video and the mesh,
    # after the image's (then the video's) completion callback was received.
    submitted = {e["stage"]: e for e in events if e["event"] == "stage.submitted"}
    assert set(submitted) == {"image", "video", "mesh"}
    assert all(e["tries"] == 1 and e["since_due_ms"] >= 0 for e in submitted.values())
    for token in tokens:
        assert token not in text
