"""The store's contract, run unchanged against both backends over real databases: a
SQLite file, and a fresh database on a real PostgreSQL server. Several stores on one
database stand for several processes or replicas."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pipelines import spec as specs
from pipelines.errors import BudgetExceededError, InvalidTransitionError, SpecError
from pipelines.governor import AccountLimits, Governor
from pipelines.state import CancelRequested, Submitted, TaskFailed, TaskSucceeded
from pipelines.store import Job, Store, StoreConfig, WebhookOutcome, open_store
from pipelines.store.records import (
    Charge,
    Idempotency,
    IdempotentReplay,
    RunOptions,
    Spent,
    TaskRef,
)
from tests.support.postgres import Databases

IMG = "wavespeed-ai/hunyuan-image-2.1"
PIPELINE = specs.parse({"stages": {"a": {"model": IMG, "input": {"prompt": "x"}}}}, where="t")
TWO = specs.parse(
    {
        "stages": {
            "a": {"model": IMG, "input": {"prompt": "x"}},
            "b": {"model": IMG, "input": {"prompt": "y"}, "needs": ["a"]},
        }
    },
    where="t",
)
BACKENDS = ["sqlite", "postgres"]

OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture(params=BACKENDS)
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database of each backend: its DATABASE_URL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.db"
    databases: Databases = request.getfixturevalue("pg_databases")
    return await databases.create()


@pytest.fixture
async def open_(database: str) -> AsyncIterator[OpenStore]:
    """Opens started stores on the test's database (each one like another process)."""
    opened: list[Store] = []

    async def factory(**config: Any) -> Store:
        store = open_store(database, StoreConfig(**config))
        await store.start()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_: OpenStore) -> Store:
    return await open_()


async def raw(database: str, sql: str, *args: Any) -> None:
    """Change the database behind the store's back (`?` placeholders), as an operator
    or an older release might."""
    if database.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(database.removeprefix("sqlite:///")) as conn:
            conn.execute(sql, args)
        return
    numbered, n = "", 0
    for char in sql:
        if char == "?":
            n += 1
            numbered += f"${n}"
        else:
            numbered += char
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(numbered, *args)
    finally:
        await conn.close()


def deliver_completed(
    store: Store, token: str, task_id: str, *, webhook_id: str, now: float
) -> Coroutine[Any, Any, WebhookOutcome]:
    """A verified WaveSpeed delivery saying ``task_id`` completed with one output."""
    return store.webhook(
        provider="wavespeed", webhook_id=webhook_id, token=token, task_id=task_id,
        status="completed", make_event=lambda s, a: TaskSucceeded(s, a, task_id, ("u",)), now=now,
    )  # fmt: skip


async def submitted(store: Store, token: str, task_id: str, *, now: float = 100.0) -> Job:
    """Create a one-stage run and take its stage to submitted with ``task_id``."""
    await store.create_run(PIPELINE, {}, now=now)
    (job,) = await store.claim_jobs(now=now, limit=1, lease_s=30)
    await store.record_attempt(job, token, provider="wavespeed", now=now)
    await store.accept_attempt(job, token, task_id, [Submitted("a", 1, task_id)], now=now)
    return job


async def test_create_run_enqueues_root_submit(store: Store) -> None:
    """A new run has its root stage's submit job and a run.started event, atomically."""
    run_id = await store.create_run(PIPELINE, {}, now=100.0)
    jobs = await store.claim_jobs(now=100.0, limit=10, lease_s=30)
    assert [(j.kind, j.stage, j.attempt) for j in jobs] == [("submit", "a", 1)]
    assert [e["type"] for e in await store.outbox(run_id)] == ["run.started"]


