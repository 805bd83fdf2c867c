"""Rows to records. Both backends select the same columns in the same order: a run as
(id, pipeline, status, inputs, created_at, updated_at, deadline_at, budget_usd, priority,
concurrency_key, concurrency_limit), a stage as
(name, model, status, attempt, task_id, outputs, mirrored, error, submitted_at, finished_at,
needs, cached, known cost, attempts of unknown cost), a due stage as
(run_id, name, attempt, task_id, status, hard_deadline, model), a parked event as (seq,
run_id, type, tries, last_error, dead_at, body)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from pipelines.catalog import MODELS, get_model
from pipelines.store.records import CacheEntry, DueStage, RunView, Spent, StageView


def event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def stage_view(row: Any) -> StageView:
    (
        name, model, status, attempt, task_id, outputs, mirrored, error, submitted, finished,
        needs, cached, known_usd, unknown,
    ) = row  # fmt: skip
    return StageView(
        name=name,
        model=model,
        status=status,
        attempt=attempt,
        task_id=task_id,
        outputs=json.loads(outputs),
        mirrored=json.loads(mirrored),
        error=error,
        submitted_at=submitted,
        finished_at=finished,
        needs=json.loads(needs),
        cached=bool(cached),
        spent=Spent(float(known_usd or 0.0), int(unknown or 0)),
    )


def run_view(row: Any, stages: list[StageView]) -> RunView:
    (
        run_id, pipeline, status, inputs, created_at, updated_at, deadline_at, budget_usd,
        priority, key, limit,
    ) = row  # fmt: skip
    return RunView(
        id=run_id,
        pipeline=pipeline,
        status=status,
        inputs=json.loads(inputs),
        created_at=created_at,
        updated_at=updated_at,
        stages=stages,
        deadline_at=deadline_at,
        budget_usd=budget_usd,
        priority=priority,
        concurrency_key=key,
        concurrency_limit=limit,
    )


def due_stage(row: Any, now: float) -> DueStage:
    run_id, stage, attempt, task_id, status, hard_deadline, model = row
    spec = get_model(model)
    return DueStage(
        run_id,
        stage,
        attempt,
        task_id,
        status,
        hard_deadline if hard_deadline is not None else now,
        provider=spec.provider if spec is not None else "unknown",
    )


#: What each stage of some runs has cost: (run_id, stage, known usd, unknown attempts).
SPEND_BY_STAGE = (
    "SELECT run_id, stage, COALESCE(SUM(usd), 0), COUNT(*) - COUNT(usd) FROM spend "
    "WHERE run_id IN ({runs}) GROUP BY run_id, stage"
)


def priced(body: dict[str, Any], spend: Mapping[tuple[str, str], Spent]) -> str:
    """An event's body as JSON, with ``cost_usd``: its stage's cost, or for a run's event
    the run's (None while any part is unknown)."""
    run_id, stage = body["run_id"], body["stage"]
    if stage is not None:
        spent = spend.get((run_id, stage), Spent())
    else:
        parts = [v for (r, _), v in spend.items() if r == run_id]
        spent = Spent(sum(p.known_usd for p in parts), sum(p.unknown for p in parts))
    return json.dumps({**body, "cost_usd": spent.usd})


def cache_entry(row: Any) -> CacheEntry:
    key, run_id, stage, outputs, mirrored = row
    return CacheEntry(key, run_id, stage, tuple(json.loads(outputs)), tuple(json.loads(mirrored)))


def spend_row(row: Any) -> dict[str, Any]:
    key, usd, unknown, attempts = row
    return {
        "key": key,
        "usd": round(float(usd), 6),
        "unknown": int(unknown),
        "attempts": int(attempts),
    }


def parked(row: Any) -> dict[str, Any]:
    seq, run_id, kind, tries, error, dead_at, body = row
    return {
        "seq": seq,
        "run_id": run_id,
        "type": kind,
        "tries": tries,
        "error": error,
        "parked_at": dead_at,
        "body": json.loads(body),
    }


#: A stage's cost columns, correlated with ``stages`` (the same SQL on both backends).
STAGE_SPEND = (
    "(SELECT COALESCE(SUM(p.usd), 0) FROM spend p "
    "WHERE p.run_id = stages.run_id AND p.stage = stages.name), "
    "(SELECT COUNT(*) - COUNT(p.usd) FROM spend p "
    "WHERE p.run_id = stages.run_id AND p.stage = stages.name)"
)
#: A run's columns, as ``run_view`` reads them.
RUN_COLUMNS = (
    "id, pipeline, status, inputs, created_at, updated_at, deadline_at, budget_usd, priority, "
    "concurrency_key, concurrency_limit"
)


# The provider governor's counts (pipelines/governor.py), the same SQL on both backends
# with ``{p}`` placeholders numbered by ``governor_sql``.
_UNRECORDED = (
    "NOT EXISTS (SELECT 1 FROM attempts a WHERE a.run_id = j.run_id AND a.stage = j.stage "
    "AND a.attempt = j.attempt)"
)
#: (provider, since): submits recorded within the window.
GOV_IN_WINDOW = "SELECT COUNT(*) FROM attempts WHERE provider = {p} AND created_at > {p}"
#: (provider, now): claimed submit jobs whose attempt is not recorded yet.
GOV_CLAIMED = (
    "SELECT COUNT(*) FROM jobs j WHERE j.kind = 'submit' AND j.provider = {p} "  # noqa: S608
    f"AND j.lease_until >= {{p}} AND {_UNRECORDED}"
)
#: (provider): submits on their way.
GOV_SENDING = "SELECT COUNT(*) FROM attempts WHERE provider = {p} AND state = 'sending'"
#: (provider, now, limit): due submit jobs, higher priority first, then the longest waiting.
GOV_WAITING = (
    "SELECT id, concurrency_key, concurrency_limit FROM jobs WHERE kind = 'submit' "
    "AND provider = {p} AND run_after <= {p} AND (lease_until IS NULL OR lease_until < {p}) "
    "ORDER BY priority DESC, run_after, id LIMIT {p}"
)
#: (now): tasks in flight (or about to be) by concurrency key, over every provider.
GOV_KEYS = (
    "SELECT key, COUNT(*) FROM ("  # noqa: S608
    "SELECT r.concurrency_key AS key FROM stages s JOIN runs r ON r.id = s.run_id "
    "WHERE s.deadline IS NOT NULL AND r.concurrency_key IS NOT NULL "
    "UNION ALL SELECT r.concurrency_key FROM attempts a JOIN runs r ON r.id = a.run_id "
    "WHERE a.state = 'sending' AND r.concurrency_key IS NOT NULL "
    "UNION ALL SELECT j.concurrency_key FROM jobs j WHERE j.kind = 'submit' "
    f"AND j.concurrency_key IS NOT NULL AND j.lease_until >= {{p}} AND {_UNRECORDED}"
    ") keyed GROUP BY key"
)


def governor_sql(sql: str, numbered: bool) -> str:
    """``sql`` with its ``{p}`` placeholders as ``?`` (SQLite) or ``$1, $2, …`` (asyncpg)."""
    parts = sql.split("{p}")
    out = parts[0]
    for n, part in enumerate(parts[1:], start=1):
        out += (f"${n}" if numbered else "?") + part
    return out


def provider_models(provider: str) -> list[str]:
    """The catalog's models a provider serves (a stage row names its model)."""
    return sorted(m.id for m in MODELS.values() if m.provider == provider)


def factor_of(row: Any, now: float) -> float:
    """The rate multiplier a ``governor_state`` row (factor, until) sets now."""
    return float(row[0]) if row is not None and row[1] > now else 1.0
