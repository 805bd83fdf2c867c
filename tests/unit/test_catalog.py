"""The catalog and the emulator, written independently, know the same models."""

from __future__ import annotations

from emulator.rules import AIMLAPI_RULES, WAVESPEED_MODELS
from pipelines.catalog import MODELS


def test_every_catalog_model_is_emulated_with_the_same_parameters_and_output() -> None:
    """A model added to the catalog must be taught to the emulator (and back), or the demo
    and the tests could not run it; each parameter wavechain may send is one the emulator
    checks, and both agree on the kind of output."""
    emulated = {**WAVESPEED_MODELS, AIMLAPI_RULES.model_id: AIMLAPI_RULES}
    assert set(MODELS) == set(emulated)
    for model_id, model in MODELS.items():
        rules = emulated[model_id]
        assert set(model.params) <= set(rules.params) | {"model"}, model_id
        assert model.output == rules.kind, model_id
        assert (model.provider == "aimlapi") == (model_id == AIMLAPI_RULES.model_id)
