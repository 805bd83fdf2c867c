"""The SQLite backend's group committer over a real file: one transaction per loop turn,
failures rolled back alone, durability by operation, and versioned migrations."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from pipelines.errors import ConfigError
from pipelines.store.sqlite_writer import GroupCommitter, connect, migrate

TABLE = ("CREATE TABLE t (x INTEGER UNIQUE);",)


async def test_operations_of_one_loop_turn_share_one_commit(tmp_path: Path) -> None:
    """What callers queue in one turn of the loop goes to the writer as one transaction;
    a failing operation rolls back only itself and its caller gets the error."""
    db = GroupCommitter(str(tmp_path / "g.db"), migrations=TABLE)
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


async def test_writer_answers_and_goes_on_when_its_transaction_breaks(tmp_path: Path) -> None:
    """An operation that ends the batch's transaction itself makes the COMMIT fail and
    its rollback too: the callers get the error (not a wait forever on a dead writer
    thread) and the next operation commits as usual."""
    db = GroupCommitter(str(tmp_path / "g.db"), migrations=TABLE)
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
    db = GroupCommitter(str(tmp_path / "g.db"), migrations=TABLE)
    db.start()
    try:

        def level(conn: sqlite3.Connection) -> int:  # 1 = NORMAL, 2 = FULL
            conn.execute("INSERT INTO t VALUES (NULL)")
            return int(conn.execute("PRAGMA synchronous").fetchone()[0])

        assert await db.run(level) == 2
        assert await db.run(level, durable=False) == 1
        assert list(await asyncio.gather(db.run(level, durable=False), db.run(level))) == [2, 2]
        assert await db.run(level, durable=False) == 1
    finally:
        db.stop()


async def test_a_locked_database_fails_the_batch_and_the_writer_goes_on(tmp_path: Path) -> None:
    """Another connection holding the write lock past the busy timeout: the callers get
    "database is locked", and once the lock is released the next operation commits."""
    path = str(tmp_path / "g.db")
    db = GroupCommitter(path, migrations=TABLE, busy_timeout_ms=200)
    db.start()
    holder = connect(path)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await db.run(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
        holder.execute("ROLLBACK")
        assert await db.run(lambda conn: conn.execute("INSERT INTO t VALUES (1)").rowcount) == 1
    finally:
        holder.close()
        db.stop()


def test_migrations_apply_once_in_order_even_from_several_processes_at_once(
    tmp_path: Path,
) -> None:
    """Four connections migrate one file at the same moment: each migration runs once
    (the second, not idempotent, would fail if run twice), and the version is recorded."""
    path = str(tmp_path / "m.db")
    steps = ("CREATE TABLE a (x INTEGER);", "ALTER TABLE a ADD COLUMN y INTEGER;")
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        conn = connect(path, busy_timeout_ms=10_000)
        try:
            barrier.wait()
            migrate(conn, steps)
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    conn = connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert [r[1] for r in conn.execute("PRAGMA table_info(a)")] == ["x", "y"]
        with pytest.raises(ConfigError, match="newer than this wavechain knows"):
            migrate(conn, steps[:1])
    finally:
        conn.close()


async def test_reads_do_not_wait_behind_a_blocked_writer(tmp_path: Path) -> None:
    """Another process holds the write lock: a write waits for it, but a page of runs and
    a run are read at once on their own connections, not queued behind the writer."""
    from pipelines import spec as specs
    from pipelines.store import StoreConfig
    from pipelines.store.sqlite import SqliteStore

    pipeline = specs.parse(
        {"stages": {"a": {"model": "wavespeed-ai/hunyuan-image-2.1", "input": {"prompt": "x"}}}},
        where="t",
    )
    path = tmp_path / "s.db"
    store = SqliteStore(f"sqlite:///{path}", StoreConfig())
    await store.start()
    holder = connect(str(path))
    try:
        run_id = await store.create_run(pipeline, {}, now=100.0)
        holder.execute("BEGIN IMMEDIATE")
        write = asyncio.ensure_future(store.create_run(pipeline, {}, now=101.0))
        await asyncio.sleep(0.2)
        page = await asyncio.wait_for(store.list_runs(limit=10), 2)
        run = await asyncio.wait_for(store.get_run(run_id), 2)
        assert not write.done()
        assert [r.id for r in page.runs] == [run_id] and run is not None
        holder.execute("ROLLBACK")
        await asyncio.wait_for(write, 10)
    finally:
        holder.close()
        await store.close()
