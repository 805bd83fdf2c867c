"""`wavechain emulator` as a real process, driven by the official SDK."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
import wavespeed

from tests.support.procs import free_port, wavechain


def test_emulator_command_serves_sdk(tmp_path: Path) -> None:
    """The CLI starts the emulator with flags; the SDK runs a model through it; faults apply."""
    port = free_port()
    log = tmp_path / "emulator.log"
    with wavechain(
        "emulator", "--port", str(port), "--latency", "0.05", "--fault", "failure_rate=0",
        "--webhook-secret", "whsec_Y2xpLXNlY3JldA==", port=port, log=log,
    ):  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        client = wavespeed.Client(api_key="k", base_url=base, max_retries=0)
        out = client.run("wavespeed-ai/hunyuan-video/t2v", {"prompt": "x"}, poll_interval=0.02)
        assert out["outputs"][0].startswith(base) and out["outputs"][0].endswith(".mp4")
        faults = requests.get(f"{base}/_emulator/faults", timeout=5).json()
        assert faults["latency_s"] == 0.05
        secret = requests.get(
            f"{base}/api/v3/webhook/secret", headers={"Authorization": "Bearer k"}, timeout=5
        ).json()["data"]["secret"]
        assert secret == "whsec_Y2xpLXNlY3JldA=="
    assert "Y2xpLXNlY3JldA" not in log.read_text()


def test_emulator_refuses_bad_fault_flag(tmp_path: Path) -> None:
    """A bad --fault exits 2 with a message naming it."""
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "emulator", "--fault", "drop_rate=7"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "drop_rate must be in 0..1" in proc.stderr


@pytest.mark.parametrize("flag", ["nonsense", "=1"])
def test_fault_flag_syntax(flag: str) -> None:
    """--fault needs NAME=VALUE."""
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "emulator", "--fault", flag],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "NAME=VALUE" in proc.stderr
