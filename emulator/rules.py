"""The provider's parameter rules, as the seed model pages state them.

Written independently of wavechain's own catalog on purpose: the emulator plays
the provider, so a mistake in the client's catalog must not be mirrored here.
Each check returns the normalised parameters or raises ``ParamError`` naming
the field and the rule, the way a provider's 400 does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["image", "video", "mesh"]
SEED_MAX = 2_147_483_647
_SIZE_RE = re.compile(r"^(\d{1,5})\*(\d{1,5})$")


class ParamError(ValueError):
    """A request parameter broke a rule; str() is the provider-style message."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"invalid parameter '{field}': {rule}")


Check = Callable[[str, Any], Any]


def string(*, max_len: int | None = None, choices: tuple[str, ...] = ()) -> Check:
    def check(field: str, value: Any) -> Any:
        if not isinstance(value, str):
            raise ParamError(field, f"must be a string, got {type(value).__name__}")
        if max_len is not None and len(value) > max_len:
            raise ParamError(field, f"must be at most {max_len} characters, got {len(value)}")
        if choices and value not in choices:
            raise ParamError(field, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    return check


def integer(lo: int, hi: int | None = None, *, integral_number: bool = False) -> Check:
    """An integer in [lo, hi]. ``integral_number`` also admits 2.0 (JSON-schema "number")."""

    def check(field: str, value: Any) -> Any:
        ok_float = integral_number and isinstance(value, float) and value.is_integer()
        if isinstance(value, bool) or not (isinstance(value, int) or ok_float):
            raise ParamError(field, f"must be an integer, got {type(value).__name__}")
        value = int(value)
        if value < lo or (hi is not None and value > hi):
            bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise ParamError(field, f"must be in range {bound}, got {value}")
        return value

    return check


def number(lo: float, hi: float) -> Check:
    def check(field: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamError(field, f"must be a number, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise ParamError(field, f"must be in range {lo:g}..{hi:g}, got {value}")
        return value

    return check


def boolean() -> Check:
    def check(field: str, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ParamError(field, f"must be a boolean, got {type(value).__name__}")
        return value

    return check


def url() -> Check:
    def check(field: str, value: Any) -> Any:
        string()(field, value)
        if not re.match(r"^https?://[^\s/]+", value):
            raise ParamError(field, "must be an http(s) URL")
        return value

    return check


def size_range(lo: int, hi: int) -> Check:
    def check(field: str, value: Any) -> Any:
        string()(field, value)
        match = _SIZE_RE.match(value)
        if not match:
            raise ParamError(field, f"must look like WIDTH*HEIGHT, got {value!r}")
        width, height = int(match[1]), int(match[2])
        if not (lo <= width <= hi and lo <= height <= hi):
            raise ParamError(field, f"each dimension must be in range {lo}..{hi}, got {value}")
        return value

    return check


@dataclass(frozen=True, slots=True)
class Param:
    check: Check
    required: bool = False
    default: Any = None


@dataclass(frozen=True, slots=True)
class ModelRules:
    model_id: str
    kind: Kind
    params: Mapping[str, Param]

    def validate(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Check every known parameter; unknown ones are ignored, as the live API does."""
        out: dict[str, Any] = {}
        for name, param in self.params.items():
            if name not in body or body[name] is None:
                if param.required:
                    raise ParamError(name, "is required")
                if param.default is not None:
                    out[name] = param.default
                continue
            out[name] = param.check(name, body[name])
        return out


SEED = Param(integer(-1, SEED_MAX), default=-1)
VIDEO_SIZE = string(choices=("1280*720", "720*1280"))


def _image_21_rules() -> ModelRules:
    return ModelRules(
        model_id="wavespeed-ai/hunyuan-image-2.1",
        kind="image",
        params={
            "prompt": Param(string(), required=True),
            "size": Param(size_range(256, 1536), default="1024*1024"),
            # The live page moved to separate width/height; both forms are accepted.
            "width": Param(integer(256, 1536)),
            "height": Param(integer(256, 1536)),
            "seed": SEED,
            "output_format": Param(string(choices=("jpeg", "png", "webp")), default="jpeg"),
            "enable_sync_mode": Param(boolean(), default=False),
            "enable_base64_output": Param(boolean(), default=False),
        },
    )


WAVESPEED_MODELS: dict[str, ModelRules] = {
    rules.model_id: rules
    for rules in (
        _image_21_rules(),
        ModelRules(
            model_id="wavespeed-ai/hunyuan-video/i2v",
            kind="video",
            params={
                "prompt": Param(string()),
                "image": Param(url(), required=True),
                "num_inference_steps": Param(integer(1, 30), default=30),
                "duration": Param(integer(5, 10), default=5),
                "seed": SEED,
                "size": Param(VIDEO_SIZE, default="1280*720"),
                "enable_safety_checker": Param(boolean(), default=True),
                "enable_sync_mode": Param(boolean(), default=False),
            },
        ),
        ModelRules(
            model_id="wavespeed-ai/hunyuan-video/t2v",
            kind="video",
            params={
                "prompt": Param(string(), required=True),
                "size": Param(VIDEO_SIZE, default="1280*720"),
                "seed": SEED,
                "num_inference_steps": Param(integer(2, 30), default=30),
                "enable_sync_mode": Param(boolean(), default=False),
            },
        ),
        ModelRules(
            model_id="wavespeed-ai/hunyuan3d/v2.1",
            kind="mesh",
            params={
                "image": Param(url(), required=True),
                "enable_sync_mode": Param(boolean(), default=False),
            },
        ),
    )
}


AIMLAPI_MODEL = "hunyuan/hunyuan-image-v3-text-to-image"
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (768, 1280),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1280, 768),
}
# The schema sets no bound on an explicit width/height; the emulator caps them so a
# request cannot make it render a gigapixel image.
_MAX_CUSTOM_SIDE = 4096


def _image_size(field: str, value: Any) -> Any:
    if isinstance(value, str):
        return string(choices=tuple(IMAGE_SIZE_PRESETS))(field, value)
    if isinstance(value, Mapping):
        for side in ("width", "height"):
            if side not in value:
                raise ParamError(f"{field}.{side}", "is required")
            integer(1, _MAX_CUSTOM_SIDE, integral_number=True)(f"{field}.{side}", value[side])
        return {"width": int(value["width"]), "height": int(value["height"])}
    raise ParamError(field, "must be a preset name or an object {width, height}")


AIMLAPI_RULES = ModelRules(
    model_id=AIMLAPI_MODEL,
    kind="image",
    params={
        "model": Param(string(choices=(AIMLAPI_MODEL,)), required=True),
        "prompt": Param(string(max_len=4000), required=True),
        "num_images": Param(integer(1, 4, integral_number=True), default=1),
        "seed": Param(integer(1)),
        "negative_prompt": Param(string()),
        "image_size": Param(_image_size, default="square_hd"),
        "num_inference_steps": Param(integer(1, 50), default=28),
        "guidance_scale": Param(number(1, 20), default=7.5),
        "enable_safety_checker": Param(boolean(), default=True),
        "sync_mode": Param(boolean(), default=False),
        "output_format": Param(string(choices=("jpeg", "png")), default="png"),
        "enable_prompt_expansion": Param(boolean()),
    },
)


def output_size(params: Mapping[str, Any], default: str) -> tuple[int, int]:
    """Width and height asked for: ``size``, ``width``/``height`` or ``image_size``."""
    if "image_size" in params:
        size = params["image_size"]
        if isinstance(size, str):
            return IMAGE_SIZE_PRESETS[size]
        return int(size["width"]), int(size["height"])
    if "width" in params and "height" in params:
        return int(params["width"]), int(params["height"])
    width, _, height = str(params.get("size", default)).partition("*")
    return int(width), int(height)
