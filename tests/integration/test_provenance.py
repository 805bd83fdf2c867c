"""Provenance (issue 26 §3) through the real server, the emulator and the local S3: a
manifest beside every mirrored output, complete and consistent with the objects, and
`wavechain lineage` walking from the video back to the prompt."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

import anyio

from pipelines.provenance import lineage
from tests.integration.conftest import WavechainFactory
from tests.integration.test_mirror_events import aws_settings, stages_of
from tests.support.aws import AwsSandbox


def read(aws: AwsSandbox, uri: str) -> dict[str, Any] | None:
    key = uri.removeprefix(f"s3://{aws.bucket}/")
    try:
        body = aws.s3.get_object(Bucket=aws.bucket, Key=key)["Body"].read()
    except aws.s3.exceptions.NoSuchKey:
        return None
    doc: dict[str, Any] = json.loads(body)
    return doc


def object_bytes(aws: AwsSandbox, uri: str) -> bytes:
    data: bytes = aws.s3.get_object(Bucket=aws.bucket, Key=uri.removeprefix(f"s3://{aws.bucket}/"))[
        "Body"
    ].read()
    return data


async def test_every_output_has_a_complete_manifest_and_lineage_reaches_the_prompt(
    make_wavechain: WavechainFactory, aws: AwsSandbox, tmp_path: Any
) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text("models:\n  wavespeed-ai/hunyuan-video/i2v: {usd: 0.4}\n")
    wc = await make_wavechain(**aws_settings(aws, prices_file=str(prices)))
    run = await wc.wait(
        (await wc.create_run("image_video_3d", prompt="a paper boat", seed=3))["id"]
    )
    stages = stages_of(run)
    manifests = {}
    for name, stage in stages.items():
        (uri,) = stage["mirrored_outputs"]
        doc = read(aws, uri + ".json")
        assert doc is not None, name
        manifests[name] = doc
        data = object_bytes(aws, uri)
        assert doc["output"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert doc["output"]["size"] == len(data) and doc["output"]["uri"] == uri
        assert (doc["run_id"], doc["stage"], doc["attempt"]) == (run["id"], name, 1)
        assert (doc["model"], doc["provider"]) == (stage["model"], "wavespeed")
        assert doc["task_id"] == stage["task_id"]
        assert doc["pipeline"]["name"] == "image_video_3d"
        assert doc["pipeline"]["version"].startswith("sha256:")
        assert doc["timings"]["submitted_at"] and doc["timings"]["completed_at"]
    image, video = manifests["image"], manifests["video"]
    assert image["input"]["prompt"] == "a paper boat" and image["seed"] == 3
    assert image["seed_reported_by_provider"]
    assert image["input_media"] == [] and image["cost_usd"] is None  # its price is unknown
    (fed,) = video["input_media"]
    assert fed["stage"] == "image" and fed["uri"] == stages["image"]["mirrored_outputs"][0]
    assert fed["sha256"] == image["output"]["sha256"]
    assert video["input"]["image"] == fed["uri"] and video["cost_usd"] == 0.4

    walked = lineage(stages["video"]["mirrored_outputs"][0], lambda uri: read(aws, uri))
    assert walked["stage"] == "video"
    assert [p["stage"] for p in walked["from"]] == ["image"]
    assert walked["from"][0]["input"]["prompt"] == "a paper boat"

    env = {**os.environ, "AWS_ENDPOINT_URL": aws.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing"}  # fmt: skip
    cli = [sys.executable, "-m", "service.cli", "lineage"]
    shown = await anyio.run_process([*cli, stages["mesh"]["mirrored_outputs"][0]], env=env)
    text = shown.stdout.decode()
    assert "a paper boat" in text and "stage mesh" in text and "stage image" in text
    gone = await anyio.run_process([*cli, f"s3://{aws.bucket}/nothing.png"], env=env, check=False)
    assert gone.returncode == 1 and "no manifest at" in gone.stdout.decode()


async def test_a_cached_output_s_manifest_names_where_it_was_copied_from(
    make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    wc = await make_wavechain(**aws_settings(aws, result_cache=True))
    first = await wc.wait((await wc.create_run("image_video_3d", seed=8))["id"])
    again = await wc.wait((await wc.create_run("image_video_3d", seed=8))["id"])
    (copy,) = stages_of(again)["image"]["mirrored_outputs"]
    doc = read(aws, copy + ".json")
    assert doc is not None
    assert doc["cached_from"] == stages_of(first)["image"]["mirrored_outputs"][0]
    assert doc["run_id"] == again["id"] and doc["output"]["uri"] == copy
    assert doc["task_id"] == stages_of(first)["image"]["task_id"]  # who made the bytes


async def test_the_seed_a_provider_picked_for_minus_one_is_recorded(
    make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    wc = await make_wavechain(**aws_settings(aws))
    run = await wc.wait((await wc.create_run("image_video_3d", seed=-1))["id"])
    (uri,) = stages_of(run)["image"]["mirrored_outputs"]
    doc = read(aws, uri + ".json")
    assert doc is not None and doc["input"]["seed"] == -1  # what was sent
    (task,) = [t for t in await wc.emulator.tasks() if t["id"] == doc["task_id"]]
    assert doc["seed"] == task["input"]["seed"] != -1  # what the provider says it used
