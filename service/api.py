"""The REST API: runs, pipelines, health. Handlers parse, call the engine, map the result."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
from datetime import datetime
from importlib import resources
from typing import Any, NamedTuple

import anyio.to_thread
from aiohttp import web
from aiohttp_sse import sse_response

from pipelines import budget, governor
from pipelines import spec as specs
from pipelines.catalog import get_model
from pipelines.errors import IdempotencyKeyReusedError, PipelineTooLargeError, SpecError
from pipelines.prices import estimate
from pipelines.state import RunStatus
from pipelines.store.records import Idempotency, IdempotentReplay
from pipelines.transitions import iso
from service import keys
from service.bodies import read_capped


@functools.cache
def example_names() -> list[str]:
    root = resources.files("pipelines") / "examples"
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


@functools.cache
def _parsed_example(name: str) -> specs.Pipeline:
    text = (resources.files("pipelines") / "examples" / f"{name}.yaml").read_text("utf-8")
    return specs.parse_text(text, where=f"{name}.yaml", default_name=name)


async def load_example(name: str) -> specs.Pipeline:
    """A bundled example, read and parsed once, off the event loop."""
    names = await anyio.to_thread.run_sync(example_names)
    if name not in names:
        raise SpecError(
            f"pipeline: unknown pipeline {name!r} (known: {', '.join(names)}; "
            "or send the spec inline as an object)"
        )
    return await anyio.to_thread.run_sync(_parsed_example, name)


async def _json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, within the size and nesting limits."""
    limits = request.app[keys.SETTINGS].limits
    raw = await read_capped(
        request, limits.max_spec_bytes, timeout_s=request.app[keys.SETTINGS].body_read_timeout_s
    )
    if raw is None:
        raise PipelineTooLargeError(
            f"request body larger than {limits.max_spec_bytes} bytes (MAX_SPEC_BYTES)"
        )
    try:
        body = json.loads(raw or b"null")
    except RecursionError:
        raise SpecError(f"request body nested more than {limits.max_depth} levels deep") from None
    except ValueError:
        raise SpecError("request body must be JSON") from None
    if not isinstance(body, dict):
        raise SpecError("request body must be a JSON object")
    if specs.depth(body, limits.max_depth + 1) > limits.max_depth + 1:
        raise SpecError(f"request body nested more than {limits.max_depth} levels deep")
    if _holds_nul(body):
        raise SpecError("request body: text must not hold NUL characters (\\u0000)")
    return body


def _holds_nul(value: Any) -> bool:
    """Whether any key or string holds a NUL, which no database text column can store."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


#: What an Idempotency-Key may be: 1 to 255 visible ASCII characters.
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def _idempotency(request: web.Request, body: dict[str, Any]) -> Idempotency | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise SpecError("Idempotency-Key: must be 1 to 255 visible ASCII characters")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return Idempotency(key, hashlib.sha256(canonical.encode()).hexdigest())


class RunRequest(NamedTuple):
    """The body of POST /v1/runs (and /estimate), checked."""

    pipeline: specs.Pipeline
    inputs: dict[str, Any]
    #: Seconds from now, or a time; None: the pipeline's.
    deadline: float | datetime | None
    budget_usd: float | None
    priority: int
    concurrency_key: str | None
    concurrency_limit: int | None


_RUN_FIELDS = (
    "pipeline", "inputs", "deadline", "budget_usd", "priority", "concurrency_key",
    "concurrency_limit",
)  # fmt: skip


def _concurrency(body: dict[str, Any]) -> tuple[str | None, int | None]:
    key, cap = body.get("concurrency_key"), body.get("concurrency_limit")
    if key is not None and (not isinstance(key, str) or not key or not _storable(key, 200)):
        raise SpecError("concurrency_key: must be a text of 1 to 200 characters, with no NUL")
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= 100_000:
            raise SpecError(f"concurrency_limit: must be an integer 1..100000, got {cap!r}")
        if key is None:
            raise SpecError("concurrency_limit: needs a concurrency_key to count by")
    return key, cap


def _deadline(value: Any) -> float | datetime | None:
    """``deadline``: seconds (a number) or an ISO 8601 time with its offset."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            raise SpecError(
                f"deadline: {value[:64]!r} is not an ISO 8601 time (2026-12-05T18:00:00Z)"
            ) from None
        if at.tzinfo is None:
            raise SpecError("deadline: a time needs its offset (Z or +01:00)")
        return at
    if (why := specs.deadline_rule(value)) is not None:
        raise SpecError(f"deadline: {why}, or a time")
    return float(value)


