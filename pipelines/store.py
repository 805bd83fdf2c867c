"""Durable state: runs, stages, attempts, deliveries, jobs with leases, and the outbox.

Every transition is one transaction: load the run, ``decide``, write the changed
stages, the jobs and outbox rows its commands ask for, and (for a webhook) the
delivery record, all or nothing. Each public method is one such transaction.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

from pipelines import spec as specs
from pipelines.errors import ConcurrentUpdateError, ConfigError
from pipelines.sqlite import GroupCommitter
from pipelines.state import (
    Command,
    Decision,
    Emit,
    Event,
    Mirror,
    RunState,
    StageState,
    StageStatus,
    Start,
    Submit,
    decide,
    initial_state,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    pipeline TEXT NOT NULL,
    spec TEXT NOT NULL,
    inputs TEXT NOT NULL,
    status TEXT NOT NULL,
    cancelled INTEGER NOT NULL DEFAULT 0,
    mirror INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at DESC);
CREATE TABLE IF NOT EXISTS stages (
    run_id TEXT NOT NULL REFERENCES runs (id),
    name TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    task_id TEXT,
    outputs TEXT NOT NULL DEFAULT '[]',
    mirrored TEXT NOT NULL DEFAULT '[]',
    error TEXT NOT NULL DEFAULT '',
    base_attempt INTEGER NOT NULL DEFAULT 0,
    submitted_at REAL,
    finished_at REAL,
    -- Reconciliation: when to ask the provider if no callback came, and when to give up.
    deadline REAL,
    hard_deadline REAL,
    PRIMARY KEY (run_id, name)
);
CREATE INDEX IF NOT EXISTS stages_due ON stages (deadline) WHERE deadline IS NOT NULL;
CREATE TABLE IF NOT EXISTS attempts (
    token_hash TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    task_id TEXT,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (run_id, stage, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_by_task ON attempts (task_id);
CREATE TABLE IF NOT EXISTS deliveries (
    provider TEXT NOT NULL,
    webhook_id TEXT NOT NULL,
    run_id TEXT,
    stage TEXT,
    attempt INTEGER,
    task_id TEXT,
    status TEXT,
    effect TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (provider, webhook_id)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    run_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    run_after REAL NOT NULL,
    lease_until REAL,
    tries INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    UNIQUE (kind, run_id, stage, attempt)
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (run_after);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    run_id TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    sent_at REAL,
    tries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (sent_at, seq);
"""

#: A run's (cancelled, mirror, version), as read from its row.
_RunRow = tuple[Any, Any, Any] | sqlite3.Row

#: Parsed specs and run states kept in memory, most recently used first.
CACHED_RUNS = 2048

WebhookEffect = Literal[
    "applied", "no_effect", "duplicate", "unknown_token", "not_yet", "task_mismatch"
]


def token_hash(token: str) -> str:
    """Tokens are stored hashed: a copy of the database does not let anyone forge callbacks."""
    return hashlib.sha256(token.encode()).hexdigest()


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass(frozen=True, slots=True)
class StageView:
    name: str
    model: str
    status: str
    attempt: int
    task_id: str | None
    outputs: list[str]
    mirrored: list[str]
    error: str
    submitted_at: float | None
    finished_at: float | None

    def as_json(self) -> dict[str, Any]:
        elapsed = (
            round(self.finished_at - self.submitted_at, 3)
            if self.finished_at is not None and self.submitted_at is not None
            else None
        )
        return {
            "name": self.name,
            "model": self.model,
            "status": self.status,
            "attempt": self.attempt,
            "task_id": self.task_id,
            "outputs": self.mirrored or self.outputs,
            "provider_outputs": self.outputs,
            "error": self.error or None,
            "timings": {
                "submitted_at": _iso(self.submitted_at),
                "finished_at": _iso(self.finished_at),
                "elapsed_s": elapsed,
            },
        }


@dataclass(frozen=True, slots=True)
class RunView:
    id: str
    pipeline: str
    status: str
    inputs: dict[str, Any]
    created_at: float
    updated_at: float
    stages: list[StageView]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pipeline": self.pipeline,
            "status": self.status,
            "inputs": self.inputs,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "stages": [s.as_json() for s in self.stages],
        }


