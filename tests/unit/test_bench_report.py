"""RESULTS.md's paragraph on instructions per delivery is computed from the measured file."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.benches import instruction_lines


def _write(path: Path, k: dict[str, dict[str, float]]) -> Path:
    meta = {"machine": "2 cores (Test CPU)", "date": "2026-12-02T21:30+00:00",
            "commit": "abc1234", "deliveries": 2000}  # fmt: skip
    path.write_text(json.dumps({"meta": meta, "k_per_delivery": k}))
    return path


def test_differences_and_ratios_come_from_the_figures(tmp_path: Path) -> None:
    path = _write(tmp_path / "instructions.json", {
        "verify": {"loop": 396.0, "other_threads": 0.0},
        "record": {"loop": 414.0, "other_threads": 30.0},
        "wavechain_quiet": {"loop": 417.0, "other_threads": 108.0},
        "wavechain": {"loop": 471.0, "other_threads": 109.0},
    })  # fmt: skip
    text = " ".join(instruction_lines(path))
    assert "verify-only 396 k;" in text
    assert "hand-rolled 414 + 30 k;" in text
    assert "at INFO 471 + 109 k." in text
    assert "effect: 79 k more" in text  # the writer: 109 - 30
    assert "access line on the loop (54 k)" in text  # INFO's loop over WARNING's
    assert "otherwise costs 3 k more" in text  # WARNING's loop over the hand-rolled one
    assert "0.68 of verify-only at INFO, 0.75 at WARNING" in text  # 396/580, 396/525
    assert "commit abc1234" in text and "2026-12-02T21:30+00:00" in text


def test_no_paragraph_before_the_figures_are_measured(tmp_path: Path) -> None:
    assert instruction_lines(tmp_path / "missing.json") == []
