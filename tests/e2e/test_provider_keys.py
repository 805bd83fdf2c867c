"""`serve` starts with whatever provider keys are set and refuses only the runs that need
a missing one, naming the variable and the stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import requests

from tests.support.procs import free_port, wavechain

SECRET = "whsec_a2V5cy10ZXN0LXNlY3JldA=="


def test_wavespeed_key_alone_serves_wavespeed_runs_and_refuses_aiml_ones(tmp_path: Path) -> None:
    """With only WAVESPEED_API_KEY (and the AI/ML API at its real, default URL), `serve`
    starts, says which providers are live and off, runs image_video_3d to the end, and
    refuses storyboard (Hunyuan Image 3) with a 422 naming AIMLAPI_KEY and the stage."""
    emu_port, port = free_port(), free_port()
    emu = f"http://127.0.0.1:{emu_port}"
    env = {
        "WAVESPEED_BASE_URL": emu,
        "WAVESPEED_API_KEY": "live-key-for-the-emulator",
        "WAVECHAIN_PORT": str(port),
        "DATABASE_URL": f"sqlite:///{tmp_path}/state.db",
    }
    with (
        wavechain("emulator", "--port", str(emu_port), "--latency", "0.1",
                  "--webhook-secret", SECRET, port=emu_port, log=tmp_path / "emu.log"),
        wavechain("--log-json", "serve", port=port, log=tmp_path / "serve.log", env=env),
    ):  # fmt: skip
        api = f"http://127.0.0.1:{port}"
        refused = requests.post(f"{api}/v1/runs", json={"pipeline": "storyboard"}, timeout=10)
        run = requests.post(f"{api}/v1/runs", json={"pipeline": "image_video_3d"}, timeout=10)
        assert run.status_code == 201, run.text
        deadline = time.monotonic() + 30
        while (body := requests.get(f"{api}/v1/runs/{run.json()['id']}", timeout=10).json())[
            "status"
        ] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        listed = requests.get(f"{api}/v1/runs", timeout=10).json()["runs"]
    assert body["status"] == "succeeded", body
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert "AIMLAPI_KEY" in error and "stage 'keyframes'" in error
    assert "stage 'clip'" not in error  # WaveSpeed stages are fine
    assert [r["pipeline"] for r in listed] == ["image_video_3d"]  # nothing half-created
    lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()]
    (providers,) = [line for line in lines if line["event"] == "service.providers"]
    assert (providers["wavespeed"], providers["aimlapi"]) == ("live", "off")
    assert "live-key-for-the-emulator" not in (tmp_path / "serve.log").read_text()