async def test_lease_hides_job_until_expiry(store: Store) -> None:
    """A claimed job is invisible to others until its lease expires, then taken again."""
    await store.create_run(PIPELINE, {}, now=100.0)
    (job,) = await store.claim_jobs(now=100.0, limit=10, lease_s=30)
    assert await store.claim_jobs(now=129.0, limit=10, lease_s=30) == []
    (again,) = await store.claim_jobs(now=131.0, limit=10, lease_s=30)
    assert again.id == job.id and again.tries == 2


async def test_webhook_before_submit_commit_is_not_yet(store: Store) -> None:
    """A callback on an attempt still 'sending' is answered not_yet and records nothing."""
    run_id = await store.create_run(PIPELINE, {}, now=100.0)
    (job,) = await store.claim_jobs(now=100.0, limit=1, lease_s=30)
    await store.record_attempt(job, "tok-abc", provider="wavespeed", now=100.0)
    outcome = await deliver_completed(store, "tok-abc", "t1", webhook_id="w1", now=101.0)
    assert outcome.effect == "not_yet"
    assert await store.deliveries(run_id) == []
    await store.accept_attempt(job, "tok-abc", "t1", [Submitted("a", 1, "t1")], now=101.0)
    outcome = await deliver_completed(store, "tok-abc", "t1", webhook_id="w1", now=102.0)
    assert outcome.effect == "applied"
    run = await store.get_run(run_id)
    assert run is not None and run.status == "succeeded"


async def test_a_sending_attempt_older_than_the_submit_timeout_adopts_the_callback(
    open_: OpenStore,
) -> None:
    """A process died between its submit and recording the answer: once the attempt is
    older than the submit's timeout, the signed callback on its token names the task
    and settles the stage (instead of 503 until the provider gives up)."""
    store = await open_(submit_timeout_s=60.0)
    run_id = await store.create_run(PIPELINE, {}, now=100.0)
    (job,) = await store.claim_jobs(now=100.0, limit=1, lease_s=30)
    await store.record_attempt(job, "tok-crash", provider="wavespeed", now=100.0)
    early = await deliver_completed(store, "tok-crash", "t7", webhook_id="w1", now=159.0)
    late = await deliver_completed(store, "tok-crash", "t7", webhook_id="w2", now=161.0)
    assert (early.effect, late.effect) == ("not_yet", "applied")
    run = await store.get_run(run_id)
    assert run is not None and run.status == "succeeded" and run.stages[0].task_id == "t7"


async def test_lost_submit_answer_adopts_task_from_signed_callback(store: Store) -> None:
    """An attempt whose answer was lost ('unknown') takes its task id from the callback."""
    run_id = await store.create_run(PIPELINE, {}, now=100.0)
    (job,) = await store.claim_jobs(now=100.0, limit=1, lease_s=30)
    await store.record_attempt(job, "tok-lost", provider="wavespeed", now=100.0)
    await store.attempt_unknown(job, now=100.0)
    outcome = await deliver_completed(store, "tok-lost", "t9", webhook_id="w9", now=101.0)
    assert outcome.effect == "applied"
    run = await store.get_run(run_id)
    assert run is not None and run.stages[0].task_id == "t9"


async def test_concurrent_duplicate_deliveries_apply_once(store: Store) -> None:
    """Fifty concurrent copies of one delivery: one applied, the rest duplicates."""
    await submitted(store, "tok", "t1")
    outcomes = await asyncio.gather(*(
        deliver_completed(store, "tok", "t1", webhook_id="same", now=101.0)
        for _ in range(50)
    ))  # fmt: skip
    effects = sorted(o.effect for o in outcomes)
    assert effects.count("applied") == 1 and effects.count("duplicate") == 49
    run_id = outcomes[0].run_id
    assert [e["type"] for e in await store.outbox(run_id)].count("stage.succeeded") == 1
    stats = store.stats
    assert stats["batches"] < stats["operations"]  # commits were grouped


