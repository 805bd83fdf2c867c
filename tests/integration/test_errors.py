"""Every error wavechain raises on purpose is one of its own and reaches a client as the
status it names; anything else is a 500 with the request id to quote."""

from __future__ import annotations

import inspect

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from pipelines import errors, mirror, providers, state, store
from service.middlewares import context_and_errors

CASES = [
    (errors.SpecError("stage 'a': input.size: bad"), 400),
    (errors.PipelineTooLargeError("pipeline: 101 stages, over the limit of 100"), 413),
    (errors.ProviderNotConfiguredError("stage 'k' needs AIMLAPI_KEY"), 422),
    (errors.InvalidTransitionError("run r already succeeded"), 409),
    (errors.ConcurrentUpdateError("run r"), 503),
    (errors.SubmitOutcomeUnknownError("no answer"), 503),
    (errors.ProviderError("WaveSpeed: HTTP 401", retryable=False), 502),
    (RuntimeError("a bug"), 500),
]


@pytest.mark.parametrize(("error", "status"), CASES, ids=[type(e).__name__ for e, _ in CASES])
async def test_errors_map_to_their_status(
    aiohttp_client: AiohttpClient, error: Exception, status: int
) -> None:
    """The middleware answers each error with its status and message (a 503 with
    Retry-After); an unexpected one hides its text behind the request id."""

    async def handler(request: web.Request) -> web.Response:
        raise error

    app = web.Application(middlewares=[context_and_errors])
    app.router.add_get("/x", handler)
    client = await aiohttp_client(app)
    resp = await client.get("/x")
    body = await resp.json()
    assert resp.status == status
    if status == 500:
        assert body == {"error": "internal error", "request_id": resp.headers["X-Request-Id"]}
    else:
        assert body == {"error": str(error)}
    assert (resp.headers.get("Retry-After") == "1") == (status == 503)


def test_every_error_class_is_a_wavechain_error() -> None:
    """errors.py says every intended error is a WavechainError: each class defined in the
    domain's modules that ends in Error is one."""
    found = [
        cls
        for module in (errors, mirror, providers, state, store)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__name__.endswith("Error") and cls.__module__.startswith("pipelines")
    ]
    assert {c.__name__ for c in found} >= {
        "ConcurrentUpdateError", "SubmitOutcomeUnknownError", "InvalidTransitionError",
    }  # fmt: skip
    assert [c.__name__ for c in found if not issubclass(c, errors.WavechainError)] == []
