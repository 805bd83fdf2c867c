"""Rows to records. Both backends select the same columns in the same order: a run as
(id, pipeline, status, inputs, created_at, updated_at), a stage as (name, model, status,
attempt, task_id, outputs, mirrored, error, submitted_at, finished_at, needs), a due stage as
(run_id, name, attempt, task_id, status, hard_deadline, model), a parked event as (seq,
run_id, type, tries, last_error, dead_at, body)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from pipelines.catalog import get_model
from pipelines.store.records import DueStage, RunView, StageView


def event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def stage_view(row: Any) -> StageView:
    name, model, status, attempt, task_id, outputs, mirrored, error, submitted, finished, needs = (
        row
    )
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
    )


def run_view(row: Any, stages: list[StageView]) -> RunView:
    run_id, pipeline, status, inputs, created_at, updated_at = row
    return RunView(
        id=run_id,
        pipeline=pipeline,
        status=status,
        inputs=json.loads(inputs),
        created_at=created_at,
        updated_at=updated_at,
        stages=stages,
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
