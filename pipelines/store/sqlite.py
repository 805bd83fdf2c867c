"""The SQLite backend: the embedded default, for one process (or a few on one machine).

Writes go through one writer thread with group commit (``sqlite_writer``): every public
method is one operation, a plain function of a connection, and the operations queued in
one turn of the event loop share one transaction and one fsync. Reads that return many
rows (a run, a page of runs, the outbox) use their own connections in worker threads,
never the writer. Specs are parsed off the writer (see ``cache``).

SQLite serialises writers (``BEGIN IMMEDIATE``, across processes too), and the unique
constraints are the last word on duplicates all the same.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from pipelines import budget
from pipelines import spec as specs
from pipelines.errors import ConcurrentUpdateError, ConfigError
from pipelines.governor import Usage, Waiting, admit, room, throttled
from pipelines.state import (
    Decision,
    Event,
    RunState,
    StageState,
    StageStatus,
    Start,
    initial_state,
)
from pipelines.store.cache import NeedPipeline, RunCache, parse_stored
from pipelines.store.interface import Listener, StoreConfig
from pipelines.store.records import (
    NO_OPTIONS,
    CacheEntry,
    Charge,
    Cursor,
    DueStage,
    Idempotency,
    IdempotentReplay,
    Job,
    OutboxRow,
    Pruned,
    RunOptions,
    RunPage,
    RunView,
    Spent,
    StageContext,
    StageView,
    SubmitContext,
    TaskRef,
    WebhookOutcome,
)
from pipelines.store.rows import (
    GOV_CLAIMED,
    GOV_IN_WINDOW,
    GOV_KEYS,
    GOV_SENDING,
    GOV_WAITING,
    RUN_COLUMNS,
    SPEND_BY_STAGE,
    STAGE_SPEND,
    cache_entry,
    due_stage,
    event_id,
    factor_of,
    governor_sql,
    parked,
    priced,
    provider_models,
    run_view,
    spend_row,
    stage_view,
)
from pipelines.store.sqlite_schema import MIGRATIONS
from pipelines.store.sqlite_writer import GroupCommitter, connect
from pipelines.transitions import (
    AttemptRow,
    AttemptState,
    Transition,
    WebhookEffect,
    plan,
    token_hash,
    webhook_verdict,
)

T = TypeVar("T")

_MIN_SQLITE = (3, 35, 0)  # UPDATE ... RETURNING

#: A run's (cancelled, mirror, version), as read from its row.
_RunRow = tuple[Any, Any, Any]


#: Filesystems shared between machines: SQLite's locking does not hold across them.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "glusterfs",
        "fuse.sshfs",
        "9p",
        "fuse.glusterfs",
        "fuse.ceph",
        "lustre",
        "gpfs",
        "afs",
        "fuse.s3fs",
        "fuse.gcsfuse",
    }
)


def filesystem_type(path: str, mounts: str) -> str | None:
    """The type of the filesystem ``path`` is on, from a /proc/mounts table."""
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def refuse_network_filesystem(path: str, mounts: str | None = None) -> None:
    """A SQLite file on a network filesystem (several pods sharing it) is refused."""
    if path == ":memory:":
        return
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return  # not Linux: nothing to tell from
    folder = str(Path(path).resolve().parent)
    kind = filesystem_type(folder, mounts)
    if kind in NETWORK_FILESYSTEMS:
        raise ConfigError(
            f"DATABASE_URL: the SQLite file is on a network filesystem ({kind}), where its "
            "locks do not hold between machines: use PostgreSQL for several pods"
        )


def sqlite_path(database_url: str) -> str:
    if database_url == "sqlite://:memory:":
        return ":memory:"
    prefix = "sqlite:///"
    if not database_url.startswith(prefix) or len(database_url) == len(prefix):
        raise ConfigError("DATABASE_URL: a SQLite URL is sqlite:///PATH")
    return database_url[len(prefix) :]


class _Readers:
    """A few read connections, used in worker threads: reads never wait for the writer."""

    def __init__(self, path: str, size: int = 2) -> None:
        self._path = path
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        self._limiter = anyio.CapacityLimiter(size)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await anyio.to_thread.run_sync(partial(self._run, fn), limiter=self._limiter)

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = connect(self._path)
            self._all.append(conn)
        try:
            conn.execute("BEGIN")  # one snapshot for the whole read
            try:
                return fn(conn)
            finally:
                conn.execute("ROLLBACK")
        finally:
            self._pool.put(conn)

    def close(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()


class SqliteStore:
    def __init__(self, database_url: str, config: StoreConfig | None = None) -> None:
        self.config = config or StoreConfig()
        self._path = sqlite_path(database_url)
        self._cache = RunCache(
            max_runs=self.config.cached_runs, max_spec_bytes=self.config.cached_spec_bytes
        )
        self._db = GroupCommitter(
            self._path, migrations=MIGRATIONS, on_rollback=self._cache.forget_states
        )
        # An in-memory database exists only on the writer's own connection.
        self._readers = None if self._path == ":memory:" else _Readers(self._path)
        self._job_listeners: list[Listener] = []
        self._event_listeners: list[Listener] = []

    async def start(self) -> None:
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise ConfigError(
                f"SQLite {sqlite3.sqlite_version} is too old: wavechain needs 3.35 or newer"
            )
        refuse_network_filesystem(self._path)
        await anyio.to_thread.run_sync(self._db.start)

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._db.stop)
        if self._readers is not None:
            self._readers.close()

    @property
    def stats(self) -> dict[str, int]:
        return {"batches": self._db.batches, "operations": self._db.operations}

    def listen(self, *, jobs: Listener | None = None, events: Listener | None = None) -> None:
        if jobs is not None:
            self._job_listeners.append(jobs)
        if events is not None:
            self._event_listeners.append(events)

    def _jobs_added(self) -> None:
        for listener in self._job_listeners:
            listener()

    def _changed(self) -> None:
        self._jobs_added()
        for listener in self._event_listeners:
            listener()

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._readers is None:
            return await self._db.run(fn, durable=False)
        return await self._readers.run(fn)

    async def _write(self, op: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``op`` on the writer; if it needs a spec that is not cached, load the spec
        here (off the writer) and run it again."""
        for _ in range(3):
            try:
                return await self._db.run(op, durable=durable)
            except NeedPipeline as need:
                await self._load_pipeline(need.run_id)
        return await self._db.run(op, durable=durable)

    async def _load_pipeline(self, run_id: str) -> specs.Pipeline:
        cached = self._cache.pipeline(run_id)
        if cached is not None:
            return cached
        row = await self._read(
            lambda conn: conn.execute("SELECT spec FROM runs WHERE id = ?", (run_id,)).fetchone()
        )
        if row is None:
            raise KeyError(run_id)
        text: str = row[0]
        pipeline = await anyio.to_thread.run_sync(parse_stored, run_id, text)
        self._cache.add_pipeline(run_id, pipeline, len(text))
        return pipeline

    # runs ---------------------------------------------------------------------------

    async def create_run(
        self,
        pipeline: specs.Pipeline,
        inputs: Mapping[str, Any],
        *,
        now: float,
        mirror: bool = False,
        idempotency: Idempotency | None = None,
        options: RunOptions = NO_OPTIONS,
    ) -> str:
        run_id = f"run_{uuid.uuid4().hex[:20]}"
        spec_text = json.dumps(pipeline.source)
        inputs_text = json.dumps(dict(inputs))
        state = initial_state(run_id, pipeline, mirror=mirror)
        key, digest = idempotency or (None, None)

        def op(conn: sqlite3.Connection) -> tuple[str, str] | None:
            if key is not None:  # inside the write transaction: one writer at a time
                found = conn.execute(
                    "SELECT id, request_hash FROM runs WHERE idempotency_key = ?", (key,)
                ).fetchone()
                if found is not None:
                    return found[0], found[1]
            conn.execute(
                "INSERT INTO runs (id, pipeline, spec, inputs, status, mirror, created_at, "
                "updated_at, idempotency_key, request_hash, deadline_at, budget_usd, priority, "
                "concurrency_key, concurrency_limit) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    pipeline.name,
                    spec_text,
                    inputs_text,
                    state.status.value,
                    int(mirror),
                    now,
                    now,
                    key,
                    digest,
                    options.deadline_at,
                    options.budget_usd,
                    options.priority,
                    options.concurrency_key,
                    options.concurrency_limit,
                ),
            )
            conn.executemany(
                "INSERT INTO stages (run_id, name, model, status, position, needs) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        run_id,
                        name,
                        stage.model,
                        StageStatus.PENDING.value,
                        position,
                        json.dumps(list(stage.needs)),
                    )
                    for position, (name, stage) in enumerate(pipeline.stages.items())
                ],
            )
            self._apply(conn, run_id, Start(), now)
            return None

        self._cache.add_pipeline(run_id, pipeline, len(spec_text))
        replay = await self._write(op)
        if replay is not None:
            raise IdempotentReplay(*replay)
        self._changed()
        return run_id

    async def run_for_key(self, key: str) -> IdempotentReplay | None:
        def op(conn: sqlite3.Connection) -> IdempotentReplay | None:
            row = conn.execute(
                "SELECT id, request_hash FROM runs WHERE idempotency_key = ?", (key,)
            ).fetchone()
            return None if row is None else IdempotentReplay(row[0], row[1])

        return await self._read(op)

    async def apply(
        self, run_id: str, event: Event, *, now: float, finish_job: int | None = None
    ) -> Decision:
        await self._load_pipeline(run_id)

        def op(conn: sqlite3.Connection) -> Decision:
            decision = self._apply(conn, run_id, event, now)
            if finish_job is not None:
                conn.execute("DELETE FROM jobs WHERE id = ?", (finish_job,))
            return decision

        decision = await self._write(op)
        if decision.changed:
            self._changed()
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
        hashed = token_hash(token)
        submit_timeout_s = self.config.submit_timeout_s

        def op(conn: sqlite3.Connection) -> WebhookOutcome:
            # One statement reads all a delivery needs (each statement is a round of
            # Python-to-SQLite work on the writer, the receiver's bottleneck).
            row = conn.execute(
                "SELECT a.run_id, a.stage, a.attempt, a.task_id, a.state, a.created_at, "
                "r.cancelled, r.mirror, r.version, "
                "EXISTS (SELECT 1 FROM deliveries WHERE provider = ? AND webhook_id = ?) "
                "FROM attempts AS a JOIN runs AS r ON r.id = a.run_id "
                "WHERE a.token_hash = ?",
                (provider, webhook_id, hashed),
            ).fetchone()
            attempt = None if row is None else AttemptRow(*row[:6])
            verdict = webhook_verdict(
                attempt,
                task_id,
                seen=bool(row and row[9]),
                now=now,
                submit_timeout_s=submit_timeout_s,
            )
            if attempt is None:
                return WebhookOutcome("unknown_token")
            if verdict.effect is not None:
                return WebhookOutcome(verdict.effect, attempt.run_id, attempt.stage)
            if verdict.adopt:
                conn.execute(
                    "UPDATE attempts SET task_id = ?, state = 'accepted' WHERE token_hash = ?",
                    (task_id, hashed),
                )
            event = make_event(attempt.stage, attempt.attempt)
            run: _RunRow = (row[6], row[7], row[8])
            changed = (
                event is not None and self._apply(conn, attempt.run_id, event, now, run=run).changed
            )
            effect: WebhookEffect = "applied" if changed else "no_effect"
            inserted = conn.execute(
                "INSERT INTO deliveries (provider, webhook_id, run_id, stage, attempt, task_id, "
                "status, effect, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (
                    provider,
                    webhook_id,
                    attempt.run_id,
                    attempt.stage,
                    attempt.attempt,
                    task_id,
                    status,
                    effect,
                    now,
                ),
            ).rowcount
            if not inserted:  # recorded meanwhile: undo this operation, it is a duplicate
                raise _Duplicate(attempt.run_id, attempt.stage)
            return WebhookOutcome(effect, attempt.run_id, attempt.stage)

        try:
            outcome = await self._write(op)
        except _Duplicate as duplicate:
            return WebhookOutcome("duplicate", duplicate.run_id, duplicate.stage)
        if outcome.effect == "applied":
            self._changed()
        return outcome

    def _load_state(
        self, conn: sqlite3.Connection, run_id: str, run: _RunRow | None = None
    ) -> tuple[RunState, int]:
        """``run``: the run's (cancelled, mirror, version), if already read."""
        if run is None:
            run = conn.execute(
                "SELECT cancelled, mirror, version FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
            if run is None:
                raise KeyError(run_id)
        cancelled, mirror, version = run
        cached = self._cache.state(run_id, version)
        if cached is not None:
            return cached, version
        stages = {
            r[0]: StageState(
                status=StageStatus(r[1]),
                attempt=r[2],
                task_id=r[3],
                outputs=tuple(json.loads(r[4])),
                mirrored=tuple(json.loads(r[5])),
                error=r[6],
                base_attempt=r[7],
                cached=bool(r[8]),
                seed=r[9],
            )
            for r in conn.execute(
                "SELECT name, status, attempt, task_id, outputs, mirrored, error, base_attempt, "
                "cached, seed FROM stages WHERE run_id = ? ORDER BY position, rowid",
                (run_id,),
            )
        }
        state = RunState(run_id, stages, bool(cancelled), bool(mirror))
        self._cache.remember(state, version)
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
        pipeline = self._cache.pipeline_or_raise(run_id)
        before, version = self._load_state(conn, run_id, run)
        transition = plan(
            pipeline, before, event, now=now, deadlines=self.config.deadlines, new_id=event_id
        )
        if transition.changed:
            self._write_transition(conn, run_id, transition, version, now)
        return transition.decision

    def _write_transition(
        self, conn: sqlite3.Connection, run_id: str, t: Transition, version: int, now: float
    ) -> None:
        for write in t.stages:
            stage = write.state
            conn.execute(
                "UPDATE stages SET status = ?, attempt = ?, task_id = ?, outputs = ?, "
                "mirrored = ?, error = ?, base_attempt = ?, cached = ?, seed = ?, "
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
                    int(stage.cached),
                    stage.seed,
                    write.submitted,
                    now,
                    write.finished,
                    now,
                    run_id,
                    write.name,
                ),
            )
            if write.deadlines is not None:
                conn.execute(
                    "UPDATE stages SET deadline = ?, hard_deadline = ? "
                    "WHERE run_id = ? AND name = ?",
                    (*write.deadlines, run_id, write.name),
                )
        after = t.decision.state
        updated = conn.execute(
            "UPDATE runs SET status = ?, cancelled = ?, updated_at = ?, version = version + 1 "
            "WHERE id = ? AND version = ?",
            (after.status.value, int(after.cancelled), now, run_id, version),
        ).rowcount
        if updated != 1:  # a concurrent writer changed the run after we read it
            raise ConcurrentUpdateError(f"run {run_id} changed concurrently; try again")
        self._cache.remember(after, version + 1)
        if t.jobs:
            # A job carries its run's priority and concurrency key, for the governor.
            conn.executemany(
                "INSERT INTO jobs (kind, run_id, stage, attempt, run_after, provider, priority, "
                "concurrency_key, concurrency_limit) SELECT ?, id, ?, ?, ?, ?, priority, "
                "concurrency_key, concurrency_limit FROM runs WHERE id = ? "
                "ON CONFLICT DO NOTHING",
                [(j.kind, j.stage, j.attempt, j.run_after, j.provider, run_id) for j in t.jobs],
            )
        if t.events:
            spend = {
                (r[0], r[1]): Spent(r[2], r[3])
                for r in conn.execute(SPEND_BY_STAGE.format(runs="?"), (run_id,))
            }
            conn.executemany(
                "INSERT INTO outbox (event_id, run_id, type, body, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(e.event_id, run_id, e.type, priced(e.body, spend), now) for e in t.events],
            )

    # submit jobs --------------------------------------------------------------------

    async def submit_context(self, job: Job) -> SubmitContext:
        await self._load_pipeline(job.run_id)
        return await self._write(lambda conn: self._submit_context(conn, job), durable=False)

    def _submit_context(self, conn: sqlite3.Connection, job: Job) -> SubmitContext:
        pipeline = self._cache.pipeline_or_raise(job.run_id)
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
            previous_attempt=previous[0] if previous else None,
        )

    async def record_attempt(
        self,
        job: Job,
        token: str,
        *,
        provider: str,
        now: float,
        charge: Charge | None = None,
        cache_key: str | None = None,
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # One writer: the sums and the insert below are one atomic step.
            if charge is not None:
                (run_cap,) = conn.execute(
                    "SELECT budget_usd FROM runs WHERE id = ?", (job.run_id,)
                ).fetchone()
                if run_cap is not None or charge.daily_cap_usd is not None:
                    (run_spent,) = conn.execute(
                        "SELECT COALESCE(SUM(usd), 0) FROM spend WHERE run_id = ?", (job.run_id,)
                    ).fetchone()
                    (day_spent,) = conn.execute(
                        "SELECT COALESCE(SUM(usd), 0) FROM spend WHERE at >= ?",
                        (charge.day_start,),
                    ).fetchone()
                    budget.check(
                        job.stage,
                        charge,
                        run_cap=run_cap,
                        run_spent=float(run_spent),
                        day_spent=float(day_spent),
                    )
                conn.execute(
                    "INSERT OR REPLACE INTO spend (run_id, stage, attempt, pipeline, model, "
                    "provider, usd, source, at) VALUES (?, ?, ?, ?, ?, ?, ?, 'price_table', ?)",
                    (
                        job.run_id,
                        job.stage,
                        job.attempt,
                        charge.pipeline,
                        charge.model,
                        provider,
                        charge.usd,
                        now,
                    ),
                )
            conn.execute(
                "INSERT INTO attempts (token_hash, run_id, stage, attempt, state, created_at, "
                "provider, cache_key) VALUES (?, ?, ?, ?, 'sending', ?, ?, ?)",
                (token_hash(token), job.run_id, job.stage, job.attempt, now, provider, cache_key),
            )

        await self._db.run(op)

    async def accept_attempt(
        self,
        job: Job,
        token: str,
        task_id: str,
        events: Sequence[Event],
        *,
        now: float,
        cost_usd: float | None = None,
    ) -> Decision:
        await self._load_pipeline(job.run_id)

        def op(conn: sqlite3.Connection) -> Decision:
            conn.execute(
                "UPDATE attempts SET task_id = ?, state = 'accepted' WHERE token_hash = ?",
                (task_id, token_hash(token)),
            )
            if cost_usd is not None:
                conn.execute(
                    "UPDATE spend SET usd = ?, source = 'provider' "
                    "WHERE run_id = ? AND stage = ? AND attempt = ?",
                    (cost_usd, job.run_id, job.stage, job.attempt),
                )
            conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
            decision = Decision(self._load_state(conn, job.run_id)[0], (), changed=False)
            for event in events:
                decision = self._apply(conn, job.run_id, event, now)
            return decision

        decision = await self._write(op)
        self._changed()
        return decision

    async def discard_attempt(self, job: Job) -> None:
        def op(conn: sqlite3.Connection) -> None:
            for table in ("attempts", "spend"):
                conn.execute(
                    f"DELETE FROM {table} WHERE run_id = ? AND stage = ? AND attempt = ?",  # noqa: S608
                    (job.run_id, job.stage, job.attempt),
                )

        await self._db.run(op)

    async def spent(self, *, since: float) -> Spent:
        def op(conn: sqlite3.Connection) -> Spent:
            row = conn.execute(
                "SELECT COALESCE(SUM(usd), 0), COUNT(*) - COUNT(usd) FROM spend WHERE at >= ?",
                (since,),
            ).fetchone()
            return Spent(float(row[0]), int(row[1]))

        return await self._read(op)

    async def spend_report(self, *, since: float, by: str) -> list[dict[str, Any]]:
        key = {"pipeline": "pipeline", "model": "model", "day": "date(at, 'unixepoch')"}[by]

        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                f"SELECT {key}, COALESCE(SUM(usd), 0), COUNT(*) - COUNT(usd), COUNT(*) "  # noqa: S608
                "FROM spend WHERE at >= ? GROUP BY 1 ORDER BY 2 DESC, 1",
                (since,),
            )
            return [spend_row(r) for r in rows]

        return await self._read(op)

    async def attempt_unknown(self, job: Job, *, now: float) -> None:
        pipeline = await self._load_pipeline(job.run_id)
        _, limit = self.config.deadlines.for_stage(pipeline.stages[job.stage].timeout_s)

        def op(conn: sqlite3.Connection) -> None:
            # No task id to ask about: wait for the signed callback until the hard limit.
            conn.execute(
                "UPDATE stages SET deadline = ?, hard_deadline = ? "
                "WHERE run_id = ? AND name = ? AND attempt = ?",
                (now + limit, now + limit, job.run_id, job.stage, job.attempt),
            )
            _set_attempt_state(conn, job, "unknown")
            conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,))

        await self._db.run(op)

    async def attempt_rejected(self, job: Job) -> None:
        def op(conn: sqlite3.Connection) -> None:
            _set_attempt_state(conn, job, "rejected")
            conn.execute(
                "UPDATE spend SET usd = 0, source = 'rejected' "
                "WHERE run_id = ? AND stage = ? AND attempt = ?",
                (job.run_id, job.stage, job.attempt),
            )

        await self._db.run(op)

    async def claim_jobs(self, *, now: float, limit: int, lease_s: float) -> list[Job]:
        """Not durable: a lease lost in a power cut only lets the job be claimed again, and
        a submit is never sent twice blindly (its attempt row is durable before it leaves)."""

        governed = [p for p in self.config.governor.limits if self.config.governor.governs(p)]

        def op(conn: sqlite3.Connection) -> list[Job]:
            if governed:
                ids = self._governed_ids(conn, governed, now=now, limit=limit)
                rows = conn.execute(
                    "UPDATE jobs SET lease_until = ?, tries = tries + 1 WHERE id IN "
                    "(SELECT value FROM json_each(?)) "
                    "RETURNING id, kind, run_id, stage, attempt, tries, run_after",
                    (now + lease_s, json.dumps(ids)),
                ).fetchall()
            else:
                rows = conn.execute(
                    "UPDATE jobs SET lease_until = ?, tries = tries + 1 WHERE id IN ("
                    "SELECT id FROM jobs WHERE run_after <= ? "
                    "AND (lease_until IS NULL OR lease_until < ?) ORDER BY run_after, id LIMIT ?) "
                    "RETURNING id, kind, run_id, stage, attempt, tries, run_after",
                    (now + lease_s, now, now, limit),
                ).fetchall()
            rows.sort(key=lambda r: (r[6], r[0]))
            jobs = [Job(r[0], r[1], r[2], r[3], r[4], r[5], due_at=r[6]) for r in rows]
            return [self._with_context(conn, job) for job in jobs]

        return await self._db.run(op, durable=False)

    def _governed_ids(
        self, conn: sqlite3.Connection, governed: list[str], *, now: float, limit: int
    ) -> list[int]:
        """Due jobs to lease: any but governed providers' submits, then those submits
        while their account has room (inside the one write transaction: no other claim
        runs meanwhile)."""
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM jobs WHERE run_after <= ? AND (lease_until IS NULL OR "
                "lease_until < ?) AND NOT (kind = 'submit' AND COALESCE(provider, '') IN "
                "(SELECT value FROM json_each(?))) ORDER BY priority DESC, run_after, id LIMIT ?",
                (now, now, json.dumps(governed), limit),
            )
        ]
        keys: dict[str, int] | None = None
        for provider in governed:
            if len(ids) >= limit:
                break
            limits = self.config.governor.limits[provider]

            def one(sql: str, *args: Any) -> int:
                return int(conn.execute(governor_sql(sql, False), args).fetchone()[0])

            claimed = one(GOV_CLAIMED, provider, now)
            models = json.dumps(provider_models(provider))
            in_flight = (
                conn.execute(
                    "SELECT COUNT(*) FROM stages WHERE deadline IS NOT NULL "
                    "AND model IN (SELECT value FROM json_each(?))",
                    (models,),
                ).fetchone()[0]
                + one(GOV_SENDING, provider)
                + claimed
            )
            since = now - limits.counted_window_s
            usage = Usage(
                one(GOV_IN_WINDOW, provider, since) + claimed,
                in_flight,
                factor_of(conn.execute(
                    "SELECT factor, until FROM governor_state WHERE provider = ?", (provider,)
                ).fetchone(), now),
            )  # fmt: skip
            free = min(room(limits, usage), limit - len(ids))
            if free <= 0:
                continue
            waiting = [
                Waiting(*r)
                for r in conn.execute(
                    governor_sql(GOV_WAITING, False), (provider, now, now, free * 4 + 16)
                )
            ]
            if keys is None and any(w.concurrency_key for w in waiting):
                keys = dict(conn.execute(governor_sql(GOV_KEYS, False), (now,)).fetchall())
            ids += admit(waiting, free, keys or {})
        return ids

    def _with_context(self, conn: sqlite3.Connection, job: Job) -> Job:
        if job.kind != "submit" or self._cache.pipeline(job.run_id) is None:
            return job  # the job reads its context itself (parsing the spec off the writer)
        try:
            return Job(
                job.id,
                job.kind,
                job.run_id,
                job.stage,
                job.attempt,
                job.tries,
                context=self._submit_context(conn, job),
                due_at=job.due_at,
            )
        except Exception:
            # One run's unreadable state must not stop every claim: its job reads it
            # again, fails and backs off alone.
            return job

    async def throttle(self, provider: str, *, now: float, for_s: float) -> float:
        def op(conn: sqlite3.Connection) -> float:
            row = conn.execute(
                "SELECT factor, until FROM governor_state WHERE provider = ?", (provider,)
            ).fetchone()
            factor = throttled(row[0] if row else 1.0, bool(row) and row[1] > now)
            conn.execute(
                "INSERT OR REPLACE INTO governor_state (provider, factor, until) VALUES (?, ?, ?)",
                (provider, factor, now + for_s),
            )
            return factor

        return await self._db.run(op)

    async def retry_job(self, job: Job, *, at: float, error: str) -> None:
        await self._db.run(
            lambda conn: conn.execute(
                "UPDATE jobs SET run_after = ?, lease_until = NULL, last_error = ? WHERE id = ?",
                (at, error[:500], job.id),
            )
        )

    async def drop_job(self, job: Job) -> None:
        await self._db.run(lambda conn: conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,)))

    async def task_of(self, job: Job) -> TaskRef | None:
        def op(conn: sqlite3.Connection) -> TaskRef | None:
            row = conn.execute(
                "SELECT provider, task_id, state, cache_key FROM attempts "
                "WHERE run_id = ? AND stage = ? AND attempt = ?",
                (job.run_id, job.stage, job.attempt),
            ).fetchone()
            return None if row is None else TaskRef(*row)

        return await self._read(op)

    async def finish_delete(self, job: Job, *, deleted: bool) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if deleted:
                _set_attempt_state(conn, job, "deleted")
            conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,))

        await self._db.run(op)

    async def renew_lease(self, job: Job, *, until: float) -> None:
        await self._db.run(
            lambda conn: conn.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ?", (until, job.id)
            ),
            durable=False,
        )

    async def stage_state(self, run_id: str, stage: str) -> StageContext:
        pipeline = await self._load_pipeline(run_id)

        def op(conn: sqlite3.Connection) -> StageContext:
            state, _ = self._load_state(conn, run_id)
            return StageContext(pipeline.stages[stage].model, state.stages[stage], state.cancelled)

        return await self._db.run(op, durable=False)

    # reconciliation -------------------------------------------------------------------

    async def claim_due_stages(self, *, now: float, limit: int, lease_s: float) -> list[DueStage]:
        # Not durable: a claim lost in a power cut only means the stage is asked about again.
        rows = await self._db.run(
            lambda conn: conn.execute(
                "UPDATE stages SET deadline = ? WHERE rowid IN ("
                "SELECT rowid FROM stages WHERE deadline IS NOT NULL AND deadline <= ? "
                "ORDER BY deadline LIMIT ?) "
                "RETURNING run_id, name, attempt, task_id, status, hard_deadline, model",
                (now + lease_s, now, limit),
            ).fetchall(),
            durable=False,
        )
        return [due_stage(r, now) for r in rows]

    async def extend_deadline(self, run_id: str, stage: str, attempt: int, at: float) -> None:
        await self._db.run(
            lambda conn: conn.execute(
                "UPDATE stages SET deadline = ? "
                "WHERE run_id = ? AND name = ? AND attempt = ? AND deadline IS NOT NULL",
                (at, run_id, stage, attempt),
            )
        )

    async def cached_result(self, key: str) -> CacheEntry | None:
        def op(conn: sqlite3.Connection) -> CacheEntry | None:
            row = conn.execute(
                "SELECT key, run_id, stage, outputs, mirrored FROM result_cache WHERE key = ?",
                (key,),
            ).fetchone()
            return None if row is None else cache_entry(row)

        return await self._read(op)

    async def save_result(self, entry: CacheEntry, *, model: str, now: float) -> None:
        await self._db.run(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO result_cache (key, model, run_id, stage, outputs, "
                "mirrored, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.key,
                    model,
                    entry.run_id,
                    entry.stage,
                    json.dumps(entry.outputs),
                    json.dumps(entry.mirrored),
                    now,
                ),
            )
        )

    async def forget_result(self, key: str) -> None:
        await self._db.run(
            lambda conn: conn.execute("DELETE FROM result_cache WHERE key = ?", (key,))
        )

    async def overdue_runs(self, *, now: float, limit: int) -> list[tuple[str, float]]:
        def op(conn: sqlite3.Connection) -> list[tuple[str, float]]:
            rows = conn.execute(
                "SELECT id, deadline_at FROM runs WHERE deadline_at IS NOT NULL "
                "AND status = 'running' AND deadline_at <= ? ORDER BY deadline_at LIMIT ?",
                (now, limit),
            )
            return [(r[0], r[1]) for r in rows]

        return await self._read(op)

    # outbox ---------------------------------------------------------------------------

    async def pending_events(self, *, limit: int) -> list[OutboxRow]:
        def op(conn: sqlite3.Connection) -> list[OutboxRow]:
            rows = conn.execute(
                "SELECT seq, run_id, body, tries, not_before FROM outbox "
                "WHERE sent_at IS NULL AND dead_at IS NULL ORDER BY seq LIMIT ?",
                (limit,),
            )
            return [OutboxRow(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]

        return await self._read(op)

    async def mark_sent(self, seqs: Sequence[int], *, now: float) -> None:
        await self._db.run(
            lambda conn: conn.executemany(
                "UPDATE outbox SET sent_at = ?, tries = tries + 1, not_before = NULL WHERE seq = ?",
                [(now, seq) for seq in seqs],
            )
        )

    async def mark_failed(
        self, failures: Mapping[int, str], *, now: float, retry_at: Mapping[int, float | None]
    ) -> None:
        rows = [
            (error[:1000], retry_at.get(seq), None if retry_at.get(seq) else now, seq)
            for seq, error in failures.items()
        ]
        await self._db.run(
            lambda conn: conn.executemany(
                "UPDATE outbox SET tries = tries + 1, last_error = ?, not_before = ?, "
                "dead_at = ? WHERE seq = ?",
                rows,
            )
        )

    async def parked_events(self) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT seq, run_id, type, tries, last_error, dead_at, body FROM outbox "
                "WHERE dead_at IS NOT NULL ORDER BY seq"
            )
            return [parked(r) for r in rows]

        return await self._read(op)

    # singletons and retention ---------------------------------------------------------

    async def hold_lease(self, name: str, holder: str, *, now: float, ttl_s: float) -> bool:
        count = await self._db.run(
            lambda conn: (
                conn.execute(
                    "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                    "until = excluded.until "
                    "WHERE leases.holder = excluded.holder OR leases.until < ?",
                    (name, holder, now + ttl_s, now),
                ).rowcount
            ),
            durable=False,
        )
        return bool(count)

    async def release_lease(self, name: str, holder: str) -> None:
        await self._db.run(
            lambda conn: conn.execute(
                "DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder)
            )
        )

    async def prune(self, *, before: float) -> Pruned:
        def op(conn: sqlite3.Connection) -> Pruned:
            deliveries = conn.execute(
                "DELETE FROM deliveries WHERE received_at < ?", (before,)
            ).rowcount
            events = conn.execute(
                "DELETE FROM outbox WHERE sent_at < ? OR dead_at < ?", (before, before)
            ).rowcount
            attempts = conn.execute(
                "DELETE FROM attempts WHERE created_at < ? AND run_id IN "
                "(SELECT id FROM runs WHERE status != 'running')",
                (before,),
            ).rowcount
            return Pruned(deliveries, events, attempts)

        return await self._db.run(op)

    # reads ----------------------------------------------------------------------------

    async def gauges(self) -> dict[str, Any]:
        def op(conn: sqlite3.Connection) -> dict[str, Any]:
            pending, oldest = conn.execute(
                "SELECT COUNT(*), MIN(created_at) FROM outbox "
                "WHERE sent_at IS NULL AND dead_at IS NULL"
            ).fetchone()
            parked = conn.execute("SELECT COUNT(*) FROM outbox WHERE dead_at IS NOT NULL")
            runs = dict(conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"))
            return {
                "pending_events": pending,
                "oldest_pending_event_at": oldest,
                "parked_events": parked.fetchone()[0],
                "runs": runs,
            }

        return await self._read(op)

    async def get_run(self, run_id: str) -> RunView | None:
        def op(conn: sqlite3.Connection) -> RunView | None:
            row = conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs "  # noqa: S608
                "WHERE id = ?",
                (run_id,),
            ).fetchone()
            return None if row is None else _views(conn, [tuple(row)])[0]

        return await self._read(op)

    async def list_runs(
        self,
        *,
        limit: int = 50,
        status: str | None = None,
        pipeline: str | None = None,
        cursor: str | None = None,
    ) -> RunPage:
        after = Cursor.decode(cursor) if cursor else None

        def op(conn: sqlite3.Connection) -> RunPage:
            query = f"SELECT {RUN_COLUMNS} FROM runs"  # noqa: S608
            where: list[str] = []
            args: list[Any] = []
            if status is not None:
                where.append("status = ?")
                args.append(status)
            if pipeline is not None:
                where.append("pipeline = ?")
                args.append(pipeline)
            if after is not None:
                where.append("(created_at, id) < (?, ?)")
                args.extend(after)
            if where:
                query += " WHERE " + " AND ".join(where)
            query += " ORDER BY created_at DESC, id DESC LIMIT ?"
            rows = [tuple(r) for r in conn.execute(query, (*args, limit + 1))]
            more = len(rows) > limit
            views = _views(conn, rows[:limit])
            last = views[-1] if more and views else None
            return RunPage(views, Cursor(last.created_at, last.id).encode() if last else None)

        return await self._read(op)

    async def outbox(self, run_id: str | None = None) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = "SELECT body FROM outbox"
            rows = (
                conn.execute(sql + " WHERE run_id = ? ORDER BY seq", (run_id,))
                if run_id
                else conn.execute(sql + " ORDER BY seq")
            )
            return [json.loads(r[0]) for r in rows]

        return await self._read(op)

    async def deliveries(self, run_id: str) -> list[dict[str, Any]]:
        return await self._read(
            lambda conn: [
                dict(r)
                for r in conn.execute(
                    "SELECT provider, webhook_id, run_id, stage, attempt, task_id, status, "
                    "effect, received_at FROM deliveries WHERE run_id = ? ORDER BY received_at",
                    (run_id,),
                )
            ]
        )


