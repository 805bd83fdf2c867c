"""The SQLite store over a real file: atomic transitions, leases, the not-yet-committed race."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from pipelines import spec as specs
from pipelines.state import Submitted, TaskSucceeded
from pipelines.store import Store, WebhookOutcome

IMG = "wavespeed-ai/hunyuan-image-2.1"
PIPELINE = specs.parse({"stages": {"a": {"model": IMG, "input": {"prompt": "x"}}}}, where="t")


def deliver_completed(
    store: Store, token: str, task_id: str, *, webhook_id: str, now: float
) -> Coroutine[Any, Any, WebhookOutcome]:
    """A verified WaveSpeed delivery saying ``task_id`` completed with one output."""
    return store.webhook(
        provider="wavespeed", webhook_id=webhook_id, token=token, task_id=task_id,
        status="completed", make_event=lambda s, a: TaskSucceeded(s, a, task_id, ("u",)), now=now,
    )  # fmt: skip


@pytest.fixture
async def store(tmp_path: Path):
    s = Store(f"sqlite:///{tmp_path}/s.db")
    await s.start()
    yield s
    await s.close()


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
    await store.record_attempt(job, "tok-abc", now=100.0)
    outcome = await deliver_completed(store, "tok-abc", "t1", webhook_id="w1", now=101.0)
    assert outcome.effect == "not_yet"
    assert await store.deliveries(run_id) == []
    await store.accept_attempt(job, "tok-abc", "t1", [Submitted("a", 1, "t1")], now=101.0)
    outcome = await deliver_completed(store, "tok-abc", "t1", webhook_id="w1", now=102.0)
    assert outcome.effect == "applied"
    run = await store.get_run(run_id)
    assert run is not None and run.status == "succeeded"


async def test_lost_submit_answer_adopts_task_from_signed_callback(store: Store) -> None:
    """An attempt whose answer was lost ('unknown') takes its task id from the callback."""
    run_id = await store.create_run(PIPELINE, {}, now=100.0)
    (job,) = await store.claim_jobs(now=100.0, limit=1, lease_s=30)
    await store.record_attempt(job, "tok-lost", now=100.0)
    await store.set_attempt_state(job, "unknown", drop_job=True)
    outcome = await deliver_completed(store, "tok-lost", "t9", webhook_id="w9", now=101.0)
    assert outcome.effect == "applied"
    run = await store.get_run(run_id)
    assert run is not None and run.stages[0].task_id == "t9"


async def test_concurrent_duplicate_deliveries_apply_once(store: Store) -> None:
    """Fifty concurrent copies of one delivery: one applied, the rest duplicates."""
    run_id = await store.create_run(PIPELINE, {}, now=100.0)
    (job,) = await store.claim_jobs(now=100.0, limit=1, lease_s=30)
    await store.record_attempt(job, "tok", now=100.0)
    await store.accept_attempt(job, "tok", "t1", [Submitted("a", 1, "t1")], now=100.0)
    outcomes = await asyncio.gather(*(
        deliver_completed(store, "tok", "t1", webhook_id="same", now=101.0)
        for _ in range(50)
    ))  # fmt: skip
    effects = sorted(o.effect for o in outcomes)
    assert effects.count("applied") == 1 and effects.count("duplicate") == 49
    assert [e["type"] for e in await store.outbox(run_id)].count("stage.succeeded") == 1
    assert store.stats["batches"] < store.stats["operations"]  # commits were grouped


async def test_state_survives_reopen(tmp_path: Path) -> None:
    """What was committed is there after the store is closed and opened again."""
    first = Store(f"sqlite:///{tmp_path}/s.db")
    await first.start()
    run_id = await first.create_run(PIPELINE, {"k": 1}, now=100.0)
    await first.close()
    second = Store(f"sqlite:///{tmp_path}/s.db")
    await second.start()
    run = await second.get_run(run_id)
    await second.close()
    assert run is not None and run.inputs == {"k": 1} and run.stages[0].attempt == 1


async def test_operations_of_one_loop_turn_share_one_commit(tmp_path: Path) -> None:
    """What callers queue in one turn of the loop goes to the writer as one transaction;
    a failing operation rolls back only itself and its caller gets the error."""
    import sqlite3

    from pipelines.sqlite import GroupCommitter

    db = GroupCommitter(str(tmp_path / "g.db"), schema="CREATE TABLE t (x INTEGER UNIQUE);")
    db.start()
    try:

        def insert(x: int):
            return lambda conn: conn.execute("INSERT INTO t VALUES (?)", (x,)).rowcount

        async def soon(x: int) -> int:  # queued when its task first runs, the next turn
            return await db.run(insert(x))

        async def late(x: int) -> int:
            time.sleep(0.05)  # noqa: ASYNC251 (blocks on purpose: same turn, writer idle)
            return await db.run(insert(x))

        results = await asyncio.gather(
            *(soon(i) for i in range(99)), late(99), soon(5), return_exceptions=True
        )
        assert results[:100] == [1] * 100
        assert isinstance(results[100], sqlite3.IntegrityError)
        assert (db.batches, db.operations) == (1, 101)
        count = await db.run(lambda conn: conn.execute("SELECT COUNT(*) FROM t").fetchone()[0])
        assert count == 100 and db.batches == 2
    finally:
        db.stop()


async def test_a_failing_operation_neither_undoes_nor_repeats_its_batch(store: Store) -> None:
    """A delivery and a failing operation in one transaction: the batch is undone and run
    again with each operation in a savepoint, so the delivery takes effect exactly once
    (one stage.succeeded event, one delivery row) and only the failing caller gets an
    error."""
    import sqlite3

    run_id = await store.create_run(PIPELINE, {}, now=100.0)
    (job,) = await store.claim_jobs(now=100.0, limit=1, lease_s=30)
    await store.record_attempt(job, "tok", now=100.0)
    await store.accept_attempt(job, "tok", "t1", [Submitted("a", 1, "t1")], now=100.0)
    batches = store.stats["batches"]
    delivered, again = await asyncio.gather(
        deliver_completed(store, "tok", "t1", webhook_id="w1", now=101.0),
        store.record_attempt(job, "tok", now=101.0),  # the same attempt twice: refused
        return_exceptions=True,
    )
    assert store.stats["batches"] == batches + 1  # both were in one transaction
    assert isinstance(delivered, WebhookOutcome) and delivered.effect == "applied"
    assert isinstance(again, sqlite3.IntegrityError)
    run = await store.get_run(run_id)
    assert run is not None and run.status == "succeeded"
    assert [e["type"] for e in await store.outbox(run_id)].count("stage.succeeded") == 1
    assert len(await store.deliveries(run_id)) == 1
    duplicate = await deliver_completed(store, "tok", "t1", webhook_id="w1", now=102.0)
    assert duplicate.effect == "duplicate"


async def test_writer_answers_and_goes_on_when_its_transaction_breaks(tmp_path: Path) -> None:
    """An operation that ends the batch's transaction itself makes the COMMIT fail and
    its rollback too: the callers get the error (not a wait forever on a dead writer
    thread) and the next operation commits as usual."""
    import sqlite3

    from pipelines.sqlite import GroupCommitter

    db = GroupCommitter(str(tmp_path / "g.db"), schema="CREATE TABLE t (x INTEGER);")
    db.start()
    try:
        with pytest.raises(sqlite3.OperationalError, match="no transaction is active"):
            await asyncio.wait_for(db.run(lambda conn: conn.execute("ROLLBACK")), 10)
        insert = await db.run(lambda conn: conn.execute("INSERT INTO t VALUES (1)").rowcount)
        assert insert == 1
    finally:
        db.stop()


async def test_batch_of_leases_alone_skips_the_fsync(tmp_path: Path) -> None:
    """A batch made only of non-durable operations commits at synchronous=NORMAL; one
    durable operation in the batch makes all of it FULL (the level each op sees)."""
    import sqlite3

    from pipelines.sqlite import GroupCommitter

    db = GroupCommitter(str(tmp_path / "g.db"), schema="CREATE TABLE t (x INTEGER);")
    db.start()
    try:

        def level(conn: sqlite3.Connection) -> int:  # 1 = NORMAL, 2 = FULL
            conn.execute("INSERT INTO t VALUES (1)")
            return int(conn.execute("PRAGMA synchronous").fetchone()[0])

        assert await db.run(level) == 2
        assert await db.run(level, durable=False) == 1
        assert list(await asyncio.gather(db.run(level, durable=False), db.run(level))) == [2, 2]
        assert await db.run(level, durable=False) == 1
    finally:
        db.stop()


async def test_claimed_submit_job_carries_its_context(store: Store) -> None:
    """claim_jobs reads a submit job's context in the same transaction as the lease."""
    run_id = await store.create_run(PIPELINE, {"k": 1}, now=100.0)
    (job,) = await store.claim_jobs(now=100.0, limit=1, lease_s=30)
    assert job.context is not None
    assert job.context.inputs == {"k": 1} and job.context.stage.attempt == 1
    assert job.context.previous_attempt is None and not job.context.cancelled
    assert list(job.context.pipeline.stages) == ["a"] and run_id == job.run_id


