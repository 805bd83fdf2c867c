"""Quality gates and provenance over real processes (issue 26 §2, §3): `serve`, the
emulator and the local S3 (moto) as processes. The emulator's fault knobs send a
wrong-size image and a truncated video: each fails its stage and nothing downstream is
submitted. A clean run leaves a manifest beside every output, and `wavechain lineage`
walks from the mesh back to the prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.aws import sandbox
from tests.support.procs import Stack, run_ended, stack

pytestmark = pytest.mark.e2e

SECRET = "whsec_Z2F0ZXMtdGVzdC1zZWNyZXQ="
IMG, I2V, MESH = (
    "wavespeed-ai/hunyuan-image-2.1",
    "wavespeed-ai/hunyuan-video/i2v",
    "wavespeed-ai/hunyuan3d/v2.1",
)
CHAIN: dict[str, Any] = {
    "stages": {
        "image": {"model": IMG, "input": {"prompt": "a lighthouse", "size": "640*384", "seed": 2}},
        "video": {"model": I2V, "input": {"image": "${stages.image.outputs[0]}", "duration": 5}},
        "mesh": {"model": MESH, "input": {"image": "${stages.image.outputs[0]}"},
                 "needs": ["video"]},
    }
}  # fmt: skip


def _run(urls: Stack) -> dict[str, Any]:
    r = requests.post(f"{urls.api}/v1/runs", json={"pipeline": CHAIN}, timeout=10)
    assert r.status_code == 201, r.text
    return run_ended(urls.api, r.json()["id"])


def _faults(urls: Stack, **faults: Any) -> None:
    requests.put(f"{urls.emulator}/_emulator/faults", json=faults, timeout=5).raise_for_status()


def _models(urls: Stack) -> list[str]:
    return [t["model"] for t in requests.get(f"{urls.emulator}/_emulator/tasks", timeout=5).json()]


def test_gates_refuse_bad_outputs_and_every_good_one_has_its_provenance(
    tmp_path: Path, moto_endpoint: str
) -> None:
    aws = sandbox(moto_endpoint)
    env = {"S3_BUCKET": aws.bucket, "AWS_ENDPOINT_URL": moto_endpoint,
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # fmt: skip
    with stack(tmp_path, SECRET, env, latency=0.2) as urls:
        _faults(urls, wrong_size_models=[IMG])
        run = _run(urls)
        stages = {s["name"]: s for s in run["stages"]}
        assert stages["image"]["error"] == (
            "output check failed: outputs[0] is 320*192, asked for 640*384"
        )
        assert _models(urls) == [IMG]  # nothing downstream bought

        _faults(urls, wrong_size_models=[], truncate_models=[I2V])
        run = _run(urls)
        stages = {s["name"]: s for s in run["stages"]}
        assert stages["video"]["status"] == "failed" and "MP4" in stages["video"]["error"]
        assert stages["mesh"]["status"] == "cancelled"
        assert _models(urls).count(MESH) == 0

        _faults(urls, truncate_models=[])
        run = _run(urls)
        assert run["status"] == "succeeded", run
        for stage in run["stages"]:
            (uri,) = stage["mirrored_outputs"]
            key = uri.removeprefix(f"s3://{aws.bucket}/") + ".json"
            doc = json.loads(aws.s3.get_object(Bucket=aws.bucket, Key=key)["Body"].read())
            assert doc["stage"] == stage["name"] and doc["task_id"] == stage["task_id"]
        mesh = next(s for s in run["stages"] if s["name"] == "mesh")["mirrored_outputs"][0]
        shown = subprocess.run(
            [sys.executable, "-m", "service.cli", "lineage", mesh, "--json"],
            env={**os.environ, **env}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        walked = json.loads(shown.stdout)
        assert walked["stage"] == "mesh" and walked["from"][0]["input"]["prompt"] == "a lighthouse"
