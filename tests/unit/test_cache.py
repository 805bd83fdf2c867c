"""The result cache's rules (pipelines/cache.py): what makes two stages "the same"."""

from __future__ import annotations

from typing import Any

import pytest

from pipelines import spec as specs
from pipelines.cache import cache_key, unfixed_seed, wants_cache
from pipelines.catalog import get_model
from pipelines.errors import SpecError

IMG, I2V, MESH = (
    "wavespeed-ai/hunyuan-image-2.1",
    "wavespeed-ai/hunyuan-video/i2v",
    "wavespeed-ai/hunyuan3d/v2.1",
)


def stage(model: str, params: dict[str, Any], **extra: Any) -> specs.StageSpec:
    upstream = {"img": {"model": IMG, "input": {"prompt": "p", "seed": 1}}}
    doc = {"stages": {**upstream, "s": {"model": model, "input": params, **extra}}}
    return specs.parse(doc, where="t").stages["s"]


def key(s: specs.StageSpec, digests: dict[str, list[str]] | None = None) -> str | None:
    model = get_model(s.model)
    assert model is not None
    return cache_key(s, model, {}, digests or {})[0]


def test_the_same_input_and_seed_make_the_same_key_and_anything_else_another() -> None:
    a = key(stage(IMG, {"prompt": "a fox", "seed": 7}))
    assert a is not None and a == key(stage(IMG, {"prompt": "a fox", "seed": 7}))
    assert a != key(stage(IMG, {"prompt": "a fox", "seed": 8}))
    assert a != key(stage(IMG, {"prompt": "a cat", "seed": 7}))


def test_a_default_given_or_left_out_is_the_same_key() -> None:
    plain = key(stage(IMG, {"prompt": "x", "seed": 7}))
    assert plain == key(stage(IMG, {"prompt": "x", "seed": 7, "size": "1024*1024"}))


@pytest.mark.parametrize(
    ("params", "why"),
    [({"prompt": "x"}, "seed -1 (random)"), ({"prompt": "x", "seed": -1}, "seed -1 (random)")],
)
def test_a_random_seed_is_never_cached(params: dict[str, Any], why: str) -> None:
    s = stage(IMG, params)
    model = get_model(IMG)
    assert model is not None
    assert cache_key(s, model, {}, {}) == (None, why)
    aiml = get_model("hunyuan/hunyuan-image-v3-text-to-image")
    assert aiml is not None and unfixed_seed(aiml, {"prompt": "x"}) is not None


def test_upstream_outputs_count_by_content_not_by_url() -> None:
    s = stage(I2V, {"image": "${stages.img.outputs[0]}", "seed": 1})
    one = key(s, {"img": ["a" * 64]})
    assert one is not None and one == key(s, {"img": ["a" * 64]})
    assert one != key(s, {"img": ["b" * 64]})


def test_a_model_without_a_seed_is_keyed_by_its_input() -> None:
    mesh = stage(MESH, {"image": "${stages.img.outputs[0]}"})
    assert key(mesh, {"img": ["c" * 64]}) is not None


def test_a_stage_opts_in_or_out_over_the_global_setting() -> None:
    assert wants_cache(stage(IMG, {"prompt": "x"}, cache=True), default=False)
    assert not wants_cache(stage(IMG, {"prompt": "x"}, cache=False), default=True)
    assert wants_cache(stage(IMG, {"prompt": "x"}), default=True)
    with pytest.raises(SpecError, match="cache: must be true or false"):
        stage(IMG, {"prompt": "x"}, cache="yes")


def test_stages_with_other_checks_do_not_share_outputs() -> None:
    checked = key(stage(IMG, {"prompt": "x", "seed": 7}))
    assert checked != key(stage(IMG, {"prompt": "x", "seed": 7}, checks="off"))
    assert checked == key(stage(IMG, {"prompt": "x", "seed": 7}, checks="on"))