class _Duplicate(Exception):
    def __init__(self, run_id: str, stage: str) -> None:
        super().__init__(run_id)
        self.run_id, self.stage = run_id, stage


def _set_attempt_state(conn: sqlite3.Connection, job: Job, state: AttemptState) -> None:
    conn.execute(
        "UPDATE attempts SET state = ? WHERE run_id = ? AND stage = ? AND attempt = ?",
        (state, job.run_id, job.stage, job.attempt),
    )


def _views(conn: sqlite3.Connection, runs: Sequence[tuple[Any, ...]]) -> list[RunView]:
    """Runs (read as ``rows`` describes) with their stages, in pipeline order."""
    if not runs:
        return []
    ids = [r[0] for r in runs]
    stages: dict[str, list[StageView]] = {run_id: [] for run_id in ids}
    query = (
        "SELECT run_id, name, model, status, attempt, task_id, outputs, mirrored, error, "  # noqa: S608
        f"submitted_at, finished_at, needs, cached, {STAGE_SPEND} FROM stages WHERE run_id IN "
        "(SELECT value FROM json_each(?)) ORDER BY run_id, position, rowid"
    )
    for r in conn.execute(query, (json.dumps(ids),)):
        stages[r[0]].append(stage_view(r[1:]))
    return [run_view(r, stages[r[0]]) for r in runs]
