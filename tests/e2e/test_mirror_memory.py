"""Mirroring a large output keeps the server's memory flat (peak RSS, real processes)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests

from tests.support.aws import moto_server, sandbox
from tests.support.procs import free_port, serve_env, wavechain

SECRET = "whsec_bWVtb3J5LXRlc3Q="
LARGE = 300 * 1024 * 1024


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def run_clip(api: str) -> dict[str, Any]:
    spec: Any = {
        "stages": {"clip": {"model": "wavespeed-ai/hunyuan-video/t2v", "input": {"prompt": "x"}}}
    }
    run: dict[str, Any] = requests.post(
        f"{api}/v1/runs", json={"pipeline": spec}, timeout=10
    ).json()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        run = requests.get(f"{api}/v1/runs/{run['id']}", timeout=10).json()
        if run["status"] != "running":
            return run
        time.sleep(0.1)
    raise AssertionError(f"run did not finish: {run}")


def test_large_output_mirrors_with_flat_memory(tmp_path: Path) -> None:
    """A 300 MiB video is streamed to S3 while the server's peak RSS grows < 64 MiB."""
    with moto_server(tmp_path / "moto.log") as endpoint:
        aws = sandbox(endpoint)
        emu_port, port = free_port(), free_port()
        emu = f"http://127.0.0.1:{emu_port}"
        env = serve_env(
            emu, port, tmp_path / "state.db", SECRET,
            S3_BUCKET=aws.bucket, AWS_ENDPOINT_URL=endpoint,
        )  # fmt: skip
        with (
            wavechain("emulator", "--port", str(emu_port), "--latency", "0.05",
                      "--webhook-secret", SECRET, port=emu_port, log=tmp_path / "emu.log"),
            wavechain("serve", port=port, log=tmp_path / "serve.log", env=env) as serve,
        ):  # fmt: skip
            api = f"http://127.0.0.1:{port}"
            assert run_clip(api)["status"] == "succeeded"  # warm every code path first
            before = peak_rss_mib(serve.pid)
            requests.put(
                f"{emu}/_emulator/faults", json={"large_output_bytes": LARGE}, timeout=5
            ).raise_for_status()
            run = run_clip(api)
            after = peak_rss_mib(serve.pid)
        assert run["status"] == "succeeded", run
        key = run["stages"][0]["outputs"][0].removeprefix(f"s3://{aws.bucket}/")
        assert aws.s3.head_object(Bucket=aws.bucket, Key=key)["ContentLength"] == LARGE
    print(f"peak RSS before {before:.1f} MiB, after a {LARGE >> 20} MiB mirror {after:.1f} MiB")
    assert after - before < 64, f"peak RSS grew {after - before:.1f} MiB"