async def test_duplicates_from_several_connections_apply_once(open_: OpenStore) -> None:
    """Three stores (three processes or replicas) each get copies of one delivery, and
    of the same task's re-sent delivery under a new webhook-id, at once: one delivery
    applied, one recorded as no effect, the rest duplicates; one stage.succeeded."""
    stores = [await open_() for _ in range(3)]
    await submitted(stores[0], "tok", "t1")
    calls = [
        deliver_completed(s, "tok", "t1", webhook_id=webhook_id, now=101.0)
        for _ in range(10)
        for s in stores
        for webhook_id in ("w-same", "w-resent")
    ]
    outcomes = await asyncio.gather(*calls)
    effects = Counter(o.effect for o in outcomes)
    assert effects == {"applied": 1, "no_effect": 1, "duplicate": 58}
    run_id = outcomes[0].run_id
    assert run_id is not None
    types = Counter(e["type"] for e in await stores[1].outbox(run_id))
    assert types["stage.succeeded"] == 1 and types["run.succeeded"] == 1
    assert len(await stores[2].deliveries(run_id)) == 2


async def test_one_idempotency_key_makes_one_run_across_stores(open_: OpenStore) -> None:
    """Three stores (replicas) create a run with one key, four times each, at once: one
    run is written; every other call names it and writes nothing (no stage, no job)."""
    stores = [await open_() for _ in range(3)]
    key = Idempotency("key-1", "digest-1")

    async def create(store: Store) -> str:
        try:
            return await store.create_run(PIPELINE, {}, now=100.0, idempotency=key)
        except IdempotentReplay as replay:
            assert replay.request_hash == "digest-1"
            return "replay:" + replay.run_id

    results = await asyncio.gather(*(create(s) for s in stores for _ in range(4)))
    created = [r for r in results if not r.startswith("replay:")]
    assert len(created) == 1
    assert {r.removeprefix("replay:") for r in results} == set(created)
    page = await stores[1].list_runs(limit=50)
    assert [r.id for r in page.runs] == created
    assert len(await stores[2].claim_jobs(now=200.0, limit=10, lease_s=30)) == 1
    # Another key, or none, makes another run.
    other = await stores[0].create_run(PIPELINE, {}, now=101.0, idempotency=Idempotency("k2", "d"))
    plain = await stores[0].create_run(PIPELINE, {}, now=102.0)
    assert len({other, plain, *created}) == 3


async def test_two_workers_never_claim_the_same_job(open_: OpenStore) -> None:
    """Two stores claim concurrently, again and again, from 40 ready jobs: each job is
    claimed by exactly one of them."""
    one, two = await open_(), await open_()
    for _ in range(40):
        await one.create_run(PIPELINE, {}, now=100.0)
    claimed: list[int] = []
    for _ in range(10):
        batches = await asyncio.gather(
            one.claim_jobs(now=100.0, limit=3, lease_s=30),
            two.claim_jobs(now=100.0, limit=3, lease_s=30),
        )
        claimed += [job.id for batch in batches for job in batch]
    assert len(claimed) == 40 and len(set(claimed)) == 40


async def test_a_webhook_racing_the_sweeper_makes_one_transition(open_: OpenStore) -> None:
    """A stage silent past its deadline is claimed by the sweeper while its callback
    arrives on another process: both apply the result, one transition happens."""
    receiver, sweeper = await open_(), await open_()
    await submitted(receiver, "tok", "t1", now=100.0)
    (due,) = await sweeper.claim_due_stages(now=10_000.0, limit=10, lease_s=30)
    assert due.task_id == "t1" and due.provider == "wavespeed"
    from_poll = sweeper.apply(
        due.run_id, TaskSucceeded("a", due.attempt, "t1", ("u",)), now=10_000.0
    )
    from_webhook = deliver_completed(receiver, "tok", "t1", webhook_id="w1", now=10_000.0)
    decision, outcome = await asyncio.gather(from_poll, from_webhook)
    assert [decision.changed, outcome.effect == "applied"].count(True) == 1
    types = Counter(e["type"] for e in await receiver.outbox(due.run_id))
    assert types["stage.succeeded"] == 1
    assert await sweeper.claim_due_stages(now=20_000.0, limit=10, lease_s=30) == []


