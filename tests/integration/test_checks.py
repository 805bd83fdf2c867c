"""Quality gates (issue 26 §2) through the real server, the emulator and the local S3: an
output that does not match what was asked fails its stage before anything downstream is
bought; with retries, another seed is asked for; `checks` narrows or turns them off."""

from __future__ import annotations

from typing import Any

from tests.conftest import EmulatorFactory
from tests.integration.conftest import WavechainFactory
from tests.integration.test_mirror_events import aws_settings, stages_of
from tests.support.aws import AwsSandbox

IMG = "wavespeed-ai/hunyuan-image-2.1"
I2V = "wavespeed-ai/hunyuan-video/i2v"
MESH = "wavespeed-ai/hunyuan3d/v2.1"


def chain(image: dict[str, Any] | None = None) -> dict[str, Any]:
    """image → video → mesh (the mesh waits for the video)."""
    return {
        "stages": {
            "image": {"model": IMG, "input": {"prompt": "p", "size": "640*384", "seed": 4},
                      **(image or {})},
            "video": {"model": I2V, "input": {"image": "${stages.image.outputs[0]}",
                                              "size": "1280*720", "duration": 5}},
            "mesh": {"model": MESH, "input": {"image": "${stages.image.outputs[0]}"},
                     "needs": ["video"]},
        }
    }  # fmt: skip


async def submitted_models(wc: Any) -> list[str]:
    return [t["model"] for t in await wc.emulator.tasks()]


async def test_a_wrong_size_image_fails_its_stage_and_buys_nothing_downstream(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    emulator = await make_emulator(wrong_size_models=[IMG])
    wc = await make_wavechain(emulator, **aws_settings(aws))
    run = await wc.wait((await wc.create_run(chain()))["id"])
    stages = stages_of(run)
    assert run["status"] == "failed" and stages["image"]["status"] == "failed"
    assert stages["image"]["error"] == (
        "output check failed: outputs[0] is 320*192, asked for 640*384"
    )
    assert await submitted_models(wc) == [IMG]  # no video, no mesh bought


async def test_a_truncated_video_fails_before_the_mesh_is_bought(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    emulator = await make_emulator(truncate_models=[I2V])
    wc = await make_wavechain(emulator, **aws_settings(aws))
    run = await wc.wait((await wc.create_run(chain()))["id"])
    stages = stages_of(run)
    assert stages["image"]["status"] == "succeeded"
    assert stages["video"]["status"] == "failed"
    assert stages["video"]["error"].startswith("output check failed: outputs[0]: MP4: ")
    assert stages["mesh"]["status"] == "cancelled"
    assert sorted(await submitted_models(wc)) == sorted([IMG, I2V])


async def test_a_retry_after_a_refused_output_asks_with_another_seed(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    emulator = await make_emulator(wrong_size_models=[IMG])
    wc = await make_wavechain(emulator, **aws_settings(aws))
    spec = chain({"retry": {"attempts": 2, "backoff": 0.05}})
    run = await wc.wait((await wc.create_run(spec))["id"])
    assert run["status"] == "failed" and stages_of(run)["image"]["attempt"] == 2
    seeds = [t["input"]["seed"] for t in await wc.emulator.tasks()]
    assert len(seeds) == 2 and seeds[0] == 4 and seeds[1] != 4


async def test_checks_can_be_narrowed_or_turned_off(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    emulator = await make_emulator(wrong_size_models=[IMG])
    wc = await make_wavechain(emulator, **aws_settings(aws))
    for checks in (["media", "format"], "off"):
        spec = chain({"checks": checks})
        run = await wc.wait((await wc.create_run(spec))["id"])
        assert stages_of(run)["image"]["status"] == "succeeded", (checks, run)


async def test_an_output_the_provider_flags_as_nsfw_is_refused(
    make_emulator: EmulatorFactory, make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    emulator = await make_emulator(nsfw_models=[IMG])
    wc = await make_wavechain(emulator, **aws_settings(aws))
    run = await wc.wait((await wc.create_run(chain()))["id"])
    assert "NSFW" in stages_of(run)["image"]["error"]
    assert await submitted_models(wc) == [IMG]
    allowed = await wc.wait((await wc.create_run(chain({"checks": ["media"]})))["id"])
    assert stages_of(allowed)["image"]["status"] == "succeeded"
