"""What the terminal shows: a table of runs, and one run as the tree of its stages.

Pure functions of the API's JSON (and the time now), so that they are tested without a
server, and the CLI prints nothing the API does not say.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

MARK = {
    "running": "⟳",
    "pending": "·",
    "submitted": "→",
    "processing": "⟳",
    "succeeded": "✓",
    "failed": "✗",
    "cancelled": "⊘",
}
#: Shown for a cost wavechain does not know (never as zero).
UNKNOWN = "—"


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def when(value: str | None) -> str:
    """An API timestamp to the second, in UTC: 2026-12-05 05:05:56Z."""
    if not value:
        return UNKNOWN
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def duration(seconds: float | None) -> str:
    """1.52s, 42s, 3m05s, 2h04m, 3d02h: short and sortable by eye."""
    if seconds is None:
        return UNKNOWN
    if seconds < 10:
        return f"{seconds:.2f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def cost(value: Any) -> str:
    return f"${value:.2f}" if isinstance(value, int | float) else UNKNOWN


def run_cost(run: dict[str, Any]) -> str:
    """A run's cost: exact, or "≥ $X" when part of it has no known price, or unknown."""
    if isinstance(run.get("cost_usd"), int | float):
        return cost(run["cost_usd"])
    known = run.get("cost_known_usd")
    return f"≥{cost(known)}" if isinstance(known, int | float) and known > 0 else UNKNOWN


def _run_seconds(run: dict[str, Any], now: float) -> float | None:
    created = _ts(run.get("created_at"))
    if created is None:
        return None
    end = now if run["status"] == "running" else _ts(run.get("updated_at"))
    return None if end is None else max(0.0, end - created)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell (counted in characters), two spaces apart."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def runs_table(runs: Sequence[dict[str, Any]], now: float) -> str:
    """One line per run: id, status, pipeline, stages done, age, duration, cost."""
    if not runs:
        return "no runs"
    rows = []
    for run in runs:
        stages = run["stages"]
        done = sum(1 for s in stages if s["status"] == "succeeded")
        created = _ts(run.get("created_at"))
        rows.append(
            [
                run["id"],
                f"{MARK.get(run['status'], '?')} {run['status']}",
                run["pipeline"],
                f"{done}/{len(stages)}",
                duration(now - created) if created is not None else UNKNOWN,
                duration(_run_seconds(run, now)),
                run_cost(run),
            ]
        )
    headers = ["RUN", "STATUS", "PIPELINE", "STAGES", "AGE", "DURATION", "COST"]
    return table(headers, rows)


def _parent(stage: dict[str, Any], order: dict[str, int]) -> str | None:
    """The stage a tree draws this one under: the latest of those it needs."""
    needs = [n for n in stage.get("needs", []) if n in order]
    return max(needs, key=order.__getitem__) if needs else None


def stage_tree(run: dict[str, Any], now: float) -> str:
    """The run's heading, then its stages as a tree (each under the latest stage it needs,
    naming the others), each with status, model, attempt, timings, cost, task id, error
    and the S3 keys of its outputs (the provider's URLs while they are not mirrored)."""
    stages = run["stages"]
    order = {s["name"]: i for i, s in enumerate(stages)}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for stage in stages:
        children.setdefault(_parent(stage, order), []).append(stage)
    created = when(run.get("created_at"))
    lines = [
        f"run {run['id']}  {run['pipeline']}  {MARK.get(run['status'], '?')} {run['status']}",
        f"  created {created}  took {duration(_run_seconds(run, now))}  "
        f"cost {run_cost(run)}"
        + (f" of {cost(run['budget_usd'])} budget" if run.get("budget_usd") is not None else "")
        + (f"  deadline {when(run['deadline_at'])}" if run.get("deadline_at") else ""),
    ]

    def walk(parent: str | None, prefix: str) -> None:
        kids = children.get(parent, [])
        for i, stage in enumerate(kids):
            last = i == len(kids) - 1
            lines.append(prefix + ("└─ " if last else "├─ ") + _stage_head(stage, parent))
            inner = prefix + ("   " if last else "│  ")
            detail = inner + ("│  " if children.get(stage["name"]) else "   ")
            lines.extend(detail + text for text in _stage_details(stage, now))
            walk(stage["name"], inner)

    walk(None, "")
    return "\n".join(lines)


