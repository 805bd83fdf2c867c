"""Group-committed SQLite: one writer thread, one transaction per batch of operations.

Operations are plain functions of a ``sqlite3.Connection``. Those queued in one turn of
the event loop reach the writer together, and whatever is queued while a commit is in
progress runs in the next transaction. One failure rolls back only itself: a batch in
which an operation raises is rolled back and run again with each operation inside its
own SAVEPOINT (savepoints cost two statements per operation, and failures are rare).
So an operation may run twice; it must be a function of the database and its own
arguments, as every operation of the store is. Callers are answered only after
the COMMIT that holds their work has returned: durable before acknowledged, at
one fsync per batch instead of one per operation.

Work done in memory alongside an operation (a cache of what it wrote) must not outlive
the operation if it is rolled back: ``on_rollback`` is called, on the writer thread,
whenever an operation or a whole batch is rolled back.

An operation whose loss in a power cut would be harmless (a lease: lost, the job is
simply claimed again) can say so with ``durable=False``. A batch made only of such
operations commits without waiting for the disk (``synchronous=NORMAL`` in WAL mode); the
next durable commit's fsync covers its pages too, as the WAL is one file written in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pipelines.errors import ConfigError

T = TypeVar("T")
_STOP = object()
MAX_BATCH = 512


class _Op(NamedTuple):
    """One queued operation: what to run, whom to answer, on which loop, and whether its
    commit must reach the disk before the answer."""

    run: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    durable: bool


class GroupCommitter:
    def __init__(
        self,
        path: str,
        *,
        migrations: Sequence[str],
        synchronous: str = "FULL",
        on_rollback: Callable[[], None] | None = None,
        busy_timeout_ms: int = 5000,
    ) -> None:
        self._path = path
        self._on_rollback = on_rollback or (lambda: None)
        self._migrations = migrations
        self._busy_timeout_ms = busy_timeout_ms
        self._synchronous = synchronous.upper()
        # A batch of non-durable operations never asks for more than the configured level.
        self._relaxed = "NORMAL" if self._synchronous in ("FULL", "EXTRA") else self._synchronous
        self._current = self._synchronous
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # lists of _Op, or _STOP
        self._pending: dict[asyncio.AbstractEventLoop, list[_Op]] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.batches = 0
        self.operations = 0

    def start(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._main, name="sqlite-writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    def run(
        self, op: Callable[[sqlite3.Connection], T], *, durable: bool = True
    ) -> asyncio.Future[T]:
        """Run ``op`` in the next transaction; the future is answered once that
        transaction is committed (and, if ``durable``, on disk). A plain function handing
        back the future, not a coroutine: one frame less to create and resume per call."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # Operations queued during one turn of the loop go to the writer together, at the
        # end of the turn: under load that is one wake-up and one transaction for all of
        # them, where handing each over at once would wake the writer for every one.
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._hand_over, loop)
        pending.append(_Op(op, future, loop, durable))
        return future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        self._queue.put(self._pending.pop(loop))

    def _connect(self) -> sqlite3.Connection:
        conn = connect(self._path, busy_timeout_ms=self._busy_timeout_ms)
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        migrate(conn, self._migrations)
        return conn

    def _main(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # reported to start()'s caller
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch = list(first)
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        self._queue.put(_STOP)
                        break
                    batch.extend(item)
                try:
                    results = self._run_batch(conn, batch)
                except Exception as exc:  # the COMMIT, or the connection itself, failed
                    # Every caller is answered with the error, never left waiting; the
                    # next batch begins on a clean connection.
                    with contextlib.suppress(sqlite3.Error):
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                    self._on_rollback()
                    results = [(None, exc)] * len(batch)
                self.batches += 1
                self.operations += len(batch)
                self._answer(batch, results)
        finally:
            conn.close()

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[_Op]
    ) -> list[tuple[Any, BaseException | None]]:
        """Each operation's (value, error), once the batch is committed; raises if the
        COMMIT fails."""
        results: list[tuple[Any, BaseException | None]] = []
        wanted = self._synchronous if any(op.durable for op in batch) else self._relaxed
        if wanted != self._current:
            conn.execute(f"PRAGMA synchronous={wanted}")
            self._current = wanted
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Operations almost never fail: run the batch without a savepoint per
            # operation (two statements each, a tenth of a delivery's writer time)...
            results.extend((op.run(conn), None) for op in batch)
        except BaseException:
            # ...and if one does, undo the whole batch and run it again with each
            # operation inside its own savepoint, so that only the failing one is lost.
            results.clear()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._on_rollback()
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    value = op.run(conn)
                except BaseException as exc:  # handed to the awaiting caller
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    self._on_rollback()
                    results.append((None, exc))
                else:
                    conn.execute("RELEASE op")
                    results.append((value, None))
        conn.execute("COMMIT")
        return results

    def _answer(self, batch: list[_Op], results: list[tuple[Any, BaseException | None]]) -> None:
        # One wake-up per loop per batch, not one per operation.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any, Any]]] = {}
        for op, (value, error) in zip(batch, results, strict=True):
            by_loop.setdefault(op.loop, []).append((op.future, value, error))
        for loop, items in by_loop.items():
            # RuntimeError: the loop closed while we committed; nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve_all, items)


def connect(path: str, *, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, rows by name."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    # Switching a new file to WAL needs an exclusive lock, and SQLite answers "locked" at
    # once, without waiting, to a reader that would wait on a writer: another process
    # migrating the same new file. Wait for it here, within the busy timeout.
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.01)
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _statements(script: str) -> Iterator[str]:
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                yield pending
            pending = ""
    if pending.strip():
        yield pending


def migrate(conn: sqlite3.Connection, migrations: Sequence[str]) -> int:
    """Bring the schema to the last of ``migrations`` (the database's ``user_version``
    counts those applied), each in its own write transaction: several processes starting
    at once on one file apply each migration once. Returns the version."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > len(migrations):
                raise ConfigError(
                    f"DATABASE_URL: the database's schema is version {version}, newer than this "
                    f"wavechain knows ({len(migrations)}): upgrade wavechain"
                )
            if version == len(migrations):
                conn.execute("COMMIT")
                return version
            for statement in _statements(migrations[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _resolve_all(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in items:
        _resolve(future, value, error)


def _resolve(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
