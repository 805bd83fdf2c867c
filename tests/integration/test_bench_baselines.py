"""The receiver benchmark's baselines do what the results table says they do: the
hand-rolled receiver records every verified delivery before answering, once per
webhook-id, and refuses a bad signature like the others."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from pytest_aiohttp import AiohttpClient

from pipelines import signing
from tests.bench.baseline_server import make_app

SECRET = "whsec_YmVuY2gtc2VjcmV0LWtleQ=="


def _signed(body: bytes, webhook_id: str) -> dict[str, str]:
    headers = signing.sign(body, secret=SECRET, webhook_id=webhook_id, timestamp=int(time.time()))
    return {**headers, "content-type": "application/json"}


async def test_hand_rolled_receiver_records_each_delivery_once(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    db = tmp_path / "record.db"
    client = await aiohttp_client(make_app("record", SECRET, str(db)))
    bodies = {f"msg_{i}": f'{{"id":"task_{i}","status":"completed"}}'.encode() for i in range(3)}
    for webhook_id, body in [*bodies.items(), ("msg_0", bodies["msg_0"])]:
        response = await client.post(
            "/webhooks/wavespeed/tok", data=body, headers=_signed(body, webhook_id)
        )
        assert response.status == 200
        # Answered after the commit: visible to another connection at once.
        with sqlite3.connect(db) as conn:
            rows = dict(conn.execute("SELECT webhook_id, body FROM deliveries").fetchall())
        assert rows[webhook_id] == body
    assert rows == bodies  # the repeated webhook-id is not recorded twice

    forged = await client.post(
        "/webhooks/wavespeed/tok",
        data=b'{"id":"task_9"}',
        headers=_signed(b'{"id":"task_8"}', "msg_9"),
    )
    assert forged.status == 401
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 3


async def test_hand_rolled_postgres_receiver_records_each_delivery_once(
    aiohttp_client: AiohttpClient, pg_url: str
) -> None:
    """The PostgreSQL baseline: each verified delivery committed before the 200, once."""
    import asyncpg

    client = await aiohttp_client(make_app("pgrecord", SECRET, pg_url))
    bodies = {f"msg_{i}": f'{{"id":"task_{i}"}}'.encode() for i in range(3)}
    for webhook_id, body in [*bodies.items(), ("msg_0", bodies["msg_0"])]:
        response = await client.post(
            "/webhooks/wavespeed/tok", data=body, headers=_signed(body, webhook_id)
        )
        assert response.status == 200
        conn = await asyncpg.connect(pg_url)
        try:
            rows = {
                r[0]: bytes(r[1])
                for r in await conn.fetch("SELECT webhook_id, body FROM deliveries")
            }
        finally:
            await conn.close()
        assert rows[webhook_id] == body
    assert rows == bodies