async def test_a_lease_expiring_mid_job_never_submits_twice(open_: OpenStore) -> None:
    """Worker A's lease lapses while it submits; worker B takes the job, sees A's attempt
    row and does not submit again; A records its task: one attempt, one task."""
    a, b = await open_(), await open_()
    run_id = await a.create_run(PIPELINE, {}, now=100.0)
    (job_a,) = await a.claim_jobs(now=100.0, limit=1, lease_s=5)
    await a.record_attempt(job_a, "tok-a", provider="wavespeed", now=100.0)
    (job_b,) = await b.claim_jobs(now=106.0, limit=1, lease_s=5)
    assert job_b.id == job_a.id and job_b.tries == 2
    context = job_b.context or await b.submit_context(job_b)  # as the engine reads it
    assert context.previous_attempt == "sending"
    await b.attempt_unknown(job_b, now=106.0)  # what the engine does with such a job
    await a.accept_attempt(job_a, "tok-a", "t1", [Submitted("a", 1, "t1")], now=107.0)
    run = await b.get_run(run_id)
    assert run is not None and run.stages[0].status == "submitted"
    assert run.stages[0].task_id == "t1"
    assert await a.claim_jobs(now=1_000.0, limit=10, lease_s=5) == []


async def test_state_survives_reopen(database: str, open_: OpenStore) -> None:
    """What was committed is there after the store is closed and opened again."""
    first = open_store(database)
    await first.start()
    run_id = await first.create_run(PIPELINE, {"k": 1}, now=100.0)
    await first.close()
    second = await open_()
    run = await second.get_run(run_id)
    assert run is not None and run.inputs == {"k": 1} and run.stages[0].attempt == 1


async def test_migrations_at_once_from_several_stores(open_: OpenStore) -> None:
    """Four stores starting at the same moment on a fresh database: the schema is made
    once (a second CREATE TABLE would fail) and every store works."""
    stores = await asyncio.gather(*(open_() for _ in range(4)))
    ids = [await s.create_run(PIPELINE, {}, now=100.0) for s in stores]
    assert len({(await stores[0].get_run(i)).id for i in ids}) == 4  # type: ignore[union-attr]


async def test_a_delivery_and_a_failing_operation_at_once(store: Store) -> None:
    """A delivery and an operation that fails (the same attempt recorded twice) queued
    together: the delivery takes effect exactly once and only the failing caller gets an
    error."""
    job = await submitted(store, "tok", "t1")
    delivered, again = await asyncio.gather(
        deliver_completed(store, "tok", "t1", webhook_id="w1", now=101.0),
        store.record_attempt(job, "tok", provider="wavespeed", now=101.0),
        return_exceptions=True,
    )
    assert isinstance(delivered, WebhookOutcome) and delivered.effect == "applied"
    assert isinstance(again, Exception)
    run_id = delivered.run_id
    assert run_id is not None
    run = await store.get_run(run_id)
    assert run is not None and run.status == "succeeded"
    assert [e["type"] for e in await store.outbox(run_id)].count("stage.succeeded") == 1
    assert len(await store.deliveries(run_id)) == 1
    duplicate = await deliver_completed(store, "tok", "t1", webhook_id="w1", now=102.0)
    assert duplicate.effect == "duplicate"


async def test_claimed_submit_job_carries_its_context(store: Store) -> None:
    """claim_jobs reads a submit job's context in the same transaction as the lease."""
    run_id = await store.create_run(PIPELINE, {"k": 1}, now=100.0)
    (job,) = await store.claim_jobs(now=100.0, limit=1, lease_s=30)
    assert job.context is not None
    assert job.context.inputs == {"k": 1} and job.context.stage.attempt == 1
    assert job.context.previous_attempt is None and not job.context.cancelled
    assert list(job.context.pipeline.stages) == ["a"] and run_id == job.run_id


