"""Request context and error mapping, the API token check, and the one-line access log."""

from __future__ import annotations

import hmac
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Middleware
from aiohttp.web_request import BaseRequest

from pipelines.errors import WavechainError
from pipelines.secrets import Secret
from pipelines.store import unavailable
from service import keys, logs

log = structlog.get_logger("wavechain.app")
_access = structlog.get_logger("wavechain.access")
# Request ids: unique per process start and cheap (no urandom syscall per request).
_PREFIX = f"{uuid.uuid4().hex[:8]}-"
_IDS = itertools.count(1)
_REQUEST_ID = web.RequestKey("request_id", str)
_ROUTE = web.RequestKey("route", str)
_NONE: dict[str, Any] = {}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def context_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id for every log line; map domain errors to HTTP answers.

    Every error wavechain raises on purpose carries its status (``status_hint``): a bad
    spec is 400, a run in the wrong state 409, a missing provider key 422, a concurrent
    writer 503 with ``Retry-After``. Anything else is a 500 with the request id to quote.
    """
    request_id = request.headers.get("X-Request-Id", "")[:64] or f"{_PREFIX}{next(_IDS):x}"
    # The route template, never the path: webhook paths carry a secret token.
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    logs.request_context.set((request_id, route))
    request[_REQUEST_ID], request[_ROUTE] = request_id, route  # for the access line
    try:
        response = await handler(request)
    except WavechainError as exc:
        status = exc.status_hint
        if status >= 500:
            log.warning("request.failed", error=str(exc), error_type=type(exc).__name__)
        response = web.json_response({"error": str(exc)}, status=status)
        if status == 503:
            response.headers["Retry-After"] = "1"
    except web.HTTPException:
        raise
    except Exception as exc:
        if unavailable(exc):  # the database is locked or down: the caller retries
            log.warning("request.store_unavailable", error=repr(exc))
            response = web.json_response(
                {"error": "the store is unavailable; try again", "request_id": request_id},
                status=503,
                headers={"Retry-After": "2"},
            )
            response.headers["X-Request-Id"] = request_id
            return response
        log.exception("request.failed")
        response = web.json_response(
            {"error": "internal error", "request_id": request_id}, status=500
        )
    response.headers["X-Request-Id"] = request_id
    return response


def require_token(token: Secret) -> Middleware:
    """The REST API needs ``Authorization: Bearer <token>``; webhooks and health do not."""
    expected = f"Bearer {token.reveal()}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):
                return web.json_response({"error": "missing or wrong API token"}, status=401)
        return await handler(request)

    return middleware


class AccessLog(AbstractAccessLogger):
    """One structured line per request: the route template (never the path: webhook paths
    carry a secret token), status, bytes and duration, the request id, and whatever the
    handler added under ``keys.ACCESS_FIELDS`` (a webhook delivery's effect, task, run)."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._log = _access.bind()

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = {
            "event": "http.request",
            "method": request.method,
            # A request that never reached the middleware (unparseable) has neither.
            "route": request.get(_ROUTE, "unmatched"),
            "request_id": request.get(_REQUEST_ID),
            "status": response.status,
            "bytes": response.body_length,
            "duration_ms": round(time * 1000, 2),
            **request.get(keys.ACCESS_FIELDS, _NONE),
        }
        if not logs.ACCESS.write(fields):  # logging not configured (tests, a library user)
            self._log.info(**fields)

    @property
    def enabled(self) -> bool:
        return bool(self._log.is_enabled_for(logging.INFO))