@dataclass(frozen=True, slots=True)
class SubmitContext:
    """All a submit job needs, read in one transaction."""

    pipeline: specs.Pipeline
    inputs: dict[str, Any]
    stage: StageState
    #: Succeeded upstream stages (their provider outputs and mirrored copies).
    upstream: dict[str, StageState]
    cancelled: bool
    #: State of an attempt row left by an earlier try of this job, if any.
    previous_attempt: str | None


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    kind: str
    run_id: str
    stage: str
    attempt: int
    tries: int
    #: For a submit job, what it needs, read in the transaction that claimed it.
    context: SubmitContext | None = field(default=None, compare=False, repr=False)
    #: When the job became due: for a stage's first submit, when the event that made it
    #: ready was received (a delivery, or the run's creation); after a failure, the end
    #: of its backoff.
    due_at: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class DueStage:
    run_id: str
    stage: str
    attempt: int
    task_id: str | None
    status: str
    hard_deadline: float


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    run_id: str
    body: dict[str, Any]


class StageContext(NamedTuple):
    """What a job about to work on a stage reads: its model, state, and the run's cancel."""

    model: str
    stage: StageState
    cancelled: bool


class WebhookOutcome(NamedTuple):
    """What a delivery did. A named tuple, as ``Prediction``: one per delivery, built on
    the writer thread, which shares the receiver's GIL."""

    effect: WebhookEffect
    run_id: str | None = None
    stage: str | None = None


