"""The result cache's rules: which stages may be served from an earlier run, and the key
that says "the same output". Pure: the engine reads digests and entries, the store keeps
entries, and this module decides.

A stage is served from the cache when it opted in (``cache: true``, or RESULT_CACHE=on
and not ``cache: false``) and an earlier succeeded stage had the same key:

- the same model;
- the same fully rendered input, the provider's defaults filled in, with every upstream
  output standing for the sha256 of its content (not its URL, which changes per run);
- a fixed seed: a model with a ``seed`` parameter must be given one that is not -1 (its
  random default) and not left out. A model with no seed parameter (Hunyuan3D) is taken
  as deterministic in its input;
- the same quality checks (a stage that checks more is not served what was checked less).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.catalog import ModelSpec
from pipelines.spec import StageSpec, render

#: The version of the key's recipe: a change to it must not match older entries.
KEY_VERSION = 1


def wants_cache(stage: StageSpec, *, default: bool) -> bool:
    """The stage's own ``cache`` setting, else the global one."""
    return default if stage.cache is None else stage.cache


def content_url(sha256: str) -> str:
    """What an upstream output stands for in a key: its content, as a URL a stage's
    parameter check accepts."""
    return f"https://sha256.invalid/{sha256}"


def unfixed_seed(model: ModelSpec, body: Mapping[str, Any]) -> str | None:
    """Why the rendered ``body`` may give a different output each time, or None."""
    if "seed" not in model.params:
        return None
    seed = body.get("seed", model.params["seed"].default)
    if seed is None:
        return "no seed given (the model picks one at random)"
    if seed == -1:
        return "seed -1 (random)"
    return None


def cache_key(
    stage: StageSpec,
    model: ModelSpec,
    inputs: Mapping[str, Any],
    upstream_digests: Mapping[str, Sequence[str]],
) -> tuple[str | None, str]:
    """(the key, "") when the stage's output is determined by what it is given, else
    (None, why not). Raises ``SpecError`` as ``render`` does."""
    outputs = {
        name: [content_url(d) for d in digests] for name, digests in upstream_digests.items()
    }
    body = render(stage, inputs, outputs, where="cache")
    for param, decl in model.params.items():
        if param not in body and decl.default is not None:
            body[param] = decl.default
    if why := unfixed_seed(model, body):
        return None, why
    # The checks its outputs passed are part of it: a stage that checks more is not served
    # an output that was checked less.
    canonical = json.dumps(
        {"v": KEY_VERSION, "model": model.id, "input": body, "checks": sorted(stage.checks)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest(), ""
