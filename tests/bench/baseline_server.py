"""Baseline receivers for the throughput benchmark: a bare 200, signature-verify only, and
the hand-rolled receivers the issues describe: verify, then a group-committed insert of
the delivery into SQLite (``record``) or PostgreSQL (``pgrecord``), answered after COMMIT.

Usage: python -m tests.bench.baseline_server PORT bare|verify|record|pgrecord SECRET [DB]
(DB: the SQLite file, or the PostgreSQL URL)
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import sys
import threading
import time
from typing import Any

from aiohttp import web

from pipelines import signing
from pipelines.errors import WebhookVerificationError
from pipelines.secrets import Secret

#: The baselines this module serves (its second argument).
MODES = ("bare", "verify", "record", "pgrecord")


class _Recorder:
    """The least a durable receiver must do: one writer thread, each batch of deliveries
    queued during a turn of the event loop inserted in one transaction (WAL,
    synchronous=FULL: on disk before acknowledged), the webhook-id as primary key."""

    def __init__(self, path: str) -> None:
        self._queue: queue.SimpleQueue[list[tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._pending: list[tuple[Any, ...]] = []
        self._path = path
        self._thread = threading.Thread(target=self._main, name="record-writer")
        self._thread.start()

    def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join()

    def record(self, webhook_id: str, token: str, body: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._hand_over)
        self._pending.append((webhook_id, token, body, time.time(), future, loop))
        return future

    def _hand_over(self) -> None:
        batch, self._pending = self._pending, []
        self._queue.put(batch)

    def _main(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS deliveries (webhook_id TEXT PRIMARY KEY, "
            "token TEXT NOT NULL, body BLOB NOT NULL, received_at REAL NOT NULL)"
        )
        stop = False
        while not stop:
            batch = self._queue.get()
            if batch is None:
                break
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.extend(more)
            error: Exception | None = None
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?)", [d[:4] for d in batch]
                )
                conn.execute("COMMIT")
            except sqlite3.Error as exc:  # every waiting request gets a 500, none hangs
                error = exc
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            by_loop: dict[Any, list[asyncio.Future[None]]] = {}
            for d in batch:
                by_loop.setdefault(d[5], []).append(d[4])
            for loop, futures in by_loop.items():
                loop.call_soon_threadsafe(_resolve, futures, error)
        conn.close()


class _PgRecorder:
    """The least a durable PostgreSQL receiver does: the deliveries queued during a turn of
    the event loop inserted in one transaction (one statement, unnest), each caller
    answered after its COMMIT; several batches in flight on a pool of connections."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: Any = None
        self._pending: list[tuple[Any, ...]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        import asyncpg

        self._pool = await asyncpg.create_pool(self._dsn, min_size=2, max_size=8)
        await self._pool.execute(
            "CREATE TABLE IF NOT EXISTS deliveries (webhook_id TEXT PRIMARY KEY, "
            "token TEXT NOT NULL, body BYTEA NOT NULL, received_at DOUBLE PRECISION NOT NULL)"
        )

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._pool.close()

    def record(self, webhook_id: str, token: str, body: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((webhook_id, token, body, time.time(), future))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._commit(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _commit(self, batch: list[tuple[Any, ...]]) -> None:
        error: Exception | None = None
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO deliveries SELECT * FROM unnest($1::text[], $2::text[], "
                    "$3::bytea[], $4::float8[]) ON CONFLICT DO NOTHING",
                    [d[0] for d in batch], [d[1] for d in batch], [d[2] for d in batch],
                    [d[3] for d in batch],
                )  # fmt: skip
        except Exception as exc:  # every waiting request gets a 500, none hangs
            error = exc
        _resolve([d[4] for d in batch], error)


def _resolve(futures: list[asyncio.Future[None]], error: Exception | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def make_app(mode: str, secret: str, db: str | None = None) -> web.Application:
    """Raises ValueError for an unknown mode, or ``record`` without ``db``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: {', '.join(MODES)}")
    if mode == "record" and not db:
        raise ValueError("record needs the SQLite file's path")
    if mode == "pgrecord" and not db:
        raise ValueError("pgrecord needs the PostgreSQL URL")
    secrets = [Secret(secret)]
    recorder: Any = None
    if mode == "record" and db:
        recorder = _Recorder(db)
    elif mode == "pgrecord" and db:
        recorder = _PgRecorder(db)

    async def bare(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    async def verify(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verified = signing.verify(body, request.headers, secrets, now=time.time())
        except WebhookVerificationError:
            return web.json_response({"error": "bad signature"}, status=401)
        if recorder is not None:
            await recorder.record(verified.webhook_id, request.match_info["token"], body)
        return web.json_response({"ok": True})

    app = web.Application()
    if isinstance(recorder, _PgRecorder):

        async def pg_ctx(_: web.Application) -> Any:
            await recorder.start()
            yield
            await recorder.close()

        app.cleanup_ctx.append(pg_ctx)
    elif recorder is not None:

        async def close(_: web.Application) -> None:
            recorder.close()

        app.on_cleanup.append(close)
    app.router.add_post("/webhooks/wavespeed/{token}", bare if mode == "bare" else verify)
    return app


if __name__ == "__main__":
    port, mode, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    try:
        app = make_app(mode, secret, sys.argv[4] if len(sys.argv) > 4 else None)
    except ValueError as exc:
        sys.exit(str(exc))
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
