"""The PostgreSQL backend: several processes and replicas on one database (asyncpg).

- Every public method is one transaction on a pooled connection, and every one that
  acknowledges something returns only after its COMMIT.
- Webhook deliveries queued in one turn of the event loop share one transaction (group
  commit, as on SQLite), read and written in bulk: a batch costs about ten round trips
  whatever its size. A batch that fails is run again one delivery per transaction.
- A transition from a job or the API locks its run's row (``FOR UPDATE``), so those of
  one run are serialised across replicas; webhook batches read optimistically, and the
  run's version check (every transition's guard) and the deliveries' key catch a race.
  Deliveries, jobs and events are unique by constraint.
- Jobs and due stages are claimed with ``FOR UPDATE SKIP LOCKED``.
- A commit that adds jobs or events sends ``NOTIFY``; every replica listens, so work made
  ready on one is picked up by any within milliseconds.
- Migrations are versioned and applied at start under an advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from pipelines import budget
from pipelines import spec as specs
from pipelines.backoff import backoff_s
from pipelines.errors import ConcurrentUpdateError
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
from pipelines.store.cache import RunCache, parse_stored
from pipelines.store.interface import Listener, StoreConfig
from pipelines.store.postgres_schema import migrate
from pipelines.store.postgres_writes import EVENTS_CHANNEL, JOBS_CHANNEL, Writes
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
    STAGE_SPEND,
    cache_entry,
    due_stage,
    event_id,
    factor_of,
    governor_sql,
    parked,
    provider_models,
    run_view,
    spend_row,
    stage_view,
)
from pipelines.transitions import (
    AttemptRow,
    AttemptState,
    Transition,
    WebhookEffect,
    plan,
    token_hash,
    webhook_verdict,
)

log = structlog.get_logger("wavechain.store")

#: Most deliveries in one batch transaction, and batches in flight at once.
MAX_BATCH = 256
MAX_FLUSHES = 4

_STAGES_OF_RUNS = (
    "SELECT run_id, name, model, status, attempt, task_id, outputs, mirrored, error, "  # noqa: S608
    f"submitted_at, finished_at, needs, cached, {STAGE_SPEND} FROM stages "
    "WHERE run_id = ANY($1) ORDER BY run_id, position"
)
#: The advisory lock budgeted submits take, one at a time ("wavechab" in ASCII).
_BUDGET_LOCK = 0x7761766563686162
#: The advisory lock governed claims take, one at a time ("wavechag").
_GOVERNOR_LOCK = 0x7761766563686167
_RUN_BY_ID = f"SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"  # noqa: S608


def _count(status: str) -> int:
    """The row count of a command tag ("UPDATE 3", "INSERT 0 1")."""
    return int(status.rsplit(" ", 1)[-1])


@dataclass(slots=True)
class _Delivery:
    """One queued webhook call, answered when its batch commits."""

    provider: str
    webhook_id: str
    token_hash: str
    task_id: str
    status: str
    make_event: Callable[[str, int], Event | None]
    now: float
    future: asyncio.Future[WebhookOutcome]


class PostgresStore:
    def __init__(self, database_url: str, config: StoreConfig | None = None) -> None:
        self.config = config or StoreConfig()
        self._url = database_url
        self._pool_size = self.config.pool_size
        self._pool: Any = None
        self._cache = RunCache(
            max_runs=self.config.cached_runs, max_spec_bytes=self.config.cached_spec_bytes
        )
        self._job_listeners: list[Listener] = []
        self._event_listeners: list[Listener] = []
        self._listener_task: asyncio.Task[None] | None = None
        self._pending: list[_Delivery] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.operations = 0

    @property
    def stats(self) -> dict[str, int]:
        return {"batches": self.batches, "operations": self.operations}

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._url,
            min_size=min(2, self._pool_size),
            max_size=self._pool_size,
            # Plans for the values at hand: a generic plan chosen while a table was small
            # (a hashed scan of deliveries, say) must not stay once it has grown.
            server_settings={"plan_cache_mode": "force_custom_plan"},
        )
        async with self._pool.acquire() as conn:
            await migrate(conn)
        self._listener_task = asyncio.create_task(self._listen(), name="store-listener")

    async def close(self) -> None:
        if self._listener_task is not None:
            self._listener_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener_task
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if self._pool is not None:
            await self._pool.close()

    def listen(self, *, jobs: Listener | None = None, events: Listener | None = None) -> None:
        if jobs is not None:
            self._job_listeners.append(jobs)
        if events is not None:
            self._event_listeners.append(events)

    def _jobs_added(self) -> None:
        for listener in self._job_listeners:
            listener()

    def _events_added(self) -> None:
        for listener in self._event_listeners:
            listener()

    def _changed(self) -> None:
        self._jobs_added()
        self._events_added()

    async def _listen(self) -> None:
        """LISTEN for other replicas' commits on a connection of its own; reconnect when
        it drops (and wake everyone then: what came meanwhile was not heard)."""
        failures = 0
        while True:
            try:
                conn = await asyncpg.connect(self._url)
            except (OSError, asyncpg.PostgresError) as exc:
                failures += 1
                log.warning("store.listen_failed", error=repr(exc))
                await asyncio.sleep(backoff_s(failures, base=0.5, cap=10.0))
                continue
            failures = 0
            lost = asyncio.Event()
            try:
                conn.add_termination_listener(lambda _, lost=lost: lost.set())
                await conn.add_listener(JOBS_CHANNEL, lambda *_: self._jobs_added())
                await conn.add_listener(EVENTS_CHANNEL, lambda *_: self._events_added())
                self._changed()
                await lost.wait()
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def ping(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def _tx(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """``fn`` in one transaction. If it fails, the run states it cached may describe
        versions that were never committed: they are forgotten."""
        self.operations += 1
        self.batches += 1
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                return await fn(conn)
        except BaseException:
            self._cache.forget_states()
            raise

    async def _pipelines(self, conn: Any, run_ids: Sequence[str]) -> None:
        """Make sure the parsed specs of ``run_ids`` are cached."""
        missing = [r for r in set(run_ids) if self._cache.pipeline(r) is None]
        if not missing:
            return
        for row in await conn.fetch("SELECT id, spec FROM runs WHERE id = ANY($1)", missing):
            self._cache.add_pipeline(row[0], parse_stored(row[0], row[1]), len(row[1]))

    async def _pipeline(self, conn: Any, run_id: str) -> specs.Pipeline:
        await self._pipelines(conn, [run_id])
        pipeline = self._cache.pipeline(run_id)
        if pipeline is None:
            raise KeyError(run_id)
        return pipeline

    async def _lock_runs(self, conn: Any, run_ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """Lock the runs' rows, in id order (no deadlocks between batches): run id →
        (cancelled, mirror, version)."""
        rows = await conn.fetch(
            "SELECT id, cancelled, mirror, version FROM runs WHERE id = ANY($1) "
            "ORDER BY id FOR UPDATE",
            sorted(set(run_ids)),
        )
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    async def _states(
        self, conn: Any, runs: Mapping[str, tuple[Any, ...]]
    ) -> dict[str, tuple[RunState, int]]:
        """Each run's state and version: cached where the version matches, else read."""
        out: dict[str, tuple[RunState, int]] = {}
        missing: list[str] = []
        for run_id, (_, _, version) in runs.items():
            cached = self._cache.state(run_id, version)
            if cached is None:
                missing.append(run_id)
            else:
                out[run_id] = (cached, version)
        if missing:
            stages: dict[str, dict[str, StageState]] = {r: {} for r in missing}
            for r in await conn.fetch(
                "SELECT run_id, name, status, attempt, task_id, outputs, mirrored, error, "
                "base_attempt, cached, seed FROM stages WHERE run_id = ANY($1) "
                "ORDER BY run_id, position",
                missing,
            ):
                stages[r[0]][r[1]] = StageState(
                    status=StageStatus(r[2]),
                    attempt=r[3],
                    task_id=r[4],
                    outputs=tuple(json.loads(r[5])),
                    mirrored=tuple(json.loads(r[6])),
                    error=r[7],
                    base_attempt=r[8],
                    cached=r[9],
                    seed=r[10],
                )
            for run_id in missing:
                cancelled, mirror, version = runs[run_id]
                state = RunState(run_id, stages[run_id], bool(cancelled), bool(mirror))
                self._cache.remember(state, version)
                out[run_id] = (state, version)
        return out

    def _plan(self, run_id: str, before: RunState, event: Event, now: float) -> Transition:
        pipeline = self._cache.pipeline(run_id)
        if pipeline is None:
            raise KeyError(run_id)
        return plan(
            pipeline, before, event, now=now, deadlines=self.config.deadlines, new_id=event_id
        )

    async def _apply_events(
        self, conn: Any, run_id: str, events: Sequence[Event], now: float
    ) -> Decision:
        """Lock the run, apply ``events`` in order, write: within the caller's transaction."""
        await self._pipelines(conn, [run_id])
        runs = await self._lock_runs(conn, [run_id])
        if run_id not in runs:
            raise KeyError(run_id)
        state, version = (await self._states(conn, runs))[run_id]
        writes = Writes()
        decision = Decision(state, (), changed=False)
        for event in events:
            transition = self._plan(run_id, state, event, now)
            decision = transition.decision
            if transition.changed:
                writes.add(run_id, transition, version, now)
                state = decision.state
        await writes.flush(conn)
        if writes.runs:
            self._cache.remember(state, version + 1)
        return decision

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
        state = initial_state(run_id, pipeline, mirror=mirror)
        key, digest = idempotency or (None, None)

        async def op(conn: Any) -> tuple[str, str] | None:
            # ON CONFLICT waits for a concurrent insert of the same key to commit, then does
            # nothing; the SELECT (a new snapshot, READ COMMITTED) then sees that run.
            inserted = await conn.fetchval(
                "INSERT INTO runs (id, pipeline, spec, inputs, status, mirror, created_at, "
                "updated_at, idempotency_key, request_hash, deadline_at, budget_usd, priority, "
                "concurrency_key, concurrency_limit) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $10, $11, $12, $13, $14) "
                "ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING "
                "RETURNING id",
                run_id,
                pipeline.name,
                spec_text,
                json.dumps(dict(inputs)),
                state.status.value,
                mirror,
                now,
                key,
                digest,
                options.deadline_at,
                options.budget_usd,
                options.priority,
                options.concurrency_key,
                options.concurrency_limit,
            )
            if inserted is None:
                found = await conn.fetchrow(
                    "SELECT id, request_hash FROM runs WHERE idempotency_key = $1", key
                )
                return str(found["id"]), str(found["request_hash"])
            await conn.executemany(
                "INSERT INTO stages (run_id, name, model, status, position, needs) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
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
            await self._apply_events(conn, run_id, [Start()], now)
            return None

        self._cache.add_pipeline(run_id, pipeline, len(spec_text))
        replay = await self._tx(op)
        if replay is not None:
            raise IdempotentReplay(*replay)
        self._changed()
        return run_id

    async def run_for_key(self, key: str) -> IdempotentReplay | None:
        row = await self._read(
            lambda conn: conn.fetchrow(
                "SELECT id, request_hash FROM runs WHERE idempotency_key = $1", key
            )
        )
        return None if row is None else IdempotentReplay(str(row[0]), str(row[1]))

    async def apply(
        self, run_id: str, event: Event, *, now: float, finish_job: int | None = None
    ) -> Decision:
        async def op(conn: Any) -> Decision:
            decision = await self._apply_events(conn, run_id, [event], now)
            if finish_job is not None:
                await conn.execute("DELETE FROM jobs WHERE id = $1", finish_job)
            return decision

        decision: Decision = await self._tx(op)
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
        loop = asyncio.get_running_loop()
        future: asyncio.Future[WebhookOutcome] = loop.create_future()
        first = not self._pending
        self._pending.append(
            _Delivery(
                provider, webhook_id, token_hash(token), task_id, status, make_event, now, future
            )
        )
        if first:  # the deliveries of this turn of the loop go together, at its end
            loop.call_soon(self._start_flush)
        outcome = await future
        if outcome.effect == "applied":
            self._changed()
        return outcome

    def _start_flush(self) -> None:
        # At most MAX_FLUSHES batches in flight: what arrives meanwhile waits for the next
        # one, so that under load batches grow (one transaction, about ten round trips,
        # for dozens of deliveries) instead of many small transactions contending.
        if not self._pending or len(self._flushes) >= MAX_FLUSHES:
            return
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        task = asyncio.create_task(self._flush(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._start_flush()

    async def _flush(self, batch: list[_Delivery]) -> None:
        try:
            outcomes = await self._tx_batch(batch)
        except Exception:
            # One bad delivery must not fail the others: each in its own transaction.
            for delivery in batch:
                await self._deliver_alone(delivery)
            return
        for delivery, outcome in zip(batch, outcomes, strict=True):
            if not delivery.future.done():
                delivery.future.set_result(outcome)

    async def _deliver_alone(self, delivery: _Delivery) -> None:
        """One delivery in its own transaction; a race lost to a busy run is run again
        (twice at most), any other error goes to its caller."""
        for tries in range(3):
            try:
                (outcome,) = await self._tx_batch([delivery])
            except ConcurrentUpdateError as exc:
                if tries == 2:
                    if not delivery.future.done():
                        delivery.future.set_exception(exc)
                    return
                await asyncio.sleep(0.01 * (tries + 1))
                continue
            except Exception as exc:
                if not delivery.future.done():
                    delivery.future.set_exception(exc)
                return
            if not delivery.future.done():
                delivery.future.set_result(outcome)
            return

    async def _tx_batch(self, batch: Sequence[_Delivery]) -> list[WebhookOutcome]:
        self.batches += 1
        self.operations += len(batch)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                return await self._deliver(conn, batch)
        except BaseException:
            self._cache.forget_states()
            raise

    async def _deliver(self, conn: Any, batch: Sequence[_Delivery]) -> list[WebhookOutcome]:
        hashes = [d.token_hash for d in batch]
        # One statement reads all the batch needs: each token's attempt, its run's
        # version, and whether the webhook-id was recorded. Optimistic, with no row lock:
        # the run's version guards its write and the deliveries' key guards the record;
        # a batch that loses a race is rolled back and its deliveries are run again
        # one by one (where a duplicate is then seen as one).
        rows = await conn.fetch(
            "SELECT w.i, a.run_id, a.stage, a.attempt, a.task_id, a.state, a.created_at, "
            "EXISTS (SELECT 1 FROM deliveries d WHERE d.provider = w.provider "
            "AND d.webhook_id = w.webhook_id), r.cancelled, r.mirror, r.version "
            "FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY "
            "AS w(token_hash, provider, webhook_id, i) "
            "LEFT JOIN attempts a ON a.token_hash = w.token_hash "
            "LEFT JOIN runs r ON r.id = a.run_id ORDER BY w.i",
            hashes,
            [d.provider for d in batch],
            [d.webhook_id for d in batch],
        )
        runs = {r[1]: (r[8], r[9], r[10]) for r in rows if r[10] is not None}
        await self._pipelines(conn, list(runs))
        states = await self._states(conn, runs)
        writes = Writes()
        adopted: list[tuple[str, str]] = []
        recorded: list[tuple[Any, ...]] = []
        seen_here: set[tuple[str, str]] = set()
        outcomes: list[WebhookOutcome] = []
        for delivery, row in zip(batch, rows, strict=True):
            attempt = None if row[1] is None else AttemptRow(*row[1:7])
            key = (delivery.provider, delivery.webhook_id)
            verdict = webhook_verdict(
                attempt,
                delivery.task_id,
                seen=bool(row[7]) or key in seen_here,
                now=delivery.now,
                submit_timeout_s=self.config.submit_timeout_s,
            )
            if attempt is None or attempt.run_id not in states:
                outcomes.append(WebhookOutcome("unknown_token"))
                continue
            if verdict.effect is not None:
                outcomes.append(WebhookOutcome(verdict.effect, attempt.run_id, attempt.stage))
                continue
            if verdict.adopt:
                adopted.append((delivery.task_id, delivery.token_hash))
            event = delivery.make_event(attempt.stage, attempt.attempt)
            effect: WebhookEffect = "no_effect"
            if event is not None:
                state, version = states[attempt.run_id]
                transition = self._plan(attempt.run_id, state, event, delivery.now)
                if transition.changed:
                    writes.add(attempt.run_id, transition, version, delivery.now)
                    states[attempt.run_id] = (transition.decision.state, version)
                    effect = "applied"
            seen_here.add(key)
            recorded.append(
                (
                    delivery.provider,
                    delivery.webhook_id,
                    attempt.run_id,
                    attempt.stage,
                    attempt.attempt,
                    delivery.task_id,
                    delivery.status,
                    effect,
                    delivery.now,
                )
            )
            outcomes.append(WebhookOutcome(effect, attempt.run_id, attempt.stage))
        if adopted:
            await conn.executemany(
                "UPDATE attempts SET task_id = $1, state = 'accepted' WHERE token_hash = $2",
                adopted,
            )
        await writes.flush(conn)
        if recorded:
            inserted = await conn.fetch(
                "INSERT INTO deliveries (provider, webhook_id, run_id, stage, attempt, task_id, "
                "status, effect, received_at) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
                "$5::int[], $6::text[], $7::text[], $8::text[], $9::float8[]) "
                "ON CONFLICT DO NOTHING RETURNING webhook_id",
                *(list(column) for column in zip(*recorded, strict=True)),
            )
            if len(inserted) != len(recorded):  # recorded meanwhile: not ours to apply
                raise ConcurrentUpdateError("a delivery was recorded concurrently")
        for run_id, version in ((r, v[4]) for r, v in writes.runs.items()):
            self._cache.remember(states[run_id][0], version + 1)
        return outcomes

    # submit jobs --------------------------------------------------------------------

    async def submit_context(self, job: Job) -> SubmitContext:
        async def op(conn: Any) -> SubmitContext:
            return await self._submit_context(conn, job)

        context: SubmitContext = await self._tx(op)
        return context

    async def _submit_context(self, conn: Any, job: Job) -> SubmitContext:
        pipeline = await self._pipeline(conn, job.run_id)
        run = await conn.fetchrow(
            "SELECT cancelled, mirror, version, inputs FROM runs WHERE id = $1", job.run_id
        )
        if run is None:
            raise KeyError(job.run_id)
        state, _ = (await self._states(conn, {job.run_id: (run[0], run[1], run[2])}))[job.run_id]
        previous = await conn.fetchval(
            "SELECT state FROM attempts WHERE run_id = $1 AND stage = $2 AND attempt = $3",
            job.run_id,
            job.stage,
            job.attempt,
        )
        upstream = {
            name: s for name, s in state.stages.items() if s.status is StageStatus.SUCCEEDED
        }
        return SubmitContext(
            pipeline=pipeline,
            inputs=json.loads(run[3]),
            stage=state.stages[job.stage],
            upstream=upstream,
            cancelled=state.cancelled,
            previous_attempt=previous,
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
        async def op(conn: Any) -> None:
            if charge is not None:
                run_cap = await conn.fetchval(
                    "SELECT budget_usd FROM runs WHERE id = $1", job.run_id
                )
                if run_cap is not None or charge.daily_cap_usd is not None:
                    # One budgeted submit at a time across every process and replica: the
                    # sums below and the insert after them are one atomic step.
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _BUDGET_LOCK)
                    run_spent = await conn.fetchval(
                        "SELECT COALESCE(SUM(usd), 0) FROM spend WHERE run_id = $1", job.run_id
                    )
                    day_spent = await conn.fetchval(
                        "SELECT COALESCE(SUM(usd), 0) FROM spend WHERE at >= $1",
                        charge.day_start,
                    )
                    budget.check(
                        job.stage,
                        charge,
                        run_cap=run_cap,
                        run_spent=float(run_spent),
                        day_spent=float(day_spent),
                    )
                await conn.execute(
                    "INSERT INTO spend (run_id, stage, attempt, pipeline, model, provider, usd, "
                    "source, at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'price_table', $8) "
                    "ON CONFLICT (run_id, stage, attempt) DO UPDATE SET usd = EXCLUDED.usd, "
                    "source = EXCLUDED.source, at = EXCLUDED.at",
                    job.run_id,
                    job.stage,
                    job.attempt,
                    charge.pipeline,
                    charge.model,
                    provider,
                    charge.usd,
                    now,
                )
            await conn.execute(
                "INSERT INTO attempts (token_hash, run_id, stage, attempt, state, created_at, "
                "provider, cache_key) VALUES ($1, $2, $3, $4, 'sending', $5, $6, $7)",
                token_hash(token),
                job.run_id,
                job.stage,
                job.attempt,
                now,
                provider,
                cache_key,
            )

        await self._tx(op)

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
        async def op(conn: Any) -> Decision:
            await self._lock_runs(conn, [job.run_id])
            await conn.execute(
                "UPDATE attempts SET task_id = $1, state = 'accepted' WHERE token_hash = $2",
                task_id,
                token_hash(token),
            )
            if cost_usd is not None:
                await conn.execute(
                    "UPDATE spend SET usd = $1, source = 'provider' "
                    "WHERE run_id = $2 AND stage = $3 AND attempt = $4",
                    cost_usd,
                    job.run_id,
                    job.stage,
                    job.attempt,
                )
            await conn.execute("DELETE FROM jobs WHERE id = $1", job.id)
            return await self._apply_events(conn, job.run_id, events, now)

        decision: Decision = await self._tx(op)
        self._changed()
        return decision

    async def discard_attempt(self, job: Job) -> None:
        async def op(conn: Any) -> None:
            for table in ("attempts", "spend"):
                await conn.execute(
                    f"DELETE FROM {table} WHERE run_id = $1 AND stage = $2 AND attempt = $3",  # noqa: S608
                    job.run_id,
                    job.stage,
                    job.attempt,
                )

        await self._tx(op)

    async def spent(self, *, since: float) -> Spent:
        row = await self._read(
            lambda conn: conn.fetchrow(
                "SELECT COALESCE(SUM(usd), 0), COUNT(*) - COUNT(usd) FROM spend WHERE at >= $1",
                since,
            )
        )
        return Spent(float(row[0]), int(row[1]))

    async def spend_report(self, *, since: float, by: str) -> list[dict[str, Any]]:
        key = {
            "pipeline": "pipeline",
            "model": "model",
            "day": "to_char(to_timestamp(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        }[by]
        rows = await self._read(
            lambda conn: conn.fetch(
                f"SELECT {key} AS key, COALESCE(SUM(usd), 0) AS usd, "  # noqa: S608
                "COUNT(*) - COUNT(usd) AS unknown, COUNT(*) AS attempts FROM spend "
                "WHERE at >= $1 GROUP BY 1 ORDER BY 2 DESC, 1",
                since,
            )
        )
        return [spend_row(r) for r in rows]

    async def attempt_unknown(self, job: Job, *, now: float) -> None:
        async def op(conn: Any) -> None:
            pipeline = await self._pipeline(conn, job.run_id)
            _, limit = self.config.deadlines.for_stage(pipeline.stages[job.stage].timeout_s)
            await conn.execute(
                "UPDATE stages SET deadline = $1, hard_deadline = $1 "
                "WHERE run_id = $2 AND name = $3 AND attempt = $4",
                now + limit,
                job.run_id,
                job.stage,
                job.attempt,
            )
            await _set_attempt_state(conn, job, "unknown")
            await conn.execute("DELETE FROM jobs WHERE id = $1", job.id)

        await self._tx(op)

    async def attempt_rejected(self, job: Job) -> None:
        async def op(conn: Any) -> None:
            await _set_attempt_state(conn, job, "rejected")
            await conn.execute(
                "UPDATE spend SET usd = 0, source = 'rejected' "
                "WHERE run_id = $1 AND stage = $2 AND attempt = $3",
                job.run_id,
                job.stage,
                job.attempt,
            )

        await self._tx(op)

    async def claim_jobs(self, *, now: float, limit: int, lease_s: float) -> list[Job]:
        governed = [p for p in self.config.governor.limits if self.config.governor.governs(p)]

        async def op(conn: Any) -> list[Job]:
            if governed:
                ids = await self._governed_ids(conn, governed, now=now, limit=limit)
                rows = await conn.fetch(
                    "UPDATE jobs SET lease_until = $1, tries = tries + 1 WHERE id = ANY($2) "
                    "RETURNING id, kind, run_id, stage, attempt, tries, run_after",
                    now + lease_s,
                    ids,
                )
            else:
                rows = await conn.fetch(
                    "UPDATE jobs SET lease_until = $1, tries = tries + 1 WHERE id IN ("
                    "SELECT id FROM jobs WHERE run_after <= $2 "
                    "AND (lease_until IS NULL OR lease_until < $2) ORDER BY run_after, id "
                    "LIMIT $3 FOR UPDATE SKIP LOCKED) "
                    "RETURNING id, kind, run_id, stage, attempt, tries, run_after",
                    now + lease_s,
                    now,
                    limit,
                )
            jobs = sorted(
                (Job(r[0], r[1], r[2], r[3], r[4], r[5], due_at=r[6]) for r in rows),
                key=lambda j: (j.due_at or 0.0, j.id),
            )
            out = []
            for job in jobs:
                context = None
                if job.kind == "submit":
                    try:
                        async with conn.transaction():  # a savepoint: one bad run alone
                            context = await self._submit_context(conn, job)
                    except Exception:
                        context = None  # the job reads it again, fails and backs off alone
                out.append(
                    Job(
                        job.id,
                        job.kind,
                        job.run_id,
                        job.stage,
                        job.attempt,
                        job.tries,
                        context=context,
                        due_at=job.due_at,
                    )
                )
            return out

        jobs: list[Job] = await self._tx(op)
        return jobs

    async def _governed_ids(
        self, conn: Any, governed: list[str], *, now: float, limit: int
    ) -> list[int]:
        """Due jobs to lease: any but governed providers' submits, then those submits
        while their account has room. One claim at a time across replicas (an advisory
        lock for the transaction): the counts and the leases are one step."""
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _GOVERNOR_LOCK)
        ids = [
            r[0]
            for r in await conn.fetch(
                "SELECT id FROM jobs WHERE run_after <= $1 AND (lease_until IS NULL OR "
                "lease_until < $1) AND NOT (kind = 'submit' AND COALESCE(provider, '') = "
                "ANY($2)) ORDER BY priority DESC, run_after, id LIMIT $3 FOR UPDATE SKIP LOCKED",
                now,
                governed,
                limit,
            )
        ]
        keys: dict[str, int] | None = None
        for provider in governed:
            if len(ids) >= limit:
                break
            limits = self.config.governor.limits[provider]

            async def one(sql: str, *args: Any) -> int:
                return int(await conn.fetchval(governor_sql(sql, True), *args))

            claimed = await one(GOV_CLAIMED, provider, now)
            in_flight = (
                int(
                    await conn.fetchval(
                        "SELECT COUNT(*) FROM stages WHERE deadline IS NOT NULL "
                        "AND model = ANY($1)",
                        provider_models(provider),
                    )
                )
                + await one(GOV_SENDING, provider)
                + claimed
            )
            state = await conn.fetchrow(
                "SELECT factor, until FROM governor_state WHERE provider = $1", provider
            )
            since = now - limits.counted_window_s
            usage = Usage(
                await one(GOV_IN_WINDOW, provider, since) + claimed,
                in_flight,
                factor_of(state, now),
            )
            free = min(room(limits, usage), limit - len(ids))
            if free <= 0:
                continue
            rows = await conn.fetch(
                governor_sql(GOV_WAITING, True), provider, now, now, free * 4 + 16
            )
            waiting = [Waiting(r[0], r[1], r[2]) for r in rows]
            if keys is None and any(w.concurrency_key for w in waiting):
                found = await conn.fetch(governor_sql(GOV_KEYS, True), now)
                keys = {str(r[0]): int(r[1]) for r in found}
            ids += admit(waiting, free, keys or {})
        return ids

    async def throttle(self, provider: str, *, now: float, for_s: float) -> float:
        async def op(conn: Any) -> float:
            row = await conn.fetchrow(
                "SELECT factor, until FROM governor_state WHERE provider = $1 FOR UPDATE",
                provider,
            )
            factor = throttled(float(row[0]) if row else 1.0, bool(row) and row[1] > now)
            await conn.execute(
                "INSERT INTO governor_state (provider, factor, until) VALUES ($1, $2, $3) "
                "ON CONFLICT (provider) DO UPDATE SET factor = EXCLUDED.factor, "
                "until = EXCLUDED.until",
                provider,
                factor,
                now + for_s,
            )
            return factor

        result: float = await self._tx(op)
        return result

    async def retry_job(self, job: Job, *, at: float, error: str) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "UPDATE jobs SET run_after = $1, lease_until = NULL, last_error = $2 WHERE id = $3",
                at,
                error[:500],
                job.id,
            )
        )
        self._jobs_added()

    async def drop_job(self, job: Job) -> None:
        await self._tx(lambda conn: conn.execute("DELETE FROM jobs WHERE id = $1", job.id))

    async def task_of(self, job: Job) -> TaskRef | None:
        async def op(conn: Any) -> TaskRef | None:
            row = await conn.fetchrow(
                "SELECT provider, task_id, state, cache_key FROM attempts "
                "WHERE run_id = $1 AND stage = $2 AND attempt = $3",
                job.run_id,
                job.stage,
                job.attempt,
            )
            return None if row is None else TaskRef(row[0], row[1], row[2], row[3])

        result: TaskRef | None = await self._read(op)
        return result

    async def finish_delete(self, job: Job, *, deleted: bool) -> None:
        async def op(conn: Any) -> None:
            if deleted:
                await _set_attempt_state(conn, job, "deleted")
            await conn.execute("DELETE FROM jobs WHERE id = $1", job.id)

        await self._tx(op)

    async def renew_lease(self, job: Job, *, until: float) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "UPDATE jobs SET lease_until = $1 WHERE id = $2", until, job.id
            )
        )

    async def stage_state(self, run_id: str, stage: str) -> StageContext:
        async def op(conn: Any) -> StageContext:
            pipeline = await self._pipeline(conn, run_id)
            run = await conn.fetchrow(
                "SELECT cancelled, mirror, version FROM runs WHERE id = $1", run_id
            )
            if run is None:
                raise KeyError(run_id)
            state, _ = (await self._states(conn, {run_id: tuple(run)}))[run_id]
            return StageContext(pipeline.stages[stage].model, state.stages[stage], state.cancelled)

        context: StageContext = await self._tx(op)
        return context

    # reconciliation -------------------------------------------------------------------

    async def claim_due_stages(self, *, now: float, limit: int, lease_s: float) -> list[DueStage]:
        rows = await self._tx(
            lambda conn: conn.fetch(
                "UPDATE stages AS s SET deadline = $1 FROM ("
                "SELECT run_id, name FROM stages WHERE deadline IS NOT NULL AND deadline <= $2 "
                "ORDER BY deadline LIMIT $3 FOR UPDATE SKIP LOCKED) AS d "
                "WHERE s.run_id = d.run_id AND s.name = d.name "
                "RETURNING s.run_id, s.name, s.attempt, s.task_id, s.status, s.hard_deadline, "
                "s.model",
                now + lease_s,
                now,
                limit,
            )
        )
        return [due_stage(r, now) for r in rows]

    async def extend_deadline(self, run_id: str, stage: str, attempt: int, at: float) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "UPDATE stages SET deadline = $1 "
                "WHERE run_id = $2 AND name = $3 AND attempt = $4 AND deadline IS NOT NULL",
                at,
                run_id,
                stage,
                attempt,
            )
        )

    # outbox ---------------------------------------------------------------------------

    async def cached_result(self, key: str) -> CacheEntry | None:
        row = await self._read(
            lambda conn: conn.fetchrow(
                "SELECT key, run_id, stage, outputs, mirrored FROM result_cache WHERE key = $1",
                key,
            )
        )
        return None if row is None else cache_entry(row)

    async def save_result(self, entry: CacheEntry, *, model: str, now: float) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "INSERT INTO result_cache (key, model, run_id, stage, outputs, mirrored, "
                "created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (key) DO UPDATE "
                "SET model = EXCLUDED.model, run_id = EXCLUDED.run_id, stage = EXCLUDED.stage, "
                "outputs = EXCLUDED.outputs, mirrored = EXCLUDED.mirrored, "
                "created_at = EXCLUDED.created_at",
                entry.key,
                model,
                entry.run_id,
                entry.stage,
                json.dumps(entry.outputs),
                json.dumps(entry.mirrored),
                now,
            )
        )

    async def forget_result(self, key: str) -> None:
        await self._tx(lambda conn: conn.execute("DELETE FROM result_cache WHERE key = $1", key))

    async def overdue_runs(self, *, now: float, limit: int) -> list[tuple[str, float]]:
        async def op(conn: Any) -> list[tuple[str, float]]:
            rows = await conn.fetch(
                "SELECT id, deadline_at FROM runs WHERE deadline_at IS NOT NULL "
                "AND status = 'running' AND deadline_at <= $1 ORDER BY deadline_at LIMIT $2",
                now,
                limit,
            )
            return [(str(r[0]), float(r[1])) for r in rows]

        result: list[tuple[str, float]] = await self._read(op)
        return result

    async def pending_events(self, *, limit: int) -> list[OutboxRow]:
        rows = await self._tx(
            lambda conn: conn.fetch(
                "SELECT seq, run_id, body, tries, not_before FROM outbox "
                "WHERE sent_at IS NULL AND dead_at IS NULL ORDER BY seq LIMIT $1",
                limit,
            )
        )
        return [OutboxRow(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]

    async def mark_sent(self, seqs: Sequence[int], *, now: float) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "UPDATE outbox SET sent_at = $1, tries = tries + 1, not_before = NULL "
                "WHERE seq = ANY($2)",
                now,
                list(seqs),
            )
        )

    async def mark_failed(
        self, failures: Mapping[int, str], *, now: float, retry_at: Mapping[int, float | None]
    ) -> None:
        rows = [
            (error[:1000], retry_at.get(seq), None if retry_at.get(seq) else now, seq)
            for seq, error in failures.items()
        ]
        await self._tx(
            lambda conn: conn.executemany(
                "UPDATE outbox SET tries = tries + 1, last_error = $1, not_before = $2, "
                "dead_at = $3 WHERE seq = $4",
                rows,
            )
        )

    async def parked_events(self) -> list[dict[str, Any]]:
        rows = await self._tx(
            lambda conn: conn.fetch(
                "SELECT seq, run_id, type, tries, last_error, dead_at, body FROM outbox "
                "WHERE dead_at IS NOT NULL ORDER BY seq"
            )
        )
        return [parked(r) for r in rows]

    # singletons and retention ---------------------------------------------------------

    async def hold_lease(self, name: str, holder: str, *, now: float, ttl_s: float) -> bool:
        status = await self._tx(
            lambda conn: conn.execute(
                "INSERT INTO leases (name, holder, until) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "until = excluded.until "
                "WHERE leases.holder = excluded.holder OR leases.until < $4",
                name,
                holder,
                now + ttl_s,
                now,
            )
        )
        return _count(status) > 0

    async def release_lease(self, name: str, holder: str) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "DELETE FROM leases WHERE name = $1 AND holder = $2", name, holder
            )
        )

    async def prune(self, *, before: float) -> Pruned:
        async def op(conn: Any) -> Pruned:
            deliveries = await conn.execute("DELETE FROM deliveries WHERE received_at < $1", before)
            events = await conn.execute(
                "DELETE FROM outbox WHERE sent_at < $1 OR dead_at < $1", before
            )
            attempts = await conn.execute(
                "DELETE FROM attempts WHERE created_at < $1 AND run_id IN "
                "(SELECT id FROM runs WHERE status != 'running')",
                before,
            )
            return Pruned(_count(deliveries), _count(events), _count(attempts))

        pruned: Pruned = await self._tx(op)
        return pruned

    # reads ----------------------------------------------------------------------------

    async def _read(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            return await fn(conn)

    async def gauges(self) -> dict[str, Any]:
        async def op(conn: Any) -> dict[str, Any]:
            pending = await conn.fetchrow(
                "SELECT COUNT(*), MIN(created_at) FROM outbox "
                "WHERE sent_at IS NULL AND dead_at IS NULL"
            )
            parked = await conn.fetchval("SELECT COUNT(*) FROM outbox WHERE dead_at IS NOT NULL")
            runs = await conn.fetch("SELECT status, COUNT(*) FROM runs GROUP BY status")
            return {
                "pending_events": pending[0],
                "oldest_pending_event_at": pending[1],
                "parked_events": parked,
                "runs": {r[0]: r[1] for r in runs},
            }

        gauges: dict[str, Any] = await self._read(op)
        return gauges

    async def get_run(self, run_id: str) -> RunView | None:
        async def op(conn: Any) -> RunView | None:
            row = await conn.fetchrow(_RUN_BY_ID, run_id)
            return None if row is None else (await _views(conn, [row]))[0]

        view: RunView | None = await self._read(op)
        return view

    async def list_runs(
        self,
        *,
        limit: int = 50,
        status: str | None = None,
        pipeline: str | None = None,
        cursor: str | None = None,
    ) -> RunPage:
        after = Cursor.decode(cursor) if cursor else None

        async def op(conn: Any) -> RunPage:
            where: list[str] = []
            args: list[Any] = []
            if status is not None:
                args.append(status)
                where.append(f"status = ${len(args)}")
            if pipeline is not None:
                args.append(pipeline)
                where.append(f"pipeline = ${len(args)}")
            if after is not None:
                args.extend(after)
                where.append(f"(created_at, id) < (${len(args) - 1}, ${len(args)})")
            query = f"SELECT {RUN_COLUMNS} FROM runs"  # noqa: S608
            if where:
                query += " WHERE " + " AND ".join(where)
            args.append(limit + 1)
            query += f" ORDER BY created_at DESC, id DESC LIMIT ${len(args)}"
            rows = [tuple(r) for r in await conn.fetch(query, *args)]
            more = len(rows) > limit
            views = await _views(conn, rows[:limit])
            last = views[-1] if more and views else None
            return RunPage(views, Cursor(last.created_at, last.id).encode() if last else None)

        page: RunPage = await self._read(op)
        return page

    async def outbox(self, run_id: str | None = None) -> list[dict[str, Any]]:
        async def op(conn: Any) -> list[dict[str, Any]]:
            if run_id:
                rows = await conn.fetch(
                    "SELECT body FROM outbox WHERE run_id = $1 ORDER BY seq", run_id
                )
            else:
                rows = await conn.fetch("SELECT body FROM outbox ORDER BY seq")
            return [json.loads(r[0]) for r in rows]

        events: list[dict[str, Any]] = await self._read(op)
        return events

    async def deliveries(self, run_id: str) -> list[dict[str, Any]]:
        rows = await self._read(
            lambda conn: conn.fetch(
                "SELECT provider, webhook_id, run_id, stage, attempt, task_id, status, effect, "
                "received_at FROM deliveries WHERE run_id = $1 ORDER BY received_at",
                run_id,
            )
        )
        return [dict(r) for r in rows]


async def _set_attempt_state(conn: Any, job: Job, state: AttemptState) -> None:
    await conn.execute(
        "UPDATE attempts SET state = $1 WHERE run_id = $2 AND stage = $3 AND attempt = $4",
        state,
        job.run_id,
        job.stage,
        job.attempt,
    )


async def _views(conn: Any, runs: Sequence[Any]) -> list[RunView]:
    """Runs (read as ``rows`` describes) with their stages, in pipeline order."""
    if not runs:
        return []
    ids = [r[0] for r in runs]
    stages: dict[str, list[StageView]] = {run_id: [] for run_id in ids}
    for r in await conn.fetch(_STAGES_OF_RUNS, ids):
        stages[r[0]].append(stage_view(r[1:]))
    return [run_view(r, stages[r[0]]) for r in runs]
