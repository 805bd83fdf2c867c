"""The model catalog: every seed model's parameters, types, ranges, defaults, output kind.

Data plus one checker. The spec validator reads it before a run is accepted, and
the submit path reads it again on the fully rendered input, so nothing invalid
ever reaches a provider.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

OutputKind = Literal["image", "video", "mesh"]
ParamType = Literal["string", "integer", "number", "boolean", "size", "url", "image_size"]
Provider = Literal["wavespeed", "aimlapi"]

SEED_MAX = 2_147_483_647
_SIZE = re.compile(r"^(\d{1,5})\*(\d{1,5})$")
IMAGE_SIZE_PRESETS = (
    "square_hd",
    "square",
    "portrait_4_3",
    "portrait_16_9",
    "landscape_4_3",
    "landscape_16_9",
)


@dataclass(frozen=True, slots=True)
class ParamSpec:
    type: ParamType
    required: bool = False
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] = ()
    max_length: int | None = None
    #: For URL parameters: the kind of media they take (a mesh is not an image).
    accepts: OutputKind | None = None
    #: Set when a value is fixed by how wavechain calls the provider.
    fixed: Any = None
    fixed_reason: str = ""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    id: str
    provider: Provider
    output: OutputKind
    params: Mapping[str, ParamSpec]
    #: How many outputs a task can return (outputs[N] must stay below this).
    max_outputs: int = 1
    #: The parameter that sets the number of outputs, if any.
    count_param: str | None = None
    title: str = ""
    price_usd: float | None = None


def check_value(spec: ParamSpec, value: Any) -> str | None:
    """The rule ``value`` breaks, or None when it is acceptable."""
    if spec.fixed is not None and value != spec.fixed:
        return f"must be {spec.fixed!r} ({spec.fixed_reason})"
    kind = spec.type
    if kind == "boolean":
        return None if isinstance(value, bool) else f"must be a boolean, got {_type(value)}"
    if kind in ("integer", "number"):
        return _check_number(spec, value)
    if kind == "image_size":
        return _check_image_size(value)
    if not isinstance(value, str):
        return f"must be a string, got {_type(value)}"
    if spec.max_length is not None and len(value) > spec.max_length:
        return f"must be at most {spec.max_length} characters, got {len(value)}"
    if spec.choices and value not in spec.choices:
        return f"must be one of {', '.join(map(str, spec.choices))}, got {value!r}"
    if kind == "url" and not re.match(r"^https?://[^\s/]+", value):
        return f"must be an http(s) URL, got {value[:60]!r}"
    if kind == "size":
        match = _SIZE.match(value)
        if not match:
            return f"must look like WIDTH*HEIGHT, got {value!r}"
        lo, hi = int(spec.minimum or 0), int(spec.maximum or 0)
        if not all(lo <= int(side) <= hi for side in match.groups()):
            return f"each dimension must be in range {lo}..{hi}, got {value}"
    return None


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_number(spec: ParamSpec, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return (
            f"must be {'an integer' if spec.type == 'integer' else 'a number'}, got {_type(value)}"
        )
    if spec.type == "integer" and not (isinstance(value, int) or value.is_integer()):
        return f"must be an integer, got {value}"
    lo, hi = spec.minimum, spec.maximum
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = f"{_num(lo)}..{_num(hi)}" if hi is not None else f">= {_num(lo)}"
        return f"must be in range {bound}, got {value}"
    return None


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _check_image_size(value: Any) -> str | None:
    if isinstance(value, str):
        if value in IMAGE_SIZE_PRESETS:
            return None
        return f"must be one of {', '.join(IMAGE_SIZE_PRESETS)} or {{width, height}}, got {value!r}"
    if isinstance(value, Mapping) and set(value) == {"width", "height"}:
        side = ParamSpec("integer", minimum=1, maximum=4096)
        for name in ("width", "height"):
            if (problem := _check_number(side, value[name])) is not None:
                return f"{name} {problem}"
        return None
    return "must be a preset name or a mapping with exactly width and height"


SEED = ParamSpec("integer", default=-1, minimum=-1, maximum=SEED_MAX)
VIDEO_SIZE = ParamSpec("string", default="1280*720", choices=("1280*720", "720*1280"))
NO_SYNC = ParamSpec(
    "boolean", default=False, fixed=False, fixed_reason="wavechain waits for the webhook"
)

MODELS: dict[str, ModelSpec] = {
    m.id: m
    for m in (
        ModelSpec(
            id="wavespeed-ai/hunyuan-image-2.1",
            provider="wavespeed",
            output="image",
            title="Hunyuan Image 2.1 (text to image)",
            params={
                "prompt": ParamSpec("string", required=True),
                "size": ParamSpec("size", default="1024*1024", minimum=256, maximum=1536),
                "seed": SEED,
                "output_format": ParamSpec(
                    "string", default="jpeg", choices=("jpeg", "png", "webp")
                ),
                "enable_sync_mode": NO_SYNC,
                "enable_base64_output": ParamSpec(
                    "boolean",
                    default=False,
                    fixed=False,
                    fixed_reason="webhook callbacks do not support base64 output",
                ),
            },
        ),
        ModelSpec(
            id="wavespeed-ai/hunyuan-video/i2v",
            provider="wavespeed",
            output="video",
            title="Hunyuan Video (image to video)",
            price_usd=0.40,
            params={
                "prompt": ParamSpec("string"),
                "image": ParamSpec("url", required=True, accepts="image"),
                "num_inference_steps": ParamSpec("integer", default=30, minimum=1, maximum=30),
                "duration": ParamSpec("integer", default=5, minimum=5, maximum=10),
                "seed": SEED,
                "size": VIDEO_SIZE,
                "enable_safety_checker": ParamSpec("boolean", default=True),
            },
        ),
        ModelSpec(
            id="wavespeed-ai/hunyuan-video/t2v",
            provider="wavespeed",
            output="video",
            title="Hunyuan Video (text to video)",
            params={
                "prompt": ParamSpec("string", required=True),
                "size": VIDEO_SIZE,
                "seed": SEED,
                "num_inference_steps": ParamSpec("integer", default=30, minimum=2, maximum=30),
            },
        ),
        ModelSpec(
            id="wavespeed-ai/hunyuan3d/v2.1",
            provider="wavespeed",
            output="mesh",
            title="Hunyuan3D 2.1 (image to 3D)",
            # Upstream returns a GLB; WaveSpeed's newer 3D model adds other formats.
            max_outputs=4,
            params={"image": ParamSpec("url", required=True, accepts="image")},
        ),
        ModelSpec(
            id="hunyuan/hunyuan-image-v3-text-to-image",
            provider="aimlapi",
            output="image",
            title="Hunyuan Image 3 (AI/ML API, synchronous)",
            max_outputs=4,
            count_param="num_images",
            params={
                "prompt": ParamSpec("string", required=True, max_length=4000),
                "num_images": ParamSpec("integer", default=1, minimum=1, maximum=4),
                "seed": ParamSpec("integer", minimum=1),
                "negative_prompt": ParamSpec("string"),
                "image_size": ParamSpec("image_size", default="square_hd"),
                "num_inference_steps": ParamSpec("integer", default=28, minimum=1, maximum=50),
                "guidance_scale": ParamSpec("number", default=7.5, minimum=1, maximum=20),
                "enable_safety_checker": ParamSpec("boolean", default=True),
                # sync_mode would return base64 images inline; wavechain stores URLs.
                "sync_mode": ParamSpec(
                    "boolean", default=False, fixed=False, fixed_reason="outputs are fetched by URL"
                ),
                "output_format": ParamSpec("string", default="png", choices=("jpeg", "png")),
                "enable_prompt_expansion": ParamSpec("boolean"),
            },
        ),
    )
}


def get_model(model_id: str) -> ModelSpec | None:
    return MODELS.get(model_id)
