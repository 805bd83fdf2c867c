"""Benchmark 9: the provider governor (issue 26 §1).

200 single-stage runs through two `serve` processes on one PostgreSQL database, against
an emulator that enforces an account's rate like WaveSpeed's (a fixed window; 429 above
it), with the governor set to the same limit (``PER_WINDOW`` per ``WINDOW_S``), and an
interactive run started once the batch is waiting. Baseline, beside it: the limit itself
(what an account at this level can take). Reported: 429s received, runs that succeeded,
submits' rate against the limit, how long the interactive run waited.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.bench.scale import _databases
from tests.support.governed import governed_batch

RUNS = 200
PER_WINDOW = 40
WINDOW_S = 10.0


def governor(work: Path) -> dict[str, Any]:
    folder = work / "governor"
    folder.mkdir(exist_ok=True)
    with _databases() as databases:
        database = asyncio.run(databases.create())
        return governed_batch(folder, database, runs=RUNS, per_window=PER_WINDOW, window_s=WINDOW_S)


def markdown(r: dict[str, Any]) -> list[str]:
    return [
        "## 9. The provider governor",
        "",
        f"{r['runs'] - 1} runs at once, then an interactive one, through two `serve`",
        "processes on one PostgreSQL database, against an emulator enforcing",
        f"{r['per_window']} submits per {r['window_s']:.0f} s (429 above it), the governor set",
        "to the same limit.",
        "",
        "| | figure |",
        "|---|---:|",
        f"| 429s received | {r['throttled_429']} |",
        f"| runs succeeded | {r['runs'] if r['statuses'] == ['succeeded'] else r['statuses']} |",
        f"| provider calls | {r['provider_calls']} |",
        f"| submits took (first to last) | {r['submit_span_s']} s |",
        f"| the limit allows them in | {r['at_the_limit_s']} s |",
        f"| rate / limit | {r['ratio_to_limit']} |",
        f"| interactive run: created to submitted | {r['interactive_wait_s']} s "
        f"(one window: {r['window_s']:.0f} s) |",
        f"| batch tasks it went ahead of | {r['batch_left_when_interactive_went']} |",
        "",
        "The rate is a little under the limit by design: the governor counts a window 2 %",
        "(at least 0.5 s) longer than the provider's, so that a submit in transit cannot",
        "land one too many in a provider window, and a freed slot is seen at the workers'",
        "next poll (0.5 s).",
        "",
        "Reproduce: `.venv/bin/python -m tests.bench governor` (about a minute).",
        "",
    ]