class Store:
    """The SQLite backend. Listeners (``listen``) are called on the loop after a commit
    that may have made jobs due or added events."""

    def __init__(
        self,
        database_url: str,
        *,
        callback_timeout_s: float = 600.0,
        hard_timeout_factor: float = 4.0,
    ) -> None:
        self.callback_timeout_s = callback_timeout_s
        self.hard_timeout_factor = hard_timeout_factor
        self._db = GroupCommitter(
            _sqlite_path(database_url), schema=SCHEMA, on_rollback=self._forget_states
        )
        self._job_listeners: list[Callable[[], None]] = []
        self._event_listeners: list[Callable[[], None]] = []
        # Both caches are used by operations only, so only on the writer thread.
        self._pipelines: OrderedDict[str, specs.Pipeline] = OrderedDict()
        # Each run's state as of its version: every change to a stage's state goes through
        # _apply, which bumps the version, so a matching version means an unchanged state
        # and saves reading and decoding every stage of the run on each transition. An
        # entry written by work that is then rolled back is dropped (see _forget_states).
        self._states: OrderedDict[str, tuple[int, RunState]] = OrderedDict()

    async def start(self) -> None:
        self._db.start()

    async def close(self) -> None:
        self._db.stop()

    @property
    def stats(self) -> dict[str, int]:
        return {"batches": self._db.batches, "operations": self._db.operations}

    # runs ---------------------------------------------------------------------------

    async def create_run(
        self,
        pipeline: specs.Pipeline,
        inputs: Mapping[str, Any],
        *,
        now: float,
        mirror: bool = False,
    ) -> str:
        run_id = f"run_{uuid.uuid4().hex[:20]}"

        def op(conn: sqlite3.Connection) -> None:
            state = initial_state(run_id, pipeline, mirror=mirror)
            conn.execute(
                "INSERT INTO runs (id, pipeline, spec, inputs, status, mirror, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    pipeline.name,
                    json.dumps(pipeline.source),
                    json.dumps(dict(inputs)),
                    state.status.value,
                    int(mirror),
                    now,
                    now,
                ),
            )
            conn.executemany(
                "INSERT INTO stages (run_id, name, model, status) VALUES (?, ?, ?, ?)",
                [
                    (run_id, n, s.model, StageStatus.PENDING.value)
                    for n, s in pipeline.stages.items()
                ],
            )
            self._pipelines[run_id] = pipeline
            self._apply(conn, run_id, Start(), now)

        await self._db.run(op)
        self._notify()
        return run_id

    async def apply(
        self, run_id: str, event: Event, *, now: float, finish_job: int | None = None
    ) -> Decision:
        def op(conn: sqlite3.Connection) -> Decision:
            decision = self._apply(conn, run_id, event, now)
            if finish_job is not None:
                conn.execute("DELETE FROM jobs WHERE id = ?", (finish_job,))
            return decision

        decision = await self._db.run(op)
        if decision.changed:
            self._notify()
        return decision

    async def webhook(
        self,
        *,
        provider: str,
        webhook_id: str,
        token: str,
        task_id: str,
        status: str,
        make_event: Callable[[str, int], Event | None],
        now: float,
    ) -> WebhookOutcome:
        """Resolve the token, record the delivery, apply the event: one transaction."""

        hashed = token_hash(token)

        def op(conn: sqlite3.Connection) -> WebhookOutcome:
            # One statement reads all this delivery needs: the attempt, the webhook-id's
            # earlier delivery if any, and the run's version for the cached state (each
            # statement is a round of Python-to-SQLite work on the writer, the receiver's
            # bottleneck).
            row = conn.execute(
                "SELECT a.run_id, a.stage, a.attempt, a.task_id, a.state, "
                "r.cancelled, r.mirror, r.version, "
                "EXISTS (SELECT 1 FROM deliveries WHERE provider = ? AND webhook_id = ?) "
                "AS seen "
                "FROM attempts AS a LEFT JOIN runs AS r ON r.id = a.run_id "
                "WHERE a.token_hash = ?",
                (provider, webhook_id, hashed),
            ).fetchone()
            if row is None:
                return WebhookOutcome("unknown_token")
            # By position: a Row looks names up one column at a time.
            run_id, stage, attempt, known_task, state, cancelled, mirror, version, seen = row
            if known_task is None:
                if state == "sending":
                    # The submit's answer is not committed yet; the sender will retry.
                    return WebhookOutcome("not_yet", run_id, stage)
                # The submit's answer was lost: the signed callback on this attempt's
                # unguessable token tells us the task id.
                conn.execute(
                    "UPDATE attempts SET task_id = ?, state = 'accepted' WHERE token_hash = ?",
                    (task_id, hashed),
                )
            elif known_task != task_id:
                return WebhookOutcome("task_mismatch", run_id, stage)
            # Writers are serialised (one transaction at a time, BEGIN IMMEDIATE across
            # processes), so a delivery not seen here is not being recorded elsewhere: it
            # is written once, with its effect, after the event is applied.
            if seen:
                return WebhookOutcome("duplicate", run_id, stage)
            event = make_event(stage, attempt)
            run = (cancelled, mirror, version)
            changed = event is not None and self._apply(conn, run_id, event, now, run=run).changed
            effect: WebhookEffect = "applied" if changed else "no_effect"
            conn.execute(
                "INSERT INTO deliveries (provider, webhook_id, run_id, stage, attempt, task_id, "
                "status, effect, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (provider, webhook_id, run_id, stage, attempt, task_id, status, effect, now),
            )
            return WebhookOutcome(effect, run_id, stage)

        outcome = await self._db.run(op)
        if outcome.effect == "applied":
            self._notify()
        return outcome

    def listen(
        self,
        *,
        jobs: Callable[[], None] | None = None,
        events: Callable[[], None] | None = None,
    ) -> None:
        """Call ``jobs`` when new jobs may be due, ``events`` when events were added."""
        if jobs is not None:
            self._job_listeners.append(jobs)
        if events is not None:
            self._event_listeners.append(events)

    def _on_jobs(self) -> None:
        for listener in self._job_listeners:
            listener()

    def _notify(self) -> None:
        self._on_jobs()
        for listener in self._event_listeners:
            listener()

    def _forget_states(self) -> None:
        # Rare (an operation failed, or a commit did): forgetting every cached state is
        # simpler than tracking which entries the rolled-back work wrote, and as correct.
        self._states.clear()

    def _remember_state(self, state: RunState, version: int) -> None:
        self._states[state.run_id] = (version, state)
        self._states.move_to_end(state.run_id)
        while len(self._states) > CACHED_RUNS:
            self._states.popitem(last=False)

    def _pipeline(self, conn: sqlite3.Connection, run_id: str) -> specs.Pipeline:
        cached = self._pipelines.get(run_id)
        if cached is not None:
            self._pipelines.move_to_end(run_id)
            return cached
        row = conn.execute("SELECT spec FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(run_id)
        pipeline = specs.parse(json.loads(row["spec"]), where=f"run {run_id}")
        self._pipelines[run_id] = pipeline
        while len(self._pipelines) > CACHED_RUNS:
            self._pipelines.popitem(last=False)
        return pipeline

    def _load_state(
        self, conn: sqlite3.Connection, run_id: str, run: _RunRow | None = None
    ) -> tuple[RunState, int]:
        """``run``: the run's (cancelled, mirror, version) if already read in this
        transaction."""
        if run is None or run[2] is None:  # not read yet, or no such run
            run = conn.execute(
                "SELECT cancelled, mirror, version FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
        if run is None:
            raise KeyError(run_id)
        cancelled, mirror, version = run
        cached = self._states.get(run_id)
        if cached is not None and cached[0] == version:
            return cached[1], version
        stages = {
            r["name"]: StageState(
                status=StageStatus(r["status"]),
                attempt=r["attempt"],
                task_id=r["task_id"],
                outputs=tuple(json.loads(r["outputs"])),
                mirrored=tuple(json.loads(r["mirrored"])),
                error=r["error"],
                base_attempt=r["base_attempt"],
            )
            for r in conn.execute(
                "SELECT name, status, attempt, task_id, outputs, mirrored, error, base_attempt "
                "FROM stages "
                "WHERE run_id = ?",
                (run_id,),
            )
        }
        state = RunState(run_id, stages, bool(cancelled), bool(mirror))
        self._remember_state(state, version)
        return state, version

    def _apply(
        self,
        conn: sqlite3.Connection,
        run_id: str,
        event: Event,
        now: float,
        *,
        run: _RunRow | None = None,
    ) -> Decision:
        """``run``: as for _load_state."""
        pipeline = self._pipeline(conn, run_id)
        before, version = self._load_state(conn, run_id, run)
        decision = decide(pipeline, before, event, now=now)
        if not decision.changed:
            return decision
        after = decision.state
        for name, stage in after.stages.items():
            old = before.stages[name]
            if stage == old:
                continue
            conn.execute(
                "UPDATE stages SET status = ?, attempt = ?, task_id = ?, outputs = ?, "
                "mirrored = ?, error = ?, base_attempt = ?, "
                "submitted_at = CASE WHEN ? THEN ? ELSE submitted_at END, "
                "finished_at = CASE WHEN ? THEN ? ELSE NULL END "
                "WHERE run_id = ? AND name = ?",
                (
                    stage.status.value,
                    stage.attempt,
                    stage.task_id,
                    json.dumps(stage.outputs),
                    json.dumps(stage.mirrored),
                    stage.error,
                    stage.base_attempt,
                    stage.status is StageStatus.SUBMITTED,
                    now,
                    stage.status.terminal,
                    now,
                    run_id,
                    name,
                ),
            )
            self._set_deadline(conn, pipeline, run_id, name, old, stage, now)
        # Guarded write: a concurrent writer (another replica) makes this match nothing.
        updated = conn.execute(
            "UPDATE runs SET status = ?, cancelled = ?, updated_at = ?, version = version + 1 "
            "WHERE id = ? AND version = ?",
            (after.status.value, int(after.cancelled), now, run_id, version),
        ).rowcount
        if updated != 1:
            raise ConcurrentUpdateError(run_id)
        self._remember_state(after, version + 1)
        self._write_commands(conn, pipeline, run_id, after, decision.commands, now)
        return decision

    def _deadlines(self, pipeline: specs.Pipeline, name: str) -> tuple[float, float]:
        """(silence before asking the provider, total time the task may take).

        A stage's ``timeout`` is its total; without one it is the callback wait times
        the hard-timeout factor.
        """
        timeout = pipeline.stages[name].timeout_s
        wait = min(self.callback_timeout_s, timeout) if timeout else self.callback_timeout_s
        return wait, timeout or wait * self.hard_timeout_factor

    def _set_deadline(
        self,
        conn: sqlite3.Connection,
        pipeline: specs.Pipeline,
        run_id: str,
        name: str,
        old: StageState,
        new: StageState,
        now: float,
    ) -> None:
        """A submitted stage must hear back by its deadline, or the sweeper asks."""
        if new.status is StageStatus.SUBMITTED and old.status is not StageStatus.SUBMITTED:
            wait, limit = self._deadlines(pipeline, name)
            conn.execute(
                "UPDATE stages SET deadline = ?, hard_deadline = ? WHERE run_id = ? AND name = ?",
                (now + wait, now + limit, run_id, name),
            )
        elif new.status.terminal or new.awaiting_mirror or new.status is StageStatus.PENDING:
            conn.execute(
                "UPDATE stages SET deadline = NULL, hard_deadline = NULL "
                "WHERE run_id = ? AND name = ?",
                (run_id, name),
            )

    def _write_commands(
        self,
        conn: sqlite3.Connection,
        pipeline: specs.Pipeline,
        run_id: str,
        state: RunState,
        commands: Sequence[Command],
        now: float,
    ) -> None:
        for command in commands:
            if isinstance(command, Submit | Mirror):
                kind = "submit" if isinstance(command, Submit) else "mirror"
                not_before = command.not_before if isinstance(command, Submit) else None
                conn.execute(
                    "INSERT INTO jobs (kind, run_id, stage, attempt, run_after) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (kind, run_id, command.stage, command.attempt, not_before or now),
                )
            elif isinstance(command, Emit):
                body = event_envelope(pipeline, state, command, now)
                conn.execute(
                    "INSERT INTO outbox (event_id, run_id, type, body, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (body["id"], run_id, command.type, json.dumps(body), now),
                )

    # submit jobs --------------------------------------------------------------------

    async def submit_context(self, job: Job) -> SubmitContext:
        return await self._db.run(lambda conn: self._submit_context(conn, job))

    def _submit_context(self, conn: sqlite3.Connection, job: Job) -> SubmitContext:
        pipeline = self._pipeline(conn, job.run_id)
        state, _ = self._load_state(conn, job.run_id)
        inputs = json.loads(
            conn.execute("SELECT inputs FROM runs WHERE id = ?", (job.run_id,)).fetchone()[0]
        )
        previous = conn.execute(
            "SELECT state FROM attempts WHERE run_id = ? AND stage = ? AND attempt = ?",
            (job.run_id, job.stage, job.attempt),
        ).fetchone()
        upstream = {
            name: s for name, s in state.stages.items() if s.status is StageStatus.SUCCEEDED
        }
        return SubmitContext(
            pipeline=pipeline,
            inputs=inputs,
            stage=state.stages[job.stage],
            upstream=upstream,
            cancelled=state.cancelled,
            previous_attempt=previous["state"] if previous else None,
        )

    async def record_attempt(self, job: Job, token: str, *, now: float) -> None:
        """Written before the request leaves, so a crash mid-submit is never re-sent blindly."""
        await self._db.run(
            lambda conn: conn.execute(
                "INSERT INTO attempts (token_hash, run_id, stage, attempt, state, created_at) "
                "VALUES (?, ?, ?, ?, 'sending', ?)",
                (token_hash(token), job.run_id, job.stage, job.attempt, now),
            )
        )

    async def accept_attempt(
        self, job: Job, token: str, task_id: str, events: Sequence[Event], *, now: float
    ) -> Decision:
        """Record the provider's task id, finish the job, apply ``events``: one transaction."""

        def op(conn: sqlite3.Connection) -> Decision:
            conn.execute(
                "UPDATE attempts SET task_id = ?, state = 'accepted' WHERE token_hash = ?",
                (task_id, token_hash(token)),
            )
            conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
            decision = Decision(self._load_state(conn, job.run_id)[0], (), changed=False)
            for event in events:
                decision = self._apply(conn, job.run_id, event, now)
            return decision

        decision = await self._db.run(op)
        self._on_jobs()
        return decision

    async def discard_attempt(self, job: Job) -> None:
        """Delete the attempt row of a submit the provider proved it never took (429, or
        no connection), so the job's next try records a fresh one."""
        await self._db.run(
            lambda conn: conn.execute(
                "DELETE FROM attempts WHERE run_id = ? AND stage = ? AND attempt = ?",
                (job.run_id, job.stage, job.attempt),
            )
        )

    async def set_attempt_state(
        self, job: Job, state: str, *, drop_job: bool, now: float | None = None
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if state == "unknown" and now is not None:
                # No task id to ask about: wait for the signed callback, then give up.
                _, limit = self._deadlines(self._pipeline(conn, job.run_id), job.stage)
                hard = now + limit
                conn.execute(
                    "UPDATE stages SET deadline = ?, hard_deadline = ? "
                    "WHERE run_id = ? AND name = ? AND attempt = ?",
                    (hard, hard, job.run_id, job.stage, job.attempt),
                )
            conn.execute(
                "UPDATE attempts SET state = ? WHERE run_id = ? AND stage = ? AND attempt = ?",
                (state, job.run_id, job.stage, job.attempt),
            )
            if drop_job:
                conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,))

        await self._db.run(op)

    # jobs ---------------------------------------------------------------------------

    async def claim_jobs(self, *, now: float, limit: int, lease_s: float) -> list[Job]:
        """Lease up to ``limit`` due jobs; a submit job comes with its context.

        Not durable: a lease lost in a power cut only lets the job be claimed again, and
        a submit is never sent twice blindly (its attempt row is durable before it leaves).
        """

        def op(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                "SELECT id, kind, run_id, stage, attempt, tries, run_after FROM jobs "
                "WHERE run_after <= ? AND (lease_until IS NULL OR lease_until < ?) "
                "ORDER BY run_after, id LIMIT ?",
                (now, now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE jobs SET lease_until = ?, tries = tries + 1 WHERE id = ?",
                [(now + lease_s, r["id"]) for r in rows],
            )
            return [
                self._with_context(
                    conn,
                    Job(
                        r["id"],
                        r["kind"],
                        r["run_id"],
                        r["stage"],
                        r["attempt"],
                        r["tries"] + 1,
                        due_at=r["run_after"],
                    ),
                )
                for r in rows
            ]

        return await self._db.run(op, durable=False)

    def _with_context(self, conn: sqlite3.Connection, job: Job) -> Job:
        if job.kind != "submit":
            return job
        try:
            return replace(job, context=self._submit_context(conn, job))
        except Exception:
            # One run's unreadable state (a stored spec the catalog no longer accepts)
            # must not stop every claim: its job reads it again, fails and backs off alone.
            return job

    async def retry_job(self, job: Job, *, at: float, error: str) -> None:
        await self._db.run(
            lambda conn: conn.execute(
                "UPDATE jobs SET run_after = ?, lease_until = NULL, last_error = ? WHERE id = ?",
                (at, error[:500], job.id),
            )
        )

    async def drop_job(self, job: Job) -> None:
        await self._db.run(lambda conn: conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,)))

    async def stage_state(self, run_id: str, stage: str) -> StageContext:
        def op(conn: sqlite3.Connection) -> StageContext:
            pipeline = self._pipeline(conn, run_id)
            state, _ = self._load_state(conn, run_id)
            return StageContext(pipeline.stages[stage].model, state.stages[stage], state.cancelled)

        return await self._db.run(op)

    # reconciliation -------------------------------------------------------------------

    async def claim_due_stages(self, *, now: float, limit: int, lease_s: float) -> list[DueStage]:
        """Stages silent past their deadline; each is pushed ``lease_s`` ahead as a claim."""

        def op(conn: sqlite3.Connection) -> list[DueStage]:
            rows = conn.execute(
                "SELECT run_id, name, attempt, task_id, status, hard_deadline FROM stages "
                "WHERE deadline IS NOT NULL AND deadline <= ? ORDER BY deadline LIMIT ?",
                (now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE stages SET deadline = ? WHERE run_id = ? AND name = ?",
                [(now + lease_s, r["run_id"], r["name"]) for r in rows],
            )
            return [
                DueStage(
                    r["run_id"],
                    r["name"],
                    r["attempt"],
                    r["task_id"],
                    r["status"],
                    r["hard_deadline"] or now,
                )
                for r in rows
            ]

        # Not durable: a claim lost in a power cut only means the stage is looked at again.
        return await self._db.run(op, durable=False)

    async def extend_deadline(self, run_id: str, stage: str, attempt: int, at: float) -> None:
        await self._db.run(
            lambda conn: conn.execute(
                "UPDATE stages SET deadline = MIN(?, hard_deadline) "
                "WHERE run_id = ? AND name = ? AND attempt = ? AND deadline IS NOT NULL",
                (at, run_id, stage, attempt),
            )
        )

    async def renew_lease(self, job: Job, *, until: float) -> None:
        await self._db.run(
            lambda conn: conn.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ?", (until, job.id)
            ),
            durable=False,
        )

    # outbox ---------------------------------------------------------------------------

    async def pending_events(self, *, limit: int) -> list[OutboxRow]:
        def op(conn: sqlite3.Connection) -> list[OutboxRow]:
            rows = conn.execute(
                "SELECT seq, run_id, body FROM outbox WHERE sent_at IS NULL ORDER BY seq LIMIT ?",
                (limit,),
            )
            return [OutboxRow(r["seq"], r["run_id"], json.loads(r["body"])) for r in rows]

        return await self._db.run(op)

    async def mark_sent(self, seqs: Sequence[int], *, now: float) -> None:
        await self._db.run(
            lambda conn: conn.executemany(
                "UPDATE outbox SET sent_at = ?, tries = tries + 1 WHERE seq = ?",
                [(now, seq) for seq in seqs],
            )
        )

    async def mark_failed(self, seqs: Sequence[int]) -> None:
        await self._db.run(
            lambda conn: conn.executemany(
                "UPDATE outbox SET tries = tries + 1 WHERE seq = ?", [(seq,) for seq in seqs]
            )
        )

    # reads ----------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunView | None:
        return await self._db.run(lambda conn: _run_view(conn, run_id))

    async def list_runs(self, *, limit: int = 50, status: str | None = None) -> list[RunView]:
        def op(conn: sqlite3.Connection) -> list[RunView]:
            query = "SELECT id FROM runs"
            args: list[Any] = []
            if status is not None:
                query += " WHERE status = ?"
                args.append(status)
            query += " ORDER BY created_at DESC LIMIT ?"
            ids = [r[0] for r in conn.execute(query, (*args, limit))]
            return [v for v in (_run_view(conn, i) for i in ids) if v is not None]

        return await self._db.run(op)

    async def outbox(self, run_id: str | None = None) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = "SELECT body FROM outbox"
            rows = (
                conn.execute(sql + " WHERE run_id = ? ORDER BY seq", (run_id,))
                if run_id
                else conn.execute(sql + " ORDER BY seq")
            )
            return [json.loads(r[0]) for r in rows]

        return await self._db.run(op)

    async def deliveries(self, run_id: str) -> list[dict[str, Any]]:
        return await self._db.run(
            lambda conn: [
                dict(r)
                for r in conn.execute(
                    "SELECT * FROM deliveries WHERE run_id = ? ORDER BY received_at", (run_id,)
                )
            ]
        )


