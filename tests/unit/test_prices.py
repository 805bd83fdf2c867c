"""Prices as configuration, and estimates that never count an unknown price as zero."""

from __future__ import annotations

import pytest
import yaml

from pipelines import spec as specs
from pipelines.catalog import MODELS
from pipelines.errors import ConfigError, SpecError
from pipelines.prices import estimate, load_prices, parse_prices

pytestmark = pytest.mark.unit

PIPELINE = specs.parse_text(
    """
name: p
inputs: {n: {type: integer, default: 2}}
stages:
  img:
    model: hunyuan/hunyuan-image-v3-text-to-image
    input: {prompt: x, num_images: "${inputs.n}"}
  vid:
    model: wavespeed-ai/hunyuan-video/i2v
    input: {image: "${stages.img.outputs[0]}", duration: 10}
    retry: {attempts: 3}
  mesh:
    model: wavespeed-ai/hunyuan3d/v2.1
    input: {image: "${stages.img.outputs[0]}"}
""",
    where="p.yaml",
)
TABLE = parse_prices(
    yaml.safe_load(
        """
models:
  hunyuan/hunyuan-image-v3-text-to-image: {usd: 0.03, times: num_images}
  wavespeed-ai/hunyuan-video/i2v: {usd: 0.40, when: {duration: {10: 0.80}}}
"""
    ),
    "t.yaml",
)


def test_the_shipped_table_names_every_model_and_knows_only_the_published_price() -> None:
    table = load_prices()
    assert set(table.models) == set(MODELS)
    known = {m: p.usd for m, p in table.models.items() if p.usd is not None}
    assert known == {"wavespeed-ai/hunyuan-video/i2v": 0.40}


def test_an_estimate_prices_by_parameter_spends_every_retry_and_names_the_unknown() -> None:
    e = estimate(PIPELINE, {}, TABLE)
    img = e["stages"]["img"]
    assert (img["usd"], img["attempts_at_most"], img["worst_case_usd"]) == (0.06, 1, 0.06)
    assert e["stages"]["vid"]["usd"] == 0.80 and e["stages"]["vid"]["worst_case_usd"] == 2.40
    assert e["stages"]["mesh"]["usd"] is None and e["unknown"] == ["mesh"]
    assert e["expected_usd"] == 0.86 and e["worst_case_usd"] == 2.46 and not e["complete"]
    # Inputs change the price; the model's own default applies where the spec is silent.
    assert estimate(PIPELINE, {"n": 4}, TABLE)["stages"]["img"]["usd"] == 0.12


def test_bad_inputs_and_bad_tables_are_named() -> None:
    with pytest.raises(SpecError, match=r"f.yaml: inputs.n: must be an integer"):
        estimate(PIPELINE, {"n": "x"}, TABLE, where="f.yaml")
    with pytest.raises(ConfigError, match=r"t.yaml: models.m.usd: must be a price"):
        parse_prices({"models": {"m": {"usd": -1}}}, "t.yaml")
    with pytest.raises(ConfigError, match=r"models.m: must be a mapping of usd, when, times"):
        parse_prices({"models": {"m": {"cost": 1}}}, "t.yaml")
    with pytest.raises(ConfigError, match="PRICES_FILE: cannot read /nonexistent"):
        load_prices("/nonexistent/prices.yaml")
