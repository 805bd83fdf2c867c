"""The output probe (pipelines/probe.py) on real media (the emulator's renderers: PNG,
JPEG, H.264 MP4, binary glTF), fed in chunks of every size, whole and cut short."""

from __future__ import annotations

import pytest

from emulator import media
from pipelines.probe import MediaInfo, Probe, ProbeError

MATERIAL = media.digest("probe-test")


def probe(data: bytes, chunk: int) -> MediaInfo:
    p = Probe()
    for n in range(0, len(data), chunk):
        p.feed(data[n : n + chunk])
    return p.finish()


@pytest.fixture(scope="module")
def video() -> bytes:
    return media.render_video(320, 192, 2, MATERIAL)


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_images_give_their_format_and_size(chunk: int) -> None:
    png = media.render_image(640, 360, "png", MATERIAL)
    jpeg = media.render_image(512, 288, "jpeg", MATERIAL)
    assert probe(png, chunk) == MediaInfo("image", "png", len(png), 640, 360)
    assert probe(jpeg, chunk) == MediaInfo("image", "jpeg", len(jpeg), 512, 288)


@pytest.mark.parametrize("chunk", [3, 5000, 65536, 1 << 22])
@pytest.mark.parametrize("padding", [0, 300_000])
def test_a_video_gives_its_size_and_duration(video: bytes, chunk: int, padding: int) -> None:
    """Also with a large box after the moov (as the emulator pads large outputs), so the
    file is longer than the probe's head."""
    free = (8 + padding).to_bytes(4, "big") + b"free" + b"\0" * padding if padding else b""
    info = probe(video + free, chunk)
    assert (info.kind, info.format, info.width, info.height) == ("video", "mp4", 320, 192)
    assert info.duration_s == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_a_truncated_video_is_named_truncated(video: bytes, keep: float) -> None:
    with pytest.raises(ProbeError, match=r"MP4: (truncated|no complete moov)"):
        probe(video[: int(len(video) * keep)], 4096)


def test_cut_images_and_meshes_are_refused() -> None:
    png = media.render_image(64, 64, "png", MATERIAL)
    with pytest.raises(ProbeError, match="PNG: the file ends before its IEND"):
        probe(png[:-20], 100)
    jpeg = media.render_image(64, 64, "jpeg", MATERIAL)
    with pytest.raises(ProbeError, match="JPEG: the file ends before its EOI"):
        probe(jpeg[:-10], 100)
    glb = media.render_mesh(MATERIAL)
    assert probe(glb, 333) == MediaInfo("mesh", "glb", len(glb))
    with pytest.raises(ProbeError, match="GLB: declares"):
        probe(glb[:-4], 333)


def test_bytes_of_no_known_kind_are_unknown() -> None:
    assert probe(b"<html>not a picture</html>", 8).kind == "unknown"


def test_a_moov_after_megabytes_of_media_is_found_without_holding_them(video: bytes) -> None:
    """moov at the end (not fast-start), behind more media than the probe's head keeps."""
    at = video.index(b"moov") - 4
    filler = (8 + 3_000_000).to_bytes(4, "big") + b"free" + b"\0" * 3_000_000
    info = probe(video[:at] + filler + video[at:], 65536)
    assert (info.width, info.height) == (320, 192)
    assert info.duration_s == pytest.approx(2.0, abs=0.1)