def _run_view(conn: sqlite3.Connection, run_id: str) -> RunView | None:
    run = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    if run is None:
        return None
    stages = [
        StageView(
            name=r["name"],
            model=r["model"],
            status=r["status"],
            attempt=r["attempt"],
            task_id=r["task_id"],
            outputs=json.loads(r["outputs"]),
            mirrored=json.loads(r["mirrored"]),
            error=r["error"],
            submitted_at=r["submitted_at"],
            finished_at=r["finished_at"],
        )
        for r in conn.execute("SELECT * FROM stages WHERE run_id = ? ORDER BY rowid", (run_id,))
    ]
    return RunView(
        id=run["id"],
        pipeline=run["pipeline"],
        status=run["status"],
        inputs=json.loads(run["inputs"]),
        created_at=run["created_at"],
        updated_at=run["updated_at"],
        stages=stages,
    )


def event_envelope(
    pipeline: specs.Pipeline, state: RunState, command: Emit, now: float
) -> dict[str, Any]:
    """The versioned JSON body of a lifecycle event."""
    stage = state.stages.get(command.stage) if command.stage else None
    model = pipeline.stages[command.stage].model if command.stage else None
    return {
        "version": 1,
        "id": f"evt_{uuid.uuid4().hex}",
        "type": command.type,
        "time": _iso(now),
        "run_id": state.run_id,
        "pipeline": pipeline.name,
        "stage": command.stage,
        "model": model,
        "task_id": stage.task_id if stage else None,
        "status": stage.status.value if stage else state.status.value,
        "outputs": list(stage.mirrored or stage.outputs) if stage else [],
        "provider_outputs": list(stage.outputs) if stage else [],
        "error": command.data.get("error"),
    }


def _sqlite_path(database_url: str) -> str:
    if database_url == "sqlite://:memory:":
        return ":memory:"
    prefix = "sqlite:///"
    if not database_url.startswith(prefix):
        raise ConfigError(
            f"DATABASE_URL: only sqlite:///PATH is supported by this build, got "
            f"{database_url.split('://', 1)[0]}://…"
        )
    return database_url[len(prefix) :]
