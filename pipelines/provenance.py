"""Provenance: a JSON manifest beside each mirrored output (``{key}.json``, e.g.
``runs/R/video/0.mp4.json``) saying where it came from, and the walk back from any
output to the prompt that started it (``wavechain lineage``). Pure: the engine writes the
manifests, the CLI reads them.

A manifest holds the output's sha256 and size; the model, provider and provider task id;
the input exactly as sent (upstream outputs named by their S3 copies), its seed; the
sha256 of every input media it was made from, with that media's own location (whose
manifest continues the walk); the pipeline's name and version (a digest of its spec); the
run, stage and attempt; timings and cost. A stage served from the result cache gets a
manifest too, naming the output it was copied from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipelines.spec import Pipeline
from pipelines.transitions import iso

VERSION = 1
#: How far ``lineage`` walks (a pipeline's stages are far fewer).
MAX_DEPTH = 100


def manifest_uri(output_uri: str) -> str:
    return f"{output_uri}.json"


def pipeline_version(pipeline: Pipeline) -> str:
    """A digest of the pipeline's spec: two runs with the same version ran the same spec."""
    text = json.dumps(pipeline.source, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def media_inputs(
    params: Mapping[str, Any], upstream: Mapping[str, Sequence[str]], digests: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The input media among ``params``: each parameter whose value is an upstream
    stage's output, with its stage, index, location and sha256."""
    found = []
    for param, value in params.items():
        for stage, uris in upstream.items():
            if isinstance(value, str) and value in uris:
                found.append(
                    {
                        "param": param,
                        "stage": stage,
                        "output": uris.index(value),
                        "uri": value,
                        "sha256": digests.get(value),
                    }
                )
    return found


def manifest(
    *,
    output: Mapping[str, Any],
    run_id: str,
    pipeline: Pipeline,
    stage: str,
    attempt: int,
    model: str,
    provider: str,
    task_id: str | None,
    params: Mapping[str, Any],
    inputs: list[dict[str, Any]],
    submitted_at: float | None,
    completed_at: float,
    cost_usd: float | None,
    reported_seed: int | None = None,
    cached_from: str | None = None,
) -> dict[str, Any]:
    return {
        "version": VERSION,
        "output": dict(output),
        "run_id": run_id,
        "pipeline": {"name": pipeline.name, "version": pipeline_version(pipeline)},
        "stage": stage,
        "attempt": attempt,
        "model": model,
        "provider": provider,
        "task_id": task_id,
        "input": dict(params),
        # The seed the provider reports it used (what a seed of -1 became), else the one sent.
        "seed": params.get("seed") if reported_seed is None else reported_seed,
        "seed_reported_by_provider": reported_seed is not None,
        "input_media": inputs,
        "timings": {"submitted_at": iso(submitted_at), "completed_at": iso(completed_at)},
        "cost_usd": cost_usd,
        "cached_from": cached_from,
    }


def lineage(
    uri: str, read: Callable[[str], dict[str, Any] | None], *, depth: int = 0
) -> dict[str, Any]:
    """The manifest of ``uri`` with, under ``from``, the lineage of each input media it was
    made from, down to stages made from a prompt alone. ``read`` returns a manifest by
    its URI, or None if there is none (the walk then stops there, saying so)."""
    found = read(manifest_uri(uri))
    if found is None:
        return {"output": {"uri": uri}, "missing": f"no manifest at {manifest_uri(uri)}"}
    if depth >= MAX_DEPTH:
        return {**found, "from": [], "missing": "the walk stopped: too deep"}
    parents = [lineage(m["uri"], read, depth=depth + 1) for m in found.get("input_media", [])]
    return {**found, "from": parents}


def describe(node: Mapping[str, Any], indent: str = "") -> list[str]:
    """A lineage as text, the output first and each input media under it."""
    output = node.get("output", {})
    if "missing" in node and "stage" not in node:
        return [f"{indent}{output.get('uri')}  ({node['missing']})"]
    sha = str(output.get("sha256", ""))[:12]
    cost = node.get("cost_usd")
    lines = [
        f"{indent}{output.get('uri')}  sha256 {sha}…  {output.get('size')} bytes",
        f"{indent}  made by {node.get('model')} (task {node.get('task_id')}) in run "
        f"{node.get('run_id')}, stage {node.get('stage')}, attempt {node.get('attempt')}; "
        f"pipeline {node['pipeline']['name']} {node['pipeline']['version']}; "
        f"cost {'unknown' if cost is None else f'${cost:.2f}'}",
    ]
    if node.get("cached_from"):
        lines.append(f"{indent}  copied from the cache: {node['cached_from']}")
    shown = {k: v for k, v in node.get("input", {}).items() if not _is_media(v, node)}
    lines.append(f"{indent}  input: {json.dumps(shown, sort_keys=True)}")
    for parent in node.get("from", []):
        lines.append(f"{indent}  └─ from:")
        lines += describe(parent, indent + "     ")
    return lines


def _is_media(value: Any, node: Mapping[str, Any]) -> bool:
    return any(value == m.get("uri") for m in node.get("input_media", []))
