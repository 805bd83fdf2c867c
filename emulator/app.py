"""The emulator's HTTP surface: WaveSpeed v3, the AI/ML API route, media, control.

WaveSpeed answers in the envelope ``{code, message, data}``; the AI/ML API in
``{data, meta}`` and errors as ``{message, path, requestId, statusCode, timestamp}``.
``/_emulator/*`` is the test control plane: faults, stats, deliveries, reset.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import math
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
from aiohttp import web
from yarl import URL

from emulator import media
from emulator.faults import FaultError, Faults
from emulator.provider import Provider, StoredFile, new_secret
from emulator.rules import AIMLAPI_RULES, WAVESPEED_MODELS, ParamError, output_size

PROVIDER = web.AppKey("provider", Provider)
MAX_UPLOAD = 64 * 1024 * 1024
_CHUNK = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def envelope(status: int, message: str, data: Any = None) -> web.Response:
    return web.json_response({"code": status, "message": message, "data": data}, status=status)


def aiml_error(request: web.Request, status: int, message: str) -> web.Response:
    body = {
        "message": message,
        "path": request.path,
        "requestId": str(uuid.uuid4()),
        "statusCode": status,
        "timestamp": datetime.now(UTC).isoformat(),
    }
    return web.json_response(body, status=status)


def _origin(request: web.Request) -> str:
    return str(request.url.origin())


def _has_bearer(request: web.Request) -> bool:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(key.strip())


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/api/v3/") and not _has_bearer(request):
        return envelope(401, "Unauthorized: a Bearer API key is required")
    if request.path.startswith("/v1/") and not _has_bearer(request):
        return aiml_error(request, 401, "Unauthorized: a Bearer API key is required")
    return await handler(request)


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ParamError("body", "must be valid JSON") from exc
    if not isinstance(body, dict):
        raise ParamError("body", "must be a JSON object")
    return body


def _submit_fault(provider: Provider) -> tuple[int, dict[str, str]] | None:
    faults = provider.faults
    if not provider.chance(faults.submit_error_rate):
        return None
    provider.stats["submits_refused"] += 1
    headers = {} if faults.retry_after_s is None else {"Retry-After": str(faults.retry_after_s)}
    return faults.submit_error_status, headers


# WaveSpeed v3 ---------------------------------------------------------------------


async def submit(request: web.Request) -> web.Response:
    provider = request.app[PROVIDER]
    model_id = request.match_info["model"]
    rules = WAVESPEED_MODELS.get(model_id)
    if rules is None:
        return envelope(404, f"model not found: {model_id}")
    if fault := _submit_fault(provider):
        status, headers = fault
        response = envelope(status, "rate limit exceeded" if status == 429 else "server busy")
        response.headers.update(headers)
        return response
    if (wait := provider.throttled()) is not None:
        response = envelope(429, "rate limit exceeded for your account level")
        response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return response
    webhook = request.query.get("webhook")
    try:
        params = rules.validate(await _json_object(request))
        if ("width" in params) != ("height" in params):
            raise ParamError("width", "width and height must be given together")
        if webhook is not None:
            target = URL(webhook)
            if target.scheme not in ("http", "https") or not target.host:
                raise ParamError("webhook", "must be an absolute http(s) URL")
            if params.get("enable_base64_output"):
                raise ParamError("webhook", "webhook callback does not support base64 output")
    except ParamError as exc:
        provider.stats["submits_invalid"] += 1
        return envelope(400, str(exc))
    task = provider.create_task(rules, params, _origin(request), webhook)
    if provider.chance(provider.faults.submit_unclear_rate):
        # The task exists (and its webhook will come); the answer does not say so.
        provider.stats["submits_unclear"] += 1
        answer = provider.faults.submit_unclear_answer
        if answer == "malformed":
            text = json.dumps({"code": 200, "message": "success", "data": task.prediction()})
            return web.Response(text=text[: len(text) // 2], content_type="application/json")
        return web.Response(status=int(answer), text="Bad Gateway" if answer == "502" else "")
    if params.get("enable_sync_mode"):
        try:
            await asyncio.wait_for(task.done.wait(), provider.faults.sync_timeout_s)
        except TimeoutError:
            data = task.prediction()
            data["error"] = "Sync mode timed out; the task continues, query urls.get later"
            data["code"] = 5004
            return envelope(200, "success", data)
    return envelope(200, "success", task.prediction())


async def result(request: web.Request) -> web.Response:
    provider = request.app[PROVIDER]
    provider.stats["result_polls"] += 1
    task = provider.tasks.get(request.match_info["id"])
    if task is None:
        return envelope(404, "prediction not found")
    return envelope(200, "success", task.prediction())


async def delete(request: web.Request) -> web.Response:
    """DELETE /api/v3/predictions/{id}: stop the task; answers as the real API documents."""
    provider = request.app[PROVIDER]
    if provider.chance(provider.faults.delete_error_rate):
        provider.stats["deletes_refused"] += 1
        return envelope(503, "service unavailable")
    task = provider.tasks.get(request.match_info["id"])
    if task is None:
        return envelope(404, "prediction not found")
    provider.delete_task(task)
    return envelope(200, "success", {"id": task.id, "status": "deleted"})


async def balance(request: web.Request) -> web.Response:
    """GET /api/v3/account/balance (the ``balance_usd`` fault sets it)."""
    provider = request.app[PROVIDER]
    provider.stats["balance_checks"] += 1
    return envelope(200, "success", {"balance": provider.faults.balance_usd, "currency": "USD"})


async def get_webhook_secret(request: web.Request) -> web.Response:
    return envelope(200, "success", {"secret": request.app[PROVIDER].webhook_secret})


async def create_upload(request: web.Request) -> web.Response:
    provider = request.app[PROVIDER]
    try:
        body = await _json_object(request)
        filename = body.get("filename")
        if not isinstance(filename, str) or not filename or "/" in filename:
            raise ParamError("filename", "must be a plain file name")
        size = body.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_UPLOAD:
            raise ParamError("size", f"must be an integer in 1..{MAX_UPLOAD}")
    except ParamError as exc:
        return envelope(400, str(exc))
    upload_id = uuid.uuid4().hex
    content_type = str(body.get("content_type") or "application/octet-stream")
    provider.uploads[upload_id] = StoredFile(content_type=content_type, expires_at=None, data=b"")
    origin = _origin(request)
    return envelope(
        200,
        "success",
        {
            "download_url": f"{origin}/media/uploads/{upload_id}/{filename}",
            "upload": {
                "method": "PUT",
                "url": f"{origin}/_emulator/uploads/{upload_id}",
                "headers": {"Content-Type": content_type},
            },
        },
    )


async def put_upload(request: web.Request) -> web.Response:
    stored = request.app[PROVIDER].uploads.get(request.match_info["id"])
    if stored is None:
        raise web.HTTPNotFound(text="unknown upload")
    stored.data = await request.read()
    return web.Response(status=200)


# AI/ML API --------------------------------------------------------------------------


async def aiml_generate(request: web.Request) -> web.Response:
    provider = request.app[PROVIDER]
    if fault := _submit_fault(provider):
        status, headers = fault
        response = aiml_error(request, status, "Too many requests" if status == 429 else "Busy")
        response.headers.update(headers)
        return response
    try:
        params = AIMLAPI_RULES.validate(await _json_object(request))
    except ParamError as exc:
        provider.stats["submits_invalid"] += 1
        return aiml_error(request, 400, str(exc))
    provider.stats["submits"] += 1
    provider.stats[f"submits:{AIMLAPI_RULES.model_id}"] += 1
    await asyncio.sleep(provider.faults.latency_s)
    if provider.chance(provider.faults.failure_rate) or (
        AIMLAPI_RULES.model_id in provider.faults.fail_models
    ):
        return aiml_error(request, 500, provider.faults.failure_error)
    width, height = output_size(params, "square_hd")
    fmt = params["output_format"]
    seed = params.get("seed")
    stem = uuid.uuid4().hex
    images = []
    for n in range(params["num_images"]):
        material = media.digest(params["model"], params["prompt"], seed, width, height, n)
        data = await anyio.to_thread.run_sync(media.render_image, width, height, fmt, material)
        if params["sync_mode"]:
            images.append({"b64_json": base64.b64encode(data).decode()})
        else:
            images.append(
                {"url": provider.store_output(_origin(request), f"{stem}/{n}", fmt, data)}
            )
    credits = 210_000 * len(images)
    return web.json_response({"data": images, "meta": {"usage": {"credits_used": credits}}})


# media --------------------------------------------------------------------------------


def _free_box_header(padding: int) -> bytes:
    if padding < 8:
        raise ValueError("padding too small for a free box")
    if padding < 2**32:
        return struct.pack(">I4s", padding, b"free")
    return struct.pack(">I4sQ", 1, b"free", padding)


async def _stream(request: web.Request, stored: StoredFile, filename: str) -> web.StreamResponse:
    encoding = request.app[PROVIDER].faults.output_encoding
    if encoding == "gzip":  # compressed as a CDN serves it: Content-Length is the gzip's
        body = await anyio.to_thread.run_sync(_gzipped, stored)
        return web.Response(
            body=body,
            headers={
                "Content-Type": stored.content_type,
                "Content-Encoding": "gzip",
                "Content-Disposition": f'inline; filename="{filename}"',
                "Access-Control-Allow-Origin": "*",
            },
        )
    response = web.StreamResponse(
        headers={
            "Content-Type": stored.content_type,
            "Content-Length": str(stored.size),
            "Content-Disposition": f'inline; filename="{filename}"',
            # As a CDN serving public outputs does: a browser page may fetch them.
            "Access-Control-Allow-Origin": "*",
        }
    )
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    await response.write(stored.data)
    padding = stored.size - len(stored.data)
    if padding:
        header = _free_box_header(padding)
        await response.write(header)
        remaining = padding - len(header)
        zeros = bytes(_CHUNK)
        while remaining:
            step = min(remaining, _CHUNK)
            await response.write(zeros[:step])
            remaining -= step
    await response.write_eof()
    return response


def _gzipped(stored: StoredFile) -> bytes:
    """The file, padding included, gzip-compressed (incompressible data stays its size)."""
    out = gzip.compress(stored.data, compresslevel=1, mtime=0)
    padding = stored.size - len(stored.data)
    if padding:
        header = _free_box_header(padding)
        out += gzip.compress(header + bytes(padding - len(header)), compresslevel=1, mtime=0)
    return out


async def get_output(request: web.Request) -> web.StreamResponse:
    provider = request.app[PROVIDER]
    path = f"{request.match_info['task']}/{request.match_info['name']}"
    stored = provider.media.get(path, time.monotonic())
    if stored is None:
        raise web.HTTPNotFound(text="output not found or expired")
    provider.stats["media_downloads"] += 1
    return await _stream(request, stored, request.match_info["name"])


async def get_upload(request: web.Request) -> web.StreamResponse:
    stored = request.app[PROVIDER].uploads.get(request.match_info["id"])
    if stored is None or not stored.data:
        raise web.HTTPNotFound(text="upload not found")
    return await _stream(request, stored, request.match_info["name"])


# control plane -------------------------------------------------------------------------


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[PROVIDER].faults.as_dict())


async def put_faults(request: web.Request) -> web.Response:
    provider = request.app[PROVIDER]
    try:
        changes = await _json_object(request)
        provider.set_faults(provider.faults.updated(changes))
    except (FaultError, ParamError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(provider.faults.as_dict())


async def get_stats(request: web.Request) -> web.Response:
    provider = request.app[PROVIDER]
    statuses: dict[str, int] = {}
    for task in provider.tasks.values():
        statuses[task.status] = statuses.get(task.status, 0) + 1
    return web.json_response({"counters": dict(provider.stats), "tasks": statuses})


async def get_deliveries(request: web.Request) -> web.Response:
    rows = [
        {
            "task_id": d.task_id,
            "webhook_id": d.webhook_id,
            "attempt": d.attempt,
            "status": d.status,
            "error": d.error,
            "at": d.at,
        }
        for d in request.app[PROVIDER].deliveries
    ]
    return web.json_response(rows)


async def get_tasks(request: web.Request) -> web.Response:
    """Every task with its webhook URL: what the provider knows, for tests to inspect."""
    rows = [
        {
            **task.prediction(with_input=True),
            "webhook": task.webhook,
            "submitted_mono": task.submitted_mono,
            "finished_mono": task.finished_mono,
        }
        for task in request.app[PROVIDER].tasks.values()
    ]
    return web.json_response(rows)


async def rotate_secret(request: web.Request) -> web.Response:
    """Sign webhooks with a new secret from now on (a rotation at the provider)."""
    provider = request.app[PROVIDER]
    body = await _json_object(request)
    secret = body.get("secret") or new_secret()
    if not isinstance(secret, str):
        return web.json_response({"error": "secret must be a string"}, status=400)
    provider.webhook_secret = secret
    return web.json_response({"secret": secret})


async def reset(request: web.Request) -> web.Response:
    request.app[PROVIDER].reset()
    return web.json_response({"ok": True})


def create_emulator_app(
    faults: Faults | None = None,
    *,
    webhook_secret: str | None = None,
    max_media_bytes: int = 512 * 1024 * 1024,
) -> web.Application:
    provider = Provider(
        faults or Faults(),
        webhook_secret=webhook_secret or new_secret(),
        max_media_bytes=max_media_bytes,
    )
    app = web.Application(middlewares=[auth], client_max_size=MAX_UPLOAD)
    app[PROVIDER] = provider

    async def provider_ctx(_: web.Application) -> AsyncIterator[None]:
        await provider.start()
        yield
        await provider.close()

    app.cleanup_ctx.append(provider_ctx)
    r = app.router
    r.add_get("/api/v3/predictions/{id}/result", result)
    r.add_get("/api/v3/predictions/{id}", result)
    r.add_delete("/api/v3/predictions/{id}", delete)
    r.add_get("/api/v3/webhook/secret", get_webhook_secret)
    r.add_get("/api/v3/account/balance", balance)
    r.add_post("/api/v3/media/uploads", create_upload)
    r.add_post("/api/v3/{model:.+}", submit)
    r.add_post("/v1/images/generations", aiml_generate)
    r.add_get("/media/outputs/{task}/{name}", get_output)
    r.add_get("/media/uploads/{id}/{name}", get_upload)
    r.add_put("/_emulator/uploads/{id}", put_upload)
    r.add_get("/_emulator/faults", get_faults)
    r.add_put("/_emulator/faults", put_faults)
    r.add_get("/_emulator/stats", get_stats)
    r.add_get("/_emulator/deliveries", get_deliveries)
    r.add_get("/_emulator/tasks", get_tasks)
    r.add_post("/_emulator/reset", reset)
    r.add_post("/_emulator/webhook-secret", rotate_secret)
    return app
