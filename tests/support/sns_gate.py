"""An HTTP proxy in front of the local AWS endpoint that refuses, as a whole, any SNS
PublishBatch request carrying a marker: what real SNS does with a batch it rejects
(BatchRequestTooLong, an invalid parameter), which the local endpoint cannot be made to
do. It counts what it saw."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from urllib.parse import parse_qs

import requests
from aiohttp import web

REFUSAL = (
    '<ErrorResponse xmlns="http://sns.amazonaws.com/doc/2010-03-31/"><Error>'
    "<Type>Sender</Type><Code>BatchRequestTooLong</Code>"
    "<Message>The length of all the messages put together is more than the limit.</Message>"
    "</Error><RequestId>gate</RequestId></ErrorResponse>"
)


class SnsGate:
    def __init__(self, upstream: str, marker: str | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.marker = marker.encode() if marker else None
        self.counts: Counter[str] = Counter()
        #: How many times each event id was sent in a batch SNS took.
        self.published: Counter[str] = Counter()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b"Action=PublishBatch" in body:
            self.counts["batches"] += 1
            if self.marker is not None and self.marker in body:
                self.counts["refused"] += 1
                return web.Response(status=400, text=REFUSAL, content_type="text/xml")
            form = parse_qs(body.decode())
            for name, values in form.items():
                if name.endswith(".Message"):
                    self.published[json.loads(values[0]).get("id", "")] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        # The local endpoint answers some requests with two Server headers, which
        # aiohttp's client refuses: forward with requests, in a thread.
        upstream = await asyncio.to_thread(
            requests.request,
            request.method,
            self.upstream + request.path_qs,
            data=body,
            headers=headers,
            timeout=60,
            stream=False,
        )
        out = {
            k: v
            for k, v in upstream.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "content-encoding",
                                 "connection", "server")
        }  # fmt: skip
        data = upstream.content
        response = web.StreamResponse(status=upstream.status_code, headers=out)
        # A HEAD answer carries the object's length and no body: pass it on as is.
        length = upstream.headers.get("Content-Length")
        response.content_length = int(length) if length is not None else len(data)
        await response.prepare(request)
        if request.method != "HEAD":
            await response.write(data)
        await response.write_eof()
        return response
