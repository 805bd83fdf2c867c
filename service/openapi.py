"""`GET /openapi.json`: the REST API's contract (service/openapi.yaml), read once.

The document is written by hand and kept true by tests (tests/e2e/test_openapi.py): every
route is in it and every route in it exists, and schemathesis checks a live server's
answers against it."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import yaml
from aiohttp import web


@functools.cache
def document() -> dict[str, Any]:
    text = (resources.files("service") / "openapi.yaml").read_text("utf-8")
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


@functools.cache
def _body() -> bytes:
    return json.dumps(document(), separators=(",", ":")).encode()


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=_body(), content_type="application/json")
