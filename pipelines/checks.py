"""Quality gates: does what came back match what was asked, before anything downstream is
bought? Pure: the mirror probes each output as it streams (pipelines/probe.py) and the
engine asks ``verdict``; the provider's NSFW flags are judged by the state machine.

Checks (a stage's ``checks``: all by default, ``off``, or a list of these names):

- ``media``: each output is a whole file of the model's kind (an image, an MP4, a GLB),
  not cut short;
- ``size``: an image or video has the width and height asked (``size: W*H``, or
  ``image_size: {width, height}``; the provider's named presets are not checked);
- ``format``: an image is in the ``output_format`` asked;
- ``duration``: a video lasts the ``duration`` asked, within half a second or 10 %;
- ``nsfw``: the provider did not flag an output (``has_nsfw_contents``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipelines.catalog import ModelSpec
from pipelines.probe import MediaInfo

CHECKS = ("media", "size", "format", "duration", "nsfw")
ALL_CHECKS = frozenset(CHECKS)
#: Prefix of a failed check's stage error (a retry then asks with another seed).
FAILED = "output check failed"
_SIZE = re.compile(r"^(\d+)\*(\d+)$")


def parse_checks(raw: Any) -> frozenset[str]:
    """A stage's ``checks``: absent/true/"on" all, false/"off" none, or a list of names.
    Raises ValueError naming what is accepted."""
    if raw is None or raw is True or raw == "on":
        return ALL_CHECKS
    if raw is False or raw == "off":
        return frozenset()
    if isinstance(raw, list) and all(isinstance(n, str) and n in CHECKS for n in raw):
        return frozenset(raw)
    raise ValueError(f"must be on, off, or a list of {', '.join(CHECKS)}; got {raw!r}")


def _asked_size(model: ModelSpec, params: Mapping[str, Any]) -> tuple[int, int] | None:
    size = params.get("size")
    if isinstance(size, str) and (m := _SIZE.match(size)):
        return int(m[1]), int(m[2])
    box = params.get("image_size")
    if isinstance(box, Mapping) and isinstance(box.get("width"), int):
        return int(box["width"]), int(box["height"])
    return None


def verdict(
    model: ModelSpec,
    params: Mapping[str, Any],
    outputs: Sequence[MediaInfo | None],
    checks: Iterable[str],
) -> str | None:
    """Why the outputs do not match the request (the first reason), or None. An output
    with no probe (``None``: its copy was reused from an earlier try) is not judged."""
    enabled = set(checks)
    full = {**{n: d.default for n, d in model.params.items() if d.default is not None}, **params}
    for n, info in enumerate(outputs):
        if info is None:
            continue
        where = f"outputs[{n}]"
        first = n == 0
        if "media" in enabled and first and info.kind != model.output:
            return f"{FAILED}: {where} is {_what(info)}, not the {model.output} asked for"
        if info.kind != model.output:
            continue  # a mesh model's extra formats
        if "format" in enabled and model.output == "image":
            asked = full.get("output_format")
            if isinstance(asked, str) and info.format != asked:
                return f"{FAILED}: {where} is {info.format.upper()}, asked for {asked.upper()}"
        if "size" in enabled and model.output in ("image", "video"):
            asked_size = _asked_size(model, full)
            if asked_size is not None and (info.width, info.height) != asked_size:
                return (
                    f"{FAILED}: {where} is {info.width}*{info.height}, "
                    f"asked for {asked_size[0]}*{asked_size[1]}"
                )
        if "duration" in enabled and model.output == "video":
            asked_s = full.get("duration")
            got = info.duration_s
            off = abs(got - asked_s) if isinstance(asked_s, int | float) and got else 0.0
            if isinstance(asked_s, int | float) and off > max(0.5, 0.1 * asked_s):
                return f"{FAILED}: {where} lasts {got:.2f} s, asked for {asked_s} s"
    return None


def _what(info: MediaInfo) -> str:
    return "not a recognisable file" if info.kind == "unknown" else f"a {info.format} {info.kind}"


def reseeded(params: Mapping[str, Any], attempt: int) -> dict[str, Any]:
    """The request again with another fixed seed, for a retry after a failed check (the
    same seed would make the same output); a random seed (-1, or none) stays as it is."""
    seed = params.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        return dict(params)
    return {**params, "seed": (seed + 1_000_003 * attempt) % 2_147_483_647 or 1}
