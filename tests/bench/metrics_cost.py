"""What Prometheus metrics cost the receiver (issue 24): this tree against the last commit
without them, both under load at the same time (``ab.together``: sequential runs here
swing more than the difference), and instructions per delivery under valgrind
(repeatable within a fraction of a percent) where valgrind is installed.

The older side is a `git worktree` of ``BEFORE``, so the comparison needs the
repository's history (a clone has it). Every change since that commit is measured along:
the figures say what the receiver costs now against then, metrics being the change to the
webhook path in between (`git log 982838d..HEAD -- service/webhooks.py`).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.bench import ab

#: The last commit before metrics (the dashboard's).
BEFORE = "982838d"
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def _worktree(commit: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="wavechain-before-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
                       check=True, capture_output=True)  # fmt: skip
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                           check=False, capture_output=True)  # fmt: skip


def metrics_cost(work: Path) -> dict[str, Any]:
    del work  # ab keeps its own scratch folders
    with _worktree(BEFORE) as before:
        result: dict[str, Any] = {"before": BEFORE}
        result["together"] = ab.together(str(before), str(ROOT), reps=7, seconds=6)
        if shutil.which("valgrind"):
            result["k_instructions_before"] = ab.instructions(str(before))
            result["k_instructions_now"] = ab.instructions(str(ROOT))
    return result


def markdown(r: dict[str, Any]) -> list[str]:
    t = r["together"]
    lines = [
        "## 7. The cost of metrics",
        "",
        "The receiver (INFO, SQLite) of this tree, which counts every delivery and times it",
        f"for `/metrics`, against commit `{r['before']}`, the last without metrics, both",
        "under load at the same time from one wrk each, 7 repetitions of 6 s.",
        "",
        "| | deliveries/s (median) | this tree / before |",
        "|---|---:|---:|",
        f"| before metrics (`{r['before']}`) | {t['a_rps_median']:,} | |",
        f"| this tree | {t['b_rps_median']:,} | {t['ratio_median']} "
        f"(repetitions {min(t['ratios'])}-{max(t['ratios'])}) |",
        "",
        f"CPU per delivery, this tree over before: {t['cpu_ratio_median']}.",
    ]
    if "k_instructions_now" in r:
        b, n = r["k_instructions_before"], r["k_instructions_now"]
        total_b = b["loop"] + b["other_threads"]
        total_n = n["loop"] + n["other_threads"]
        lines += [
            f"Instructions per delivery (valgrind): {total_b:.1f} k before, {total_n:.1f} k now "
            f"({(total_n / total_b - 1) * 100:+.1f} %; event loop {b['loop']} → {n['loop']} k).",
        ]
    lines += [
        "",
        "Reproduce: `.venv/bin/python -m tests.bench metrics` (about 3 minutes).",
        "",
    ]
    return lines