async def test_one_unreadable_run_does_not_stop_claims(tmp_path: Path) -> None:
    """A run whose stored spec no longer parses still has its job claimed (without a
    context, which the job then fails to read on its own); other jobs are unaffected."""
    import sqlite3

    from pipelines.errors import SpecError

    url = f"sqlite:///{tmp_path}/s.db"
    first = Store(url)
    await first.start()
    bad = await first.create_run(PIPELINE, {}, now=100.0)
    good = await first.create_run(PIPELINE, {}, now=100.0)
    await first.close()
    with sqlite3.connect(tmp_path / "s.db") as conn:
        conn.execute("UPDATE runs SET spec = ? WHERE id = ?", ('{"stages": 3}', bad))
    store = Store(url)  # a new process: no parsed spec cached
    await store.start()
    try:
        jobs = {job.run_id: job for job in await store.claim_jobs(now=100.0, limit=10, lease_s=30)}
        assert set(jobs) == {bad, good}
        assert jobs[good].context is not None and jobs[bad].context is None
        with pytest.raises(SpecError):
            await store.submit_context(jobs[bad])
    finally:
        await store.close()


async def test_rolled_back_work_leaves_no_cached_state(tmp_path: Path) -> None:
    """A run's state is cached by version. An operation that applied an event and then
    failed is rolled back, and so is what it cached: when another writer (a second
    process on the same file) takes the run to that same version with a different
    state, this store reads that state, not the one it computed and threw away."""
    from pipelines.errors import InvalidTransitionError
    from pipelines.state import TaskFailed

    url = f"sqlite:///{tmp_path}/s.db"
    one, two = Store(url), Store(url)
    await one.start()
    await two.start()
    try:
        run_id = await one.create_run(PIPELINE, {}, now=100.0)
        (job,) = await one.claim_jobs(now=100.0, limit=1, lease_s=30)
        await one.record_attempt(job, "tok", now=100.0)
        # Submitted applies (version 2 in memory), then an impossible event fails the
        # whole operation: the attempt stays 'sending', the run stays at version 1.
        with pytest.raises(InvalidTransitionError):
            await one.accept_attempt(
                job, "tok", "t1", [Submitted("a", 1, "t1"), Submitted("zz", 1, "t1")], now=101.0
            )
        # The other process applies its own version 2: the stage failed.
        failed = TaskFailed("a", 1, "t1", "boom", retryable=False)
        assert (await two.apply(run_id, failed, now=102.0)).changed
        # A late success: a no-op on the failed stage. On the stale cached state
        # (submitted, version 2) it would succeed the stage and the run.
        decision = await one.apply(run_id, TaskSucceeded("a", 1, "t1", ("u",)), now=103.0)
        assert not decision.changed
        run = await one.get_run(run_id)
        assert run is not None and run.status == "failed"
    finally:
        await one.close()
        await two.close()


async def test_a_claimed_job_knows_when_it_became_due(store: Store) -> None:
    """A root stage's submit is due when its run was created; a downstream stage's when
    the delivery that completed its upstream was received (what hand-off latency counts
    from)."""
    two = specs.parse({"stages": {"a": {"model": IMG, "input": {"prompt": "x"}},
                                  "b": {"model": IMG, "input": {"prompt": "y"},
                                        "needs": ["a"]}}}, where="t")  # fmt: skip
    await store.create_run(two, {}, now=100.0)
    (job,) = await store.claim_jobs(now=100.5, limit=1, lease_s=30)
    assert (job.stage, job.due_at) == ("a", 100.0)
    await store.record_attempt(job, "tok-a", now=100.5)
    await store.accept_attempt(job, "tok-a", "t1", [Submitted("a", 1, "t1")], now=100.5)
    outcome = await deliver_completed(store, "tok-a", "t1", webhook_id="w1", now=150.25)
    assert outcome.effect == "applied"
    (downstream,) = await store.claim_jobs(now=151.0, limit=1, lease_s=30)
    assert (downstream.stage, downstream.due_at) == ("b", 150.25)