def _budget(value: Any) -> float | None:
    if value is None:
        return None
    if (why := specs.budget_rule(value)) is not None:
        raise SpecError(f"budget_usd: {why}")
    return float(value)


async def _run_request(request: web.Request, body: dict[str, Any]) -> RunRequest:
    """The body of POST /v1/runs (and /estimate): its pipeline, parsed, its inputs, and
    the run's deadline and budget when given."""
    unknown = set(body) - set(_RUN_FIELDS)
    if unknown:
        raise SpecError(f"unknown fields {sorted(unknown)} (expected {', '.join(_RUN_FIELDS)})")
    raw = body.get("pipeline")
    if isinstance(raw, str):
        pipeline = await load_example(raw)
    elif isinstance(raw, dict):
        limits = request.app[keys.SETTINGS].limits
        pipeline = specs.parse(raw, where="inline pipeline", limits=limits)
    else:
        raise SpecError("pipeline: must be an example's name or an inline spec object")
    inputs = body.get("inputs", {})
    if not isinstance(inputs, dict):
        raise SpecError("inputs: must be an object of input name to value")
    deadline, budget = _deadline(body.get("deadline")), _budget(body.get("budget_usd"))
    try:
        priority = governor.priority_of(body.get("priority", "normal"))
    except ValueError as exc:
        raise SpecError(f"priority: {exc}") from None
    key, cap = _concurrency(body)
    return RunRequest(pipeline, inputs, deadline, budget, priority, key, cap)


async def estimate_run(request: web.Request) -> web.Response:
    """What a run would cost (the price table's view), without starting it."""
    run = await _run_request(request, await _json(request))
    return web.json_response(estimate(run.pipeline, run.inputs, request.app[keys.PRICES]))


async def create_run(request: web.Request) -> web.Response:
    """201 with the new run; with an Idempotency-Key that already started a run from the
    same request, 200 with that run (``Idempotent-Replayed: true``) and nothing started."""
    body = await _json(request)
    idempotency = _idempotency(request, body)
    run = await _run_request(request, body)
    engine = request.app[keys.ENGINE]
    try:
        run_id = await engine.create_run(
            run.pipeline,
            run.inputs,
            idempotency=idempotency,
            deadline=run.deadline,
            budget_usd=run.budget_usd,
            priority=run.priority,
            concurrency=(run.concurrency_key, run.concurrency_limit),
        )
    except IdempotentReplay as replay:
        assert idempotency is not None  # noqa: S101 - only raised for a key
        if replay.request_hash != idempotency.request_hash:
            raise IdempotencyKeyReusedError(
                f"Idempotency-Key {idempotency.key!r} already started run {replay.run_id} "
                "with a different request; use a new key for a new request"
            ) from None
        view = await request.app[keys.STORE].get_run(replay.run_id)
        assert view is not None  # noqa: S101 - runs are not deleted while referenced here
        return web.json_response(
            view.as_json(), status=200, headers={"Idempotent-Replayed": "true"}
        )
    view = await request.app[keys.STORE].get_run(run_id)
    assert view is not None  # noqa: S101 - just written in the same process
    return web.json_response(view.as_json(), status=201)


#: The most runs one page holds.
MAX_PAGE = 200
RUN_STATUSES = tuple(status.value for status in RunStatus)