async def test_one_unreadable_run_does_not_stop_claims(database: str, open_: OpenStore) -> None:
    """A run whose stored spec no longer parses still has its job claimed (without a
    context, which the job then fails to read on its own); other jobs are unaffected."""
    first = await open_()
    bad = await first.create_run(PIPELINE, {}, now=100.0)
    good = await first.create_run(PIPELINE, {}, now=100.0)
    await raw(database, "UPDATE runs SET spec = ? WHERE id = ?", '{"stages": 3}', bad)
    store = await open_()  # a new process: no parsed spec cached
    jobs = {job.run_id: job for job in await store.claim_jobs(now=100.0, limit=10, lease_s=30)}
    assert set(jobs) == {bad, good}
    assert jobs[bad].context is None
    with pytest.raises(SpecError):
        await store.submit_context(jobs[bad])
    assert (await store.submit_context(jobs[good])).stage.attempt == 1


async def test_rolled_back_work_leaves_no_cached_state(open_: OpenStore) -> None:
    """A run's state is cached by version. An operation that applied an event and then
    failed is rolled back, and so is what it cached: when another writer takes the run to
    that same version with a different state, this store reads that state, not the one it
    computed and threw away."""
    one, two = await open_(), await open_()
    run_id = await one.create_run(PIPELINE, {}, now=100.0)
    (job,) = await one.claim_jobs(now=100.0, limit=1, lease_s=30)
    await one.record_attempt(job, "tok", provider="wavespeed", now=100.0)
    with pytest.raises(InvalidTransitionError):
        await one.accept_attempt(
            job, "tok", "t1", [Submitted("a", 1, "t1"), Submitted("zz", 1, "t1")], now=101.0
        )
    failed = TaskFailed("a", 1, "t1", "boom", retryable=False)
    assert (await two.apply(run_id, failed, now=102.0)).changed
    decision = await one.apply(run_id, TaskSucceeded("a", 1, "t1", ("u",)), now=103.0)
    assert not decision.changed
    run = await one.get_run(run_id)
    assert run is not None and run.status == "failed"


async def test_a_claimed_job_knows_when_it_became_due(store: Store) -> None:
    """A root stage's submit is due when its run was created; a downstream stage's when
    the delivery that completed its upstream was received (what hand-off latency counts
    from)."""
    await store.create_run(TWO, {}, now=100.0)
    (job,) = await store.claim_jobs(now=100.5, limit=1, lease_s=30)
    assert (job.stage, job.due_at) == ("a", 100.0)
    await store.record_attempt(job, "tok-a", provider="wavespeed", now=100.5)
    await store.accept_attempt(job, "tok-a", "t1", [Submitted("a", 1, "t1")], now=100.5)
    outcome = await deliver_completed(store, "tok-a", "t1", webhook_id="w1", now=150.25)
    assert outcome.effect == "applied"
    (downstream,) = await store.claim_jobs(now=151.0, limit=1, lease_s=30)
    assert (downstream.stage, downstream.due_at) == ("b", 150.25)


async def test_stages_keep_their_pipeline_order(store: Store) -> None:
    """A run's stages come back in the order the pipeline declares them."""
    names = ["zeta", "alpha", "mid"]
    spec = specs.parse(
        {"stages": {n: {"model": IMG, "input": {"prompt": n}} for n in names}}, where="t"
    )
    run_id = await store.create_run(spec, {}, now=100.0)
    run = await store.get_run(run_id)
    assert run is not None and [s.name for s in run.stages] == names


