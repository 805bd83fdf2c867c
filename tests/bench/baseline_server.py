"""Baseline receivers for the throughput benchmark: a bare 200, and signature-verify only.

Usage: python -m tests.bench.baseline_server PORT bare|verify SECRET
"""

from __future__ import annotations

import sys
import time

from aiohttp import web

from pipelines import signing
from pipelines.errors import WebhookVerificationError
from pipelines.secrets import Secret


def make_app(mode: str, secret: str) -> web.Application:
    secrets = [Secret(secret)]

    async def bare(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    async def verify(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            signing.verify(body, request.headers, secrets, now=time.time())
        except WebhookVerificationError:
            return web.json_response({"error": "bad signature"}, status=401)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/webhooks/wavespeed/{token}", bare if mode == "bare" else verify)
    return app


if __name__ == "__main__":
    port, mode, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    web.run_app(make_app(mode, secret), host="127.0.0.1", port=port, print=None, access_log=None)