def _stage_head(stage: dict[str, Any], parent: str | None) -> str:
    also = [n for n in stage.get("needs", []) if n != parent]
    needs = f"  (also needs {', '.join(also)})" if also else ""
    status = f"{MARK.get(stage['status'], '?')} {stage['status']}"
    if stage.get("cached"):
        status += " (cached)"
    return f"{stage['name']}  {status}  {stage['model']}{needs}"


def _stage_details(stage: dict[str, Any], now: float) -> list[str]:
    timings = stage.get("timings") or {}
    submitted = timings.get("submitted_at")
    elapsed = timings.get("elapsed_s")
    if elapsed is None and submitted and stage["status"] in ("submitted", "processing"):
        elapsed = now - (_ts(submitted) or now)
    out = [
        f"attempt {stage['attempt']}  submitted {when(submitted)}  "
        f"took {duration(elapsed)}  cost {cost(stage.get('cost_usd'))}"
    ]
    if stage.get("task_id"):
        out.append(f"task {stage['task_id']}")
    if stage.get("error"):
        out.append(f"error: {stage['error']}")
    mirrored = stage.get("mirrored_outputs") or []
    for url in mirrored or stage.get("provider_outputs") or []:
        out.append(url if mirrored else f"{_short(url)} (not yet in S3)")
    return out


def _short(url: str) -> str:
    """A provider URL for a terminal: inline data is shown by its kind, never dumped."""
    if url.startswith("data:"):
        return url.split(",", 1)[0] + ",…"
    return url if len(url) <= 120 else url[:117] + "…"


def pipelines_table(pipelines: Sequence[dict[str, Any]]) -> str:
    """One line per bundled pipeline: its name, stages and inputs (with their defaults)."""
    rows = []
    for p in pipelines:
        inputs = ", ".join(
            name + ("" if d.get("default") is None else f"={d['default']!r}")
            for name, d in p["inputs"].items()
        )
        rows.append([p["name"], ", ".join(p["stages"]), inputs or UNKNOWN])
    return table(["PIPELINE", "STAGES", "INPUTS"], rows) if rows else "no pipelines"


def estimate_table(e: dict[str, Any]) -> str:
    """A run's estimate: each stage's price per attempt and at worst, then the totals and
    which prices are unknown."""
    rows = [
        [name, s["model"], cost(s["usd"]), str(s["attempts_at_most"]), cost(s["worst_case_usd"])]
        for name, s in e["stages"].items()
    ]
    lines = [table(["STAGE", "MODEL", "PER ATTEMPT", "ATTEMPTS", "WORST CASE"], rows)]
    known = "" if e["complete"] else " (of the known prices)"
    lines.append(
        f"total: {cost(e['expected_usd'])}, {cost(e['worst_case_usd'])} with every retry "
        f"spent{known}"
    )
    if e["unknown"]:
        lines.append(f"unknown prices: {', '.join(e['unknown'])} (set them in PRICES_FILE)")
    return "\n".join(lines)


def spend_table(report: dict[str, Any]) -> str:
    """What was spent since a time, by day, pipeline or model, and the total."""
    rows = [
        [
            str(g["key"]),
            cost(g["usd"]) + (f" +{g['unknown']} unpriced" if g["unknown"] else ""),
            str(g["attempts"]),
        ]
        for g in report["groups"]
    ]
    lines = [table([report["by"].upper(), "SPENT", "ATTEMPTS"], rows)] if rows else []
    unpriced = (
        f", {report['unknown']} attempt(s) without a known price" if report["unknown"] else ""
    )
    lines.append(
        f"total since {when(report['since'])}: {cost(report['total_usd'])} over "
        f"{report['attempts']} attempt(s){unpriced}"
    )
    return "\n".join(lines)
