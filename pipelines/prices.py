"""Prices per model, as configuration, and what a run would cost before it starts.

The table is YAML (``pipelines/prices.yaml`` by default, ``PRICES_FILE`` to replace it):
per model a price per run, optionally a tier by a parameter's value (``when``) and a
multiplier by a parameter (``times``). A model with no price is *unknown*: estimates name
it and never count it as zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipelines import spec as specs
from pipelines.catalog import get_model
from pipelines.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Price:
    usd: float | None
    when: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    times: str | None = None

    def of(self, params: Mapping[str, Any]) -> float | None:
        """One attempt's price with these (rendered, defaults filled) parameters."""
        usd = self.usd
        for param, tiers in self.when.items():
            value = params.get(param)
            if value is not None and str(value) in tiers:
                usd = tiers[str(value)]
        if usd is None:
            return None
        if self.times is not None:
            factor = params.get(self.times, 1)
            usd *= factor if isinstance(factor, int | float) and not isinstance(factor, bool) else 1
        return usd


@dataclass(frozen=True, slots=True)
class PriceTable:
    models: Mapping[str, Price]

    def price(self, model: str, params: Mapping[str, Any]) -> float | None:
        entry = self.models.get(model)
        return None if entry is None else entry.of(params)

    def attempt(self, model: str, params: Mapping[str, Any]) -> float | None:
        """One attempt's price with a stage's rendered input, the provider's defaults
        filled in where the spec left them out (they can set the price)."""
        spec = get_model(model)
        full = dict(params)
        if spec is not None:
            for param, decl in spec.params.items():
                if param not in full and decl.default is not None:
                    full[param] = decl.default
        return self.price(model, full)


#: No price known for anything.
NO_PRICES = PriceTable({})


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where}: must be a price in USD (a number ≥ 0) or null")
    return float(value)


def parse_prices(doc: Any, where: str) -> PriceTable:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("models"), Mapping):
        raise ConfigError(f"{where}: must be a mapping with `models: {{MODEL: {{usd: …}}}}`")
    models: dict[str, Price] = {}
    for model, raw in doc["models"].items():
        at = f"{where}: models.{model}"
        if not isinstance(raw, Mapping) or set(raw) - {"usd", "when", "times"}:
            raise ConfigError(f"{at}: must be a mapping of usd, when, times")
        when: dict[str, dict[str, float]] = {}
        for param, tiers in (raw.get("when") or {}).items():
            if not isinstance(tiers, Mapping):
                raise ConfigError(f"{at}.when.{param}: must map values to prices")
            when[str(param)] = {
                str(v): p
                for v, usd in tiers.items()
                if (p := _number(usd, f"{at}.when.{param}.{v}")) is not None
            }
        times = raw.get("times")
        if times is not None and not isinstance(times, str):
            raise ConfigError(f"{at}.times: must be a parameter's name")
        models[str(model)] = Price(_number(raw.get("usd"), f"{at}.usd"), when, times)
    return PriceTable(models)


def load_prices(path: str | None = None) -> PriceTable:
    """The table at ``path`` (PRICES_FILE), or the shipped defaults."""
    if path:
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise ConfigError(f"PRICES_FILE: cannot read {path}: {exc.strerror}") from None
        where = path
    else:
        text = (resources.files("pipelines") / "prices.yaml").read_text("utf-8")
        where = "pipelines/prices.yaml"
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not YAML: {exc}") from None
    return parse_prices(doc, where)


def estimate(
    pipeline: specs.Pipeline,
    inputs: Mapping[str, Any],
    table: PriceTable,
    *,
    where: str = "estimate",
) -> dict[str, Any]:
    """Each stage's price per attempt, its attempts at most (its retry policy), and the
    totals: ``expected_usd`` (one attempt each) and ``worst_case_usd`` (every retry spent),
    both over the stages whose price is known; ``unknown`` names the others."""
    bound = specs.bind_inputs(pipeline, inputs, where=where)
    stages: dict[str, Any] = {}
    expected = worst = 0.0
    unknown: list[str] = []
    for name in pipeline.topological:
        stage = pipeline.stages[name]
        params = specs.render(stage, bound, {}, where=where, placeholders=True)
        usd = table.attempt(stage.model, params)
        attempts = stage.retry.attempts
        stages[name] = {
            "model": stage.model,
            "usd": None if usd is None else round(usd, 4),
            "attempts_at_most": attempts,
            "worst_case_usd": None if usd is None else round(usd * attempts, 4),
        }
        if usd is None:
            unknown.append(name)
        else:
            expected += usd
            worst += usd * attempts
    return {
        "pipeline": pipeline.name,
        "currency": "USD",
        "stages": stages,
        "expected_usd": round(expected, 4),
        "worst_case_usd": round(worst, 4),
        "unknown": unknown,
        "complete": not unknown,
    }
