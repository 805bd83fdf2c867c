"""The terminal's views: a table of runs, a run as the tree of its stages."""

from __future__ import annotations

import re
from typing import Any

import pytest

from service.views import duration, pipelines_table, runs_table, stage_tree

pytestmark = pytest.mark.unit
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat()


def _stage(name: str, needs: list[str], status: str = "succeeded", **extra: Any) -> dict[str, Any]:
    return {
        "name": name, "model": f"m/{name}", "needs": needs, "status": status, "attempt": 1,
        "task_id": f"task-{name}", "outputs": [], "provider_outputs": [f"https://cdn/{name}.bin"],
        "mirrored_outputs": [f"s3://b/runs/r1/{name}/0.bin"], "error": None,
        "timings": {"submitted_at": _iso(T0 + 1), "finished_at": _iso(T0 + 3), "elapsed_s": 2.0},
        **extra,
    }  # fmt: skip


def _run(stages: list[dict[str, Any]], status: str = "succeeded", **extra: Any) -> dict[str, Any]:
    return {
        "id": "run_1", "pipeline": "p", "status": status, "inputs": {},
        "created_at": _iso(T0), "updated_at": _iso(T0 + 65), "stages": stages, **extra,
    }  # fmt: skip


def test_durations_are_short() -> None:
    assert [duration(s) for s in (1.234, 42, 185, 7440, 3 * 86400 + 7200, None)] == [
        "1.23s", "42s", "3m05s", "2h04m", "3d02h", "—",
    ]  # fmt: skip


def test_the_runs_table_is_aligned_and_says_what_it_does_not_know() -> None:
    runs = [
        _run([_stage("a", []), _stage("b", ["a"], status="processing")], status="running"),
        _run([_stage("a", [])], cost_usd=0.4) | {"id": "run_a_much_longer_id", "pipeline": "pp"},
    ]
    text = runs_table(runs, now=T0 + 600)
    lines = text.splitlines()
    assert lines[0].split() == ["RUN", "STATUS", "PIPELINE", "STAGES", "AGE", "DURATION", "COST"]
    # Each column starts at the same character on every line.
    for header in ("STATUS", "PIPELINE", "STAGES", "AGE", "DURATION", "COST"):
        col = re.search(rf"\b{header}\b", lines[0]).start()  # type: ignore[union-attr]
        assert all(line[col - 2 : col] == "  " and line[col] != " " for line in lines[1:]), header
    assert "1/2" in lines[1] and "10m00s" in lines[1]  # running: its duration so far
    assert "1m05s" in lines[2] and "$0.40" in lines[2]
    assert lines[1].rstrip().endswith("—")  # an unknown cost is never shown as zero
    assert runs_table([], now=T0) == "no runs"


def test_the_tree_draws_a_chain_a_fan_out_and_a_fan_in() -> None:
    run = _run(
        [
            _stage("image", []),
            _stage("video", ["image"]),
            _stage("mesh", ["image"], status="failed", error="bad mesh"),
            _stage("join", ["mesh", "video"], status="pending", task_id=None,
                   mirrored_outputs=[], provider_outputs=[],
                   timings={"submitted_at": None, "finished_at": None, "elapsed_s": None}),
        ]
    )  # fmt: skip
    text = stage_tree(run, now=T0 + 100)
    lines = text.splitlines()
    assert lines[0].startswith("run run_1  p  ✓ succeeded")
    assert "took 1m05s" in lines[1]
    heads = [line for line in lines if "─ " in line]
    assert [h.split("─ ")[1].split()[0] for h in heads] == ["image", "video", "mesh", "join"]
    indent = {h.split("─ ")[1].split()[0]: h.index("─") for h in heads}
    assert indent["image"] < indent["video"] == indent["mesh"] < indent["join"]
    assert "(also needs video)" in next(h for h in heads if "join" in h)
    assert "s3://b/runs/r1/video/0.bin" in text and "task task-video" in text
    assert "error: bad mesh" in text
    assert "attempt 1" in text and "took 2.00s" in text and "cost —" in text


def test_outputs_not_yet_mirrored_are_named_so_and_inline_data_is_not_dumped() -> None:
    stage = _stage(
        "a", [], mirrored_outputs=[], provider_outputs=["data:image/png;base64," + "A" * 5000]
    )
    text = stage_tree(_run([stage]), now=T0)
    assert "data:image/png;base64,… (not yet in S3)" in text and "AAAA" not in text


def test_the_pipelines_table() -> None:
    text = pipelines_table(
        [{"name": "p", "stages": {"a": "m/a", "b": "m/b"},
          "inputs": {"prompt": {"default": "x"}, "seed": {"default": None}}}]
    )  # fmt: skip
    assert re.split(r"\s{2,}", text.splitlines()[1]) == ["p", "a, b", "prompt='x', seed"]


def test_times_are_shown_to_the_second_in_utc() -> None:
    text = stage_tree(_run([_stage("a", [])]), now=T0)
    assert "created 2027-01-15 08:00:00Z" in text and "submitted 2027-01-15 08:00:01Z" in text
