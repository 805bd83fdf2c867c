"""Parsing a provider's prediction object, and deciding each provider's access."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest

from pipelines.providers import Prediction, ProviderAccess, parse_prediction
from pipelines.secrets import Secret

GOOD = {"id": "t1", "status": "completed", "outputs": ["https://x/y.png"], "error": ""}


def test_a_prediction_is_read_from_any_mapping() -> None:
    expected = Prediction("t1", "completed", ("https://x/y.png",), "")
    assert parse_prediction(dict(GOOD)) == expected
    assert parse_prediction(MappingProxyType(dict(GOOD))) == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([GOOD], "prediction must be a JSON object"),
        ({**GOOD, "id": ""}, "prediction.id must be a non-empty string"),
        ({**GOOD, "id": "x" * 201}, "prediction.id must be a non-empty string"),
        ({**GOOD, "status": 3}, "prediction.status must be a non-empty string"),
        ({**GOOD, "outputs": "https://x/y.png"}, "prediction.outputs must be a list of strings"),
        ({**GOOD, "outputs": ["https://x/y.png", 7]}, "prediction.outputs must be a list"),
        ({**GOOD, "outputs": []}, "a completed prediction must have outputs"),
    ],
)
def test_a_malformed_prediction_is_refused_naming_what_is_wrong(data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_prediction(data)


def test_a_non_text_error_is_kept_as_text_and_capped() -> None:
    failed = parse_prediction({"id": "t1", "status": "failed", "error": {"code": 1}})
    assert failed.error == "{'code': 1}" and failed.outputs == ()
    assert len(parse_prediction({**GOOD, "error": "e" * 5000}).error) == 2000


@pytest.mark.parametrize(
    ("key", "base_url", "mode"),
    [
        ("k", "https://api.wavespeed.ai", "live"),
        ("k", "http://127.0.0.1:8900", "live"),
        (None, "http://127.0.0.1:8900", "emulator"),
        (None, "http://localhost:8900", "emulator"),
        (None, "http://[::1]:8900", "emulator"),
        (None, "http://127.8.0.1:8900", "emulator"),
        (None, "https://api.wavespeed.ai", "off"),
        (None, "https://wavespeed-proxy.example.com", "off"),  # a real proxy: no placeholder
        (None, "http://10.0.0.5:8900", "off"),
    ],
)
def test_the_placeholder_key_is_only_for_a_loopback_emulator(
    key: str | None, base_url: str, mode: str
) -> None:
    """A key makes a provider live; without one only a base URL on this machine gets the
    emulator's placeholder key, and any other URL leaves the provider off."""
    access = ProviderAccess.resolve(
        "wavespeed", key=Secret(key) if key else None, base_url=base_url,
        key_variable="WAVESPEED_API_KEY",
    )  # fmt: skip
    assert access.mode == mode
    assert (access.key is None) == (mode == "off")
