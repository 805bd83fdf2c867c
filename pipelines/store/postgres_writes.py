"""What one PostgreSQL transaction writes for its transitions, in a few statements
(``executemany`` is pipelined: one round trip for many rows)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import ConcurrentUpdateError
from pipelines.store.records import Spent
from pipelines.store.rows import SPEND_BY_STAGE, priced
from pipelines.transitions import Transition

JOBS_CHANNEL = "wavechain_jobs"
EVENTS_CHANNEL = "wavechain_events"


@dataclass(slots=True)
class Writes:
    """What one transaction writes for its transitions, flushed in a few statements."""

    stages: list[tuple[Any, ...]] = field(default_factory=list)
    deadlines: list[tuple[Any, ...]] = field(default_factory=list)
    runs: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    jobs: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)

    def add(self, run_id: str, t: Transition, version: int, now: float) -> None:
        for write in t.stages:
            stage = write.state
            self.stages.append(
                (
                    stage.status.value,
                    stage.attempt,
                    stage.task_id,
                    json.dumps(stage.outputs),
                    json.dumps(stage.mirrored),
                    stage.error,
                    stage.base_attempt,
                    stage.cached,
                    stage.seed,
                    write.submitted,
                    now,
                    write.finished,
                    run_id,
                    write.name,
                )
            )
            if write.deadlines is not None:
                self.deadlines.append((*write.deadlines, run_id, write.name))
        after = t.decision.state
        # Several transitions of one run in a batch: the first's version guards the write.
        first_version = self.runs[run_id][4] if run_id in self.runs else version
        self.runs[run_id] = (after.status.value, after.cancelled, now, run_id, first_version)
        self.jobs.extend(
            (j.kind, run_id, j.stage, j.attempt, j.run_after, j.provider) for j in t.jobs
        )
        self.events.extend((e.event_id, run_id, e.type, e.body, now) for e in t.events)

    async def flush(self, conn: Any) -> None:
        if self.runs:
            # Every transaction locks a run's row before its stages' rows, in run id
            # order, so that two never wait on each other the other way round (a deadlock);
            # a run changed since it was read is a lost race, retried by the caller.
            ids = sorted(self.runs)
            rows = await conn.fetch(
                "SELECT id, version FROM runs WHERE id = ANY($1) ORDER BY id FOR UPDATE", ids
            )
            stale = sorted(r[0] for r in rows if r[1] != self.runs[r[0]][4])
            if stale or len(rows) != len(ids):
                raise ConcurrentUpdateError(f"runs {stale or ids} changed concurrently; try again")
        if self.stages:
            await conn.executemany(
                "UPDATE stages SET status = $1, attempt = $2, task_id = $3, outputs = $4, "
                "mirrored = $5, error = $6, base_attempt = $7, cached = $8, seed = $9, "
                "submitted_at = CASE WHEN $10 THEN $11 ELSE submitted_at END, "
                "finished_at = CASE WHEN $12 THEN $11 ELSE NULL END "
                "WHERE run_id = $13 AND name = $14",
                self.stages,
            )
        if self.deadlines:
            await conn.executemany(
                "UPDATE stages SET deadline = $1, hard_deadline = $2 "
                "WHERE run_id = $3 AND name = $4",
                self.deadlines,
            )
        if self.runs:
            rows = list(self.runs.values())
            updated = await conn.fetch(
                "UPDATE runs SET status = u.status, cancelled = u.cancelled, "
                "updated_at = u.updated_at, version = runs.version + 1 "
                "FROM unnest($1::text[], $2::boolean[], $3::float8[], $4::text[], $5::int[]) "
                "AS u(status, cancelled, updated_at, id, version) "
                "WHERE runs.id = u.id AND runs.version = u.version RETURNING runs.id",
                *(list(column) for column in zip(*rows, strict=True)),
            )
            if len(updated) != len(rows):
                missed = sorted(set(self.runs) - {r[0] for r in updated})
                raise ConcurrentUpdateError(f"runs {missed} changed concurrently; try again")
        if self.jobs:
            # A job carries its run's priority and concurrency key, for the governor.
            await conn.executemany(
                "INSERT INTO jobs (kind, run_id, stage, attempt, run_after, provider, priority, "
                "concurrency_key, concurrency_limit) SELECT $1, id, $3, $4, $5, $6, priority, "
                "concurrency_key, concurrency_limit FROM runs WHERE id = $2 "
                "ON CONFLICT DO NOTHING",
                self.jobs,
            )
            await conn.execute("SELECT pg_notify($1, '')", JOBS_CHANNEL)
        if self.events:
            runs = sorted({e[1] for e in self.events})
            spend = {
                (r[0], r[1]): Spent(float(r[2]), int(r[3]))
                for r in await conn.fetch(
                    SPEND_BY_STAGE.format(runs="SELECT unnest($1::text[])"), runs
                )
            }
            await conn.executemany(
                "INSERT INTO outbox (event_id, run_id, type, body, created_at) "
                "VALUES ($1, $2, $3, $4, $5)",
                [(i, r, kind, priced(body, spend), at) for i, r, kind, body, at in self.events],
            )
            await conn.execute("SELECT pg_notify($1, '')", EVENTS_CHANNEL)
