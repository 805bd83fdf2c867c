"""`make bench`: each benchmark beside its baseline in the same run; medians and ratios.

Writes tests/bench/RESULTS.md (committed) and tests/bench/results.json (raw numbers).
Run one with `python -m tests.bench receiver` (or handoff, pipeline, mirror, events, scale,
metrics, cache, governor).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.bench import benches, cache, governor, metrics_cost, pipeline, scale

HERE = Path(__file__).parent
ALL: dict[str, Callable[[Path], dict[str, Any]]] = {
    "receiver": benches.receiver,
    "handoff": benches.handoff,
    "pipeline": pipeline.pipeline,
    "mirror": benches.mirror,
    "events": benches.events,
    "scale": scale.scale,
    "metrics": metrics_cost.metrics_cost,
    "cache": cache.cache,
    "governor": governor.governor,
}


def main(argv: list[str]) -> int:
    names = argv or list(ALL)
    results: dict[str, Any] = {}
    work = HERE / "out"
    # Every run starts from nothing: a store, log or delivery file left by an earlier run
    # would be measured along (the hand-rolled receiver's table grew to 1.4 GB over three).
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    started = time.monotonic()
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        results[name] = ALL[name](work)
        results[name]["wall_s"] = round(time.monotonic() - t0, 1)
        results[name]["date"] = datetime.now(UTC).isoformat(timespec="minutes")
        results[name]["machine"] = benches.machine()
        print(json.dumps(results[name], indent=1), flush=True)
    meta = {"machine": benches.machine(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "total_s": round(time.monotonic() - started, 1)}  # fmt: skip
    previous = (
        json.loads((HERE / "results.json").read_text()) if (HERE / "results.json").exists() else {}
    )
    merged = {**previous.get("results", {}), **results}
    (HERE / "results.json").write_text(json.dumps({"meta": meta, "results": merged}, indent=1))
    (HERE / "RESULTS.md").write_text(benches.markdown(meta, merged))
    print((HERE / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
