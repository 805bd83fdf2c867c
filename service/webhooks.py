"""The provider callback route: verify, then one transaction, then answer."""

from __future__ import annotations

import json

import orjson
import structlog
from aiohttp import web

from pipelines import signing
from pipelines.errors import WebhookVerificationError
from pipelines.metrics import WEBHOOK_SECONDS, WEBHOOKS
from pipelines.providers import parse_prediction
from service import keys
from service.bodies import read_capped

log = structlog.get_logger("wavechain.webhooks")

_STATUS = {
    "applied": 200,
    "no_effect": 200,
    "duplicate": 200,
    "not_yet": 503,  # the submit's answer is not committed yet: retry shortly
    "unknown_token": 404,
    "task_mismatch": 409,
}


# Answers are fixed per effect: built once, not serialised per request.
_BODIES = {effect: json.dumps({"effect": effect}).encode() for effect in _STATUS}
#: Each effect's counter, bound once: a label lookup per delivery is work on the hot path.
_COUNTED = {effect: WEBHOOKS.labels(effect, "") for effect in _STATUS}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def wavespeed_webhook(request: web.Request) -> web.Response:
    app = request.app  # a property: looked up once, not per use
    received_at = app[keys.CLOCK]()
    settings = app[keys.SETTINGS]
    body = await read_capped(
        request, settings.max_webhook_bytes, timeout_s=settings.body_read_timeout_s
    )
    if body is None:
        WEBHOOKS.labels("rejected", "too_large").inc()
        log.warning("webhook.rejected", reason="too_large")
        return _error(413, f"body larger than {settings.max_webhook_bytes} bytes")
    try:
        verified = signing.verify(
            body,
            request.headers,
            app[keys.WEBHOOK_SECRETS].current,
            now=app[keys.CLOCK](),
            tolerance_s=settings.webhook_tolerance_s,
        )
    except WebhookVerificationError as exc:
        WEBHOOKS.labels("rejected", exc.reason).inc()
        log.warning("webhook.rejected", reason=exc.reason)
        return _error(401, "signature verification failed")
    try:
        prediction = parse_prediction(orjson.loads(body))
    except ValueError as exc:  # orjson's JSONDecodeError is one, invalid UTF-8 included
        WEBHOOKS.labels("rejected", "malformed").inc()
        log.warning("webhook.malformed", webhook_id=verified.webhook_id, error=str(exc))
        return _error(400, f"malformed prediction: {exc}")
    outcome = await app[keys.ENGINE].on_wavespeed_webhook(
        request.match_info["token"], verified.webhook_id, prediction, received_at=received_at
    )
    # Said on the request's access line: one line per delivery, not two.
    request[keys.ACCESS_FIELDS] = {
        "effect": outcome.effect,
        "webhook_id": verified.webhook_id,
        "task_id": prediction.id,
        "task_status": prediction.status,
        "run_id": outcome.run_id,
        "stage": outcome.stage,
    }
    _COUNTED[outcome.effect].inc()
    WEBHOOK_SECONDS.observe(max(0.0, app[keys.CLOCK]() - received_at))
    status = _STATUS[outcome.effect]
    headers = {"Retry-After": "1"} if status == 503 else None
    return web.Response(
        body=_BODIES[outcome.effect],
        status=status,
        content_type="application/json",
        headers=headers,
    )