async def test_runs_page_by_cursor_newest_first(store: Store) -> None:
    """Runs come newest first, a page at a time; the cursor goes on where the page ended,
    also across runs created in the same instant; a status filter applies to every page."""
    ids = [await store.create_run(PIPELINE, {"n": i}, now=100.0 + i // 2) for i in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.list_runs(limit=3, cursor=cursor)
        seen += [r.id for r in page.runs]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 7
    created = [(await store.get_run(i)).created_at for i in seen]  # type: ignore[union-attr]
    assert created == sorted(created, reverse=True)
    assert (await store.list_runs(limit=10, status="succeeded")).runs == []
    assert len((await store.list_runs(limit=10, status="running")).runs) == 7
    with pytest.raises(SpecError, match="cursor"):
        await store.list_runs(limit=3, cursor="not-a-cursor")


async def test_outbox_failures_are_per_message_with_retry_and_parking(store: Store) -> None:
    """A failed event waits until its retry time; a parked one leaves the pending list
    (its run's later events go on) and is listed as parked; a sent one is done."""
    runs = [await store.create_run(PIPELINE, {}, now=100.0) for _ in range(3)]
    pending = await store.pending_events(limit=10)
    assert [r.run_id for r in pending] == runs and all(r.tries == 0 for r in pending)
    retry, park, send = (r.seq for r in pending)
    await store.mark_failed(
        {retry: "throttled", park: "too large"}, now=200.0, retry_at={retry: 230.0, park: None}
    )
    await store.mark_sent([send], now=200.0)
    left = await store.pending_events(limit=10)
    assert [(r.seq, r.tries, r.not_before) for r in left] == [(retry, 1, 230.0)]
    (parked,) = await store.parked_events()
    assert (parked["seq"], parked["error"], parked["tries"]) == (park, "too large", 1)


async def test_a_named_lease_has_one_holder_at_a_time(store: Store) -> None:
    """One holder at a time; the holder renews; another takes over once it lapses."""
    assert await store.hold_lease("relay", "a", now=100.0, ttl_s=10)
    assert not await store.hold_lease("relay", "b", now=105.0, ttl_s=10)
    assert await store.hold_lease("relay", "a", now=109.0, ttl_s=10)  # renewed to 119
    assert not await store.hold_lease("relay", "b", now=118.0, ttl_s=10)
    assert await store.hold_lease("relay", "b", now=120.0, ttl_s=10)
    assert not await store.hold_lease("relay", "a", now=121.0, ttl_s=10)
    assert await store.hold_lease("sweeper", "a", now=121.0, ttl_s=10)
    await store.release_lease("sweeper", "b")  # not b's: nothing happens
    assert not await store.hold_lease("sweeper", "b", now=122.0, ttl_s=10)
    await store.release_lease("sweeper", "a")  # a stops: b takes over at once
    assert await store.hold_lease("sweeper", "b", now=122.0, ttl_s=10)


async def test_retention_prunes_old_rows_of_ended_work_only(store: Store) -> None:
    """Deliveries and sent events older than the cut are deleted, and attempts of ended
    runs; a running run's attempt and an unsent event stay."""
    await submitted(store, "tok-done", "t1", now=100.0)
    outcome = await deliver_completed(store, "tok-done", "t1", webhook_id="w1", now=101.0)
    done = outcome.run_id
    assert done is not None
    running = await store.create_run(PIPELINE, {}, now=100.0)
    (job,) = await store.claim_jobs(now=100.0, limit=1, lease_s=30)
    await store.record_attempt(job, "tok-running", provider="wavespeed", now=100.0)
    sent = [e.seq for e in await store.pending_events(limit=100) if e.run_id == done]
    await store.mark_sent(sent, now=102.0)
    pruned = await store.prune(before=1_000.0)
    assert (pruned.deliveries, pruned.events, pruned.attempts) == (1, len(sent), 1)
    assert await store.deliveries(done) == []
    assert [e.run_id for e in await store.pending_events(limit=100)] == [running]
    assert await store.prune(before=1_000.0) == (0, 0, 0)
    still = await deliver_completed(store, "tok-running", "t2", webhook_id="w2", now=1_001.0)
    assert still.effect == "applied"  # its token still resolves


async def test_a_cancel_enqueues_a_delete_that_finds_the_task(store: Store) -> None:
    """Cancelling a submitted run enqueues a delete job for its attempt; the job finds the
    attempt's task; finishing it marks the attempt deleted and drops the job."""
    job = await submitted(store, "tok-del", "task-del")
    await store.apply(job.run_id, CancelRequested(), now=101.0)
    (delete,) = await store.claim_jobs(now=101.0, limit=10, lease_s=30)
    assert (delete.kind, delete.stage, delete.attempt) == ("delete", "a", 1)
    assert await store.task_of(delete) == TaskRef("wavespeed", "task-del", "accepted")
    await store.finish_delete(delete, deleted=True)
    assert await store.task_of(delete) == TaskRef("wavespeed", "task-del", "deleted")
    assert await store.claim_jobs(now=200.0, limit=10, lease_s=30) == []


async def test_runs_past_their_deadline_are_found_until_they_end(store: Store) -> None:
    soon = await store.create_run(PIPELINE, {}, now=100.0, options=RunOptions(deadline_at=150.0))
    later = await store.create_run(PIPELINE, {}, now=100.0, options=RunOptions(deadline_at=300.0))
    await store.create_run(PIPELINE, {}, now=100.0)  # no deadline
    assert await store.overdue_runs(now=149.0, limit=10) == []
    assert await store.overdue_runs(now=400.0, limit=10) == [(soon, 150.0), (later, 300.0)]
    await store.apply(soon, CancelRequested(reason="run deadline passed"), now=401.0)
    assert await store.overdue_runs(now=402.0, limit=10) == [(later, 300.0)]


THREE_ROOTS = specs.parse(
    {"stages": {n: {"model": IMG, "input": {"prompt": n}} for n in ("a", "b", "c")}}, where="t"
)


async def _charge(store: Store, job: Job, charge: Charge, token: str) -> bool:
    try:
        await store.record_attempt(job, token, provider="wavespeed", now=100.0, charge=charge)
    except BudgetExceededError:
        return False
    return True


async def test_concurrent_submits_on_three_stores_never_cross_the_daily_cap(
    open_: OpenStore,
) -> None:
    """Twelve $0.25 attempts at once, through three stores (processes), against a $1.00
    daily cap: exactly four are recorded; the ledger never holds more than the cap."""
    stores = [await open_() for _ in range(3)]
    for _ in range(12):
        await stores[0].create_run(PIPELINE, {}, now=100.0)
    jobs = await stores[0].claim_jobs(now=100.0, limit=20, lease_s=30)
    assert len(jobs) == 12
    charge = Charge("p", IMG, usd=0.25, daily_cap_usd=1.0, day_start=50.0)
    taken = await asyncio.gather(
        *(_charge(stores[i % 3], job, charge, f"cap-{i}") for i, job in enumerate(jobs))
    )
    assert sum(taken) == 4
    assert await stores[1].spent(since=50.0) == Spent(1.0, 0)
    assert await stores[2].spent(since=101.0) == Spent(0.0, 0)  # a new day starts empty


async def test_a_run_budget_holds_and_refunds_what_never_reached_the_provider(
    store: Store,
) -> None:
    run_id = await store.create_run(THREE_ROOTS, {}, now=100.0, options=RunOptions(budget_usd=0.5))
    jobs = sorted(await store.claim_jobs(now=100.0, limit=10, lease_s=30), key=lambda j: j.stage)
    charge = Charge("p", IMG, usd=0.25)
    assert [await _charge(store, j, charge, f"rb-{j.stage}") for j in jobs] == [True, True, False]
    with pytest.raises(BudgetExceededError, match=r"budget_usd of \$0.50 would be crossed"):
        await store.record_attempt(
            jobs[2], "rb-again", provider="wavespeed", now=100, charge=charge
        )
    await store.discard_attempt(jobs[0])  # proven never to have reached the provider
    assert await _charge(store, jobs[2], charge, "rb-c2")
    await store.attempt_rejected(jobs[1])  # refused by the provider: costs nothing
    run = await store.get_run(run_id)
    assert run is not None
    assert {s.name: s.spent for s in run.stages} == {
        "a": Spent(0.0, 0), "b": Spent(0.0, 0), "c": Spent(0.25, 0)
    }  # fmt: skip
    unknown = Charge("p", IMG, usd=None)
    with pytest.raises(BudgetExceededError, match="has no known price"):
        await store.record_attempt(jobs[0], "rb-a2", provider="wavespeed", now=100, charge=unknown)


async def test_the_provider_s_figure_replaces_the_price(store: Store) -> None:
    run_id = await store.create_run(PIPELINE, {}, now=100.0)
    (job,) = await store.claim_jobs(now=100.0, limit=1, lease_s=30)
    await store.record_attempt(
        job, "pf", provider="aimlapi", now=100.0, charge=Charge("p", IMG, usd=None)
    )
    run = await store.get_run(run_id)
    assert run is not None and run.as_json()["cost_usd"] is None
    await store.accept_attempt(
        job, "pf", "aiml_1", [Submitted("a", 1, "aiml_1")], now=101.0, cost_usd=0.042
    )
    run = await store.get_run(run_id)
    assert run is not None and run.as_json()["cost_usd"] == 0.042
    report = await store.spend_report(since=0.0, by="pipeline")
    assert report == [{"key": "p", "usd": 0.042, "unknown": 0, "attempts": 1}]


GOVERNED = Governor({"wavespeed": AccountLimits(per_window=3, window_s=60, in_flight=5)})


async def test_governed_claims_stay_inside_the_account_across_stores(open_: OpenStore) -> None:
    """Three stores (replicas) claiming at once lease no more WaveSpeed submits than the
    account's rate allows; recorded attempts keep counting; the window frees them; the
    in-flight cap holds what is still running."""
    stores = [await open_(governor=GOVERNED) for _ in range(3)]
    for _ in range(10):
        await stores[0].create_run(PIPELINE, {}, now=100.0)
    claims = await asyncio.gather(*(s.claim_jobs(now=100.0, limit=10, lease_s=30) for s in stores))
    jobs = [job for claim in claims for job in claim]
    assert len(jobs) == 3
    for n, job in enumerate(jobs):
        await stores[0].record_attempt(job, f"gov-{n}", provider="wavespeed", now=100.0)
    assert await stores[1].claim_jobs(now=101.0, limit=10, lease_s=30) == []
    # A window later the rate has room again, but three tasks are still on their way (in
    # flight) and the account takes five at once: two more.
    later = await stores[2].claim_jobs(now=170.0, limit=10, lease_s=30)
    assert len(later) == 2


async def test_governed_claims_go_by_priority_and_hold_a_key_to_its_cap(store: Store) -> None:
    store.config = StoreConfig(governor=GOVERNED)
    batch = [await store.create_run(PIPELINE, {}, now=100.0) for _ in range(3)]
    keyed = [
        await store.create_run(
            PIPELINE, {}, now=100.0,
            options=RunOptions(concurrency_key="acme", concurrency_limit=1),
        )
        for _ in range(2)
    ]  # fmt: skip
    urgent = await store.create_run(PIPELINE, {}, now=101.0, options=RunOptions(priority=9))
    claimed = await store.claim_jobs(now=102.0, limit=10, lease_s=30)
    # Room for three: the urgent run, though it came last, then the two oldest.
    assert {j.run_id for j in claimed} == {urgent, batch[0], batch[1]}
    store.config = StoreConfig(
        governor=Governor({"wavespeed": AccountLimits(per_window=100, in_flight=100)})
    )
    rest = await store.claim_jobs(now=103.0, limit=10, lease_s=30)
    assert {j.run_id for j in rest} == {batch[2], keyed[0]}  # acme's second waits its turn
