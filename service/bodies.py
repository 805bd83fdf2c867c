"""Request bodies read with a cap: never more than the cap is buffered."""

from __future__ import annotations

import asyncio

from aiohttp import web


async def read_capped(request: web.Request, cap: int, *, timeout_s: float) -> bytes | None:
    """The body, or None when it is larger than ``cap`` bytes (declared or sent). A body
    that takes longer than ``timeout_s`` to arrive is answered 408: a trickling client
    does not hold a handler for ever."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _read(request, cap)
    except TimeoutError:
        raise web.HTTPRequestTimeout(
            text='{"error": "request body too slow"}', content_type="application/json"
        ) from None


async def _read(request: web.Request, cap: int) -> bytes | None:
    if request.content_length is not None:
        # The common case: a declared length within the cap is read in one go.
        if request.content_length > cap:
            return None
        if request.content_length == 0:
            return b""  # aiohttp's empty stream refuses readexactly(0)
        try:
            return await request.content.readexactly(request.content_length)
        except asyncio.IncompleteReadError:
            raise web.HTTPBadRequest(text="body shorter than its Content-Length") from None
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(65536):
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