async def list_runs(request: web.Request) -> web.Response:
    """Newest first, a page at a time: ``next_cursor`` (null on the last page) is passed
    back as ``cursor`` for the next."""
    status = request.query.get("status")
    if status is not None and status not in RUN_STATUSES:
        raise SpecError(f"status: must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
    raw_limit = request.query.get("limit", "50")
    if not (raw_limit.isascii() and raw_limit.isdigit()):
        raise SpecError(f"limit: must be an integer, got {raw_limit!r}")
    limit = int(raw_limit)
    if not 1 <= limit <= MAX_PAGE:
        raise SpecError(f"limit: must be in range 1..{MAX_PAGE}, got {limit}")
    page = await request.app[keys.STORE].list_runs(
        limit=limit,
        status=status,
        pipeline=_text_param(request, "pipeline", 100),
        cursor=_text_param(request, "cursor", 200),
    )
    return web.json_response(
        {"runs": [r.as_json() for r in page.runs], "next_cursor": page.next_cursor}
    )


def _storable(value: str, longest: int) -> bool:
    """Whether a text from the request is one the store could hold and compare: not too
    long, and no NUL (which no database text column can store)."""
    return len(value) <= longest and "\x00" not in value


def _text_param(request: web.Request, name: str, longest: int) -> str | None:
    """A text query parameter: absent or empty is None; one the store could not hold is
    a 400."""
    value = request.query.get(name)
    if not value:
        return None
    if not _storable(value, longest):
        raise SpecError(f"{name}: must be at most {longest} characters, with no NUL")
    return value


async def _run_json(request: web.Request) -> dict[str, Any]:
    """The run named in the path, as JSON; 404 if there is none (an id no run could have,
    too long or holding a NUL, included)."""
    run_id = request.match_info["id"]
    view = await request.app[keys.STORE].get_run(run_id) if _storable(run_id, 100) else None
    if view is None:
        raise web.HTTPNotFound(text='{"error": "no such run"}', content_type="application/json")
    return view.as_json()


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false")
    if value not in ("true", "false", "1", "0"):
        raise SpecError(f"{name}: must be true or false")
    return value in ("true", "1")


async def _with_previews(request: web.Request, run: dict[str, Any]) -> dict[str, Any]:
    """Each stage gains ``previews``: URLs a browser may load its outputs from, with the
    kind of media each is (presigned URLs of the mirrored copies where there are some)."""
    engine = request.app[keys.ENGINE]
    for stage in run["stages"]:
        model = get_model(stage["model"])
        kind = model.output if model is not None else "file"
        urls = await engine.preview_urls(stage["mirrored_outputs"], stage["provider_outputs"])
        stage["previews"] = [{"url": url, "kind": kind} for url in urls]
    return run


async def get_run(request: web.Request) -> web.Response:
    """The run; with ``previews=true``, each stage's previewable outputs too."""
    run = await _run_json(request)
    if _flag(request, "previews"):
        run = await _with_previews(request, run)
    return web.json_response(run)


#: How often a stream looks whether its client is still there (aiohttp does not cancel a
#: handler whose client left).
_STREAM_CHECK_S = 1.0


async def run_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the run (as GET /v1/runs/{id}?previews=true) at once, then
    each time it changes; a comment every 15 s keeps the connection open."""
    run = await _run_json(request)
    changes = request.app[keys.CHANGES]
    async with sse_response(request, ping_interval=15) as stream:
        sent = ""
        quiet = 0
        while stream.is_connected() and not changes.closed:
            # Compared before previews are added: presigned URLs differ at every signing.
            state = json.dumps(run, separators=(",", ":"))
            if state != sent:
                data = await _with_previews(request, run)
                await stream.send(json.dumps(data, separators=(",", ":")), event="run")
                sent = state
            notified = await changes.wait(_STREAM_CHECK_S)
            quiet = 0 if notified else quiet + 1
            # A running run is read every second; an ended one on a notice, or every 5 s.
            if notified or run["status"] == "running" or quiet % 5 == 0:
                run = await _run_json(request)
    return stream


async def runs_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``changed`` whenever a run may have changed (at most one a
    second, and at least every 15 s), for a list to read its page again."""
    changes = request.app[keys.CHANGES]
    async with sse_response(request, ping_interval=15) as stream:
        await stream.send("{}", event="changed")
        quiet = 0
        while stream.is_connected() and not changes.closed:
            if await changes.wait(_STREAM_CHECK_S) or quiet >= 14:
                await stream.send("{}", event="changed")
                quiet = 0
                await asyncio.sleep(1.0)
            else:
                quiet += 1
    return stream


async def run_events(request: web.Request) -> web.Response:
    """The run's lifecycle events, in the order they were written (and published)."""
    run_id = (await _run_json(request))["id"]
    return web.json_response({"events": await request.app[keys.STORE].outbox(run_id)})


SPEND_GROUPS = ("day", "pipeline", "model")


async def spend(request: web.Request) -> web.Response:
    """What attempts cost since ``since`` (default 7d), grouped ``by`` day (UTC),
    pipeline or model: the spend ledger, kept when runs are pruned."""
    now = request.app[keys.CLOCK]()
    since = budget.parse_since(request.query.get("since", "7d"), now)
    by = request.query.get("by", "day")
    if by not in SPEND_GROUPS:
        raise SpecError(f"by: must be one of {', '.join(SPEND_GROUPS)}, got {by[:64]!r}")
    groups = await request.app[keys.STORE].spend_report(since=since, by=by)
    return web.json_response(
        {
            "since": iso(since),
            "by": by,
            "currency": "USD",
            "total_usd": round(sum(g["usd"] for g in groups), 6),
            "unknown": sum(g["unknown"] for g in groups),
            "attempts": sum(g["attempts"] for g in groups),
            "groups": groups,
        }
    )


async def run_deliveries(request: web.Request) -> web.Response:
    """The webhook deliveries the run received, each with what it did (its effect)."""
    run_id = (await _run_json(request))["id"]
    return web.json_response({"deliveries": await request.app[keys.STORE].deliveries(run_id)})


async def cancel_run(request: web.Request) -> web.Response:
    run_id = (await _run_json(request))["id"]
    await request.app[keys.ENGINE].cancel(run_id)  # InvalidTransitionError: 409
    return web.json_response(await _run_json(request))


async def retry_run(request: web.Request) -> web.Response:
    run_id = (await _run_json(request))["id"]
    body = await _json(request) if request.can_read_body else {}
    unknown = set(body) - {"from"}
    if unknown:
        raise SpecError(f"unknown fields {sorted(unknown)} (expected from)")
    from_stage = body.get("from")
    if "from" in body and not isinstance(from_stage, str):
        raise SpecError("from: must be a stage name")
    await request.app[keys.ENGINE].retry(run_id, from_stage)  # InvalidTransitionError: 409
    return web.json_response(await _run_json(request))


async def list_pipelines(request: web.Request) -> web.Response:
    out = []
    for name in await anyio.to_thread.run_sync(example_names):
        pipeline = await load_example(name)
        stages = {n: s.model for n, s in pipeline.stages.items()}
        inputs = {
            n: {"type": d.type, "required": d.required, "default": d.default,
                "description": d.description}
            for n, d in pipeline.inputs.items()
        }  # fmt: skip
        out.append(
            {"name": name, "description": pipeline.description, "stages": stages,
             "inputs": inputs}
        )  # fmt: skip
    return web.json_response({"pipelines": out})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: red once a loop has been failing (or silent) past LIVENESS_FAILURE_S."""
    loops = request.app[keys.LOOPS].status()
    body = {"ok": loops.live, "loops": loops.problems}
    return web.json_response(body, status=200 if loops.live else 503)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: serving, not draining, and every loop's last iteration went well."""
    loops = request.app[keys.LOOPS].status()
    ready = request.app[keys.HEALTH].ready and loops.ready
    return web.json_response(
        {"ready": ready, "loops": loops.problems}, status=200 if ready else 503
    )
