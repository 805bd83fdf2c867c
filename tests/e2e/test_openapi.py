"""The OpenAPI contract (service/openapi.yaml, served at /openapi.json) is valid, complete,
and true: every route is in it and every route in it exists; the dashboard and the CLI
call nothing else; and schemathesis, a property-based client, finds no 5xx and no answer
that breaks it on a live server, on SQLite and on PostgreSQL, with real runs in it."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.openapi import document
from service.routes import setup_routes
from tests.support.aws import AwsSandbox, sandbox
from tests.support.postgres import Databases
from tests.support.procs import emulator_and_serve, run_ended

SECRET = "whsec_b3BlbmFwaS10ZXN0LXNlY3JldA=="
TOKEN = "openapi-token-for-the-test"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
METHODS = {"get", "post", "put", "patch", "delete"}
EXAMPLES = 30
#: Routes outside the contract on purpose: the provider's callback (its contract is the
#: provider's), the dashboard's page and files, Prometheus' text, and the contract itself.
NOT_API = {"/webhooks/wavespeed/{token}", "/", "/static", "/metrics", "/openapi.json"}


def _documented() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document()["paths"].items()
        for method in item
        if method in METHODS
    }


@pytest.mark.unit
def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on the first problem, naming it


@pytest.mark.unit
def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    app = web.Application()
    setup_routes(app)
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and route.resource.canonical not in NOT_API
    }
    assert served, "no routes found"
    assert served - _documented() == set(), "served but not documented"
    assert _documented() - served == set(), "documented but not served"


def _matches(path: str) -> bool:
    """Whether a path the code builds (its variable parts as ``{}``) is a documented one."""
    for template in document()["paths"]:
        pattern = re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            return True
    return False


@pytest.mark.unit
def test_the_dashboard_and_the_cli_call_only_documented_routes() -> None:
    """Every API path in the page's script and the CLI's client, with its variable parts
    (template expressions, format fields, string concatenations) as placeholders."""
    sources = {
        "app.js": (resources.files("service") / "static" / "app.js").read_text("utf-8"),
        "client.py": (resources.files("service") / "client.py").read_text("utf-8"),
    }
    found: dict[str, set[str]] = {}
    for name, text in sources.items():
        text = re.sub(
            r"\$\{[^}]*\}|\{[\w.\[\]'\"]+\}|[\"'`]\s*\+\s*[\w.()\[\]]+\s*\+\s*[\"'`]", "X", text
        )
        found[name] = {
            p.split("?")[0] for p in re.findall(r"(/(?:v1/|healthz|readyz)[\w/X-]*)", text)
        }
        assert found[name], f"no API paths found in {name}"
    assert found["client.py"] >= {"/v1/runs", "/v1/runs/X", "/v1/runs/X/cancel"}
    assert found["app.js"] >= {"/v1/runs", "/v1/runs/stream", "/v1/pipelines"}
    undocumented = {
        (name, path)
        for name, paths in found.items()
        for path in paths
        if not _matches(path.rstrip("/") if path != "/" else path)
    }
    assert undocumented == set()


# The live server ------------------------------------------------------------------------


def _wait(api: str, run_id: str) -> dict[str, Any]:
    return run_ended(api, run_id, headers=AUTH)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    moto_endpoint: str,
    pg_databases: Databases,
) -> Iterator[dict[str, Any]]:
    """`serve` (with an API token, S3 and SNS) and the emulator; two finished runs, one
    cancelled, one failed: the answers schemathesis checks hold real data."""
    tmp = tmp_path_factory.mktemp(f"openapi-{request.param}")
    aws: AwsSandbox = sandbox(moto_endpoint)
    database = (
        asyncio.run(pg_databases.create())
        if request.param == "postgres"
        else f"sqlite:///{tmp}/state.db"
    )
    env = {
        "DATABASE_URL": database, "S3_BUCKET": aws.bucket, "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "SNS_TOPIC_ARN": aws.topic_arn, "WAVECHAIN_API_TOKEN": TOKEN,
    }  # fmt: skip
    with emulator_and_serve(tmp, SECRET, env, latency=0.2) as api:
        ids = []
        for pipeline in ("image_video_3d", "storyboard"):
            r = requests.post(
                f"{api}/v1/runs", json={"pipeline": pipeline}, headers=AUTH, timeout=10
            )
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        finished = [_wait(api, run_id) for run_id in ids]
        assert [r["status"] for r in finished] == ["succeeded", "succeeded"], finished
        slow: dict[str, Any] = {"stages": {"v": {"model": "wavespeed-ai/hunyuan-video/t2v",
                                 "input": {"prompt": "x"}, "timeout": 600}}}  # fmt: skip
        r = requests.post(f"{api}/v1/runs", json={"pipeline": slow}, headers=AUTH, timeout=10)
        cancelled = r.json()["id"]
        r = requests.post(f"{api}/v1/runs/{cancelled}/cancel", headers=AUTH, timeout=10)
        assert r.status_code in (200, 409), r.text  # 409: it ended first
        yield {"api": api, "runs": [*ids, cancelled], "tmp": tmp}
    log = (tmp / "serve.log").read_text()
    assert TOKEN not in log
    errors = [line for line in log.splitlines() if '"level": "error"' in line]
    assert errors == [], errors[:3]


@pytest.fixture(scope="module")
def api_schema(live: dict[str, Any]) -> Any:
    served = requests.get(f"{live['api']}/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.json() == json.loads(json.dumps(document()))
    return schemathesis.openapi.from_url(f"{live['api']}/openapi.json")


POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
#: Every operation but the two server-sent event streams (they never end; checked below),
#: with valid requests, and with invalid ones where it takes any input to break.
CASES = sorted(
    (op["operationId"], mode)
    for path, item in document()["paths"].items()
    for method, op in item.items()
    if method in METHODS and not path.endswith("/stream")
    for mode in (
        (POSITIVE, NEGATIVE)
        if op.get("parameters") or item.get("parameters") or op.get("requestBody")
        else (POSITIVE,)
    )
)
#: Requests the document allows that are still refused, on purpose: a run's spec is checked
#: beyond what JSON Schema can say (known models, each model's parameters, references
#: between stages), a page's cursor is opaque (only one the API returned is valid), and
#: a spend report's `since` is a duration or time, which a pattern cannot fully say.
SEMANTIC_400 = {"createRun", "estimateRun", "listRuns", "getSpend"}


@pytest.mark.e2e
@pytest.mark.parametrize(("operation_id", "mode"), CASES, ids=lambda v: getattr(v, "value", v))
def test_the_live_api_keeps_its_contract(
    api_schema: Any, operation_id: str, mode: schemathesis.GenerationMode
) -> None:
    """Generated requests to one operation, valid ones (positive) and ones that break the
    document (negative): no 5xx, every status documented, every body and content type as
    the document says, invalid requests refused with a 4xx."""
    operation = api_schema.find_operation_by_id(operation_id)
    excluded = [positive_data_acceptance] if operation_id in SEMANTIC_400 else []
    calls = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        response = case.call_and_validate(
            headers={**(case.headers or {}), **AUTH}, excluded_checks=excluded
        )
        calls.append(response.status_code)

    check()
    assert calls, "no request was made"
    print(f"{operation_id} {mode.value}: {len(calls)} requests, statuses {sorted(set(calls))}")


@pytest.mark.e2e
def test_real_runs_answer_as_documented(live: dict[str, Any], api_schema: Any) -> None:
    """The operations on runs that exist (a generated id finds none), each answer checked
    against the document: a run with previews, its events and deliveries, pages by status
    and pipeline, a retry of a succeeded run (409) and the bundled pipelines."""
    checked = 0
    for run_id in live["runs"]:
        for path, method, query in [
            ("/v1/runs/{id}", "GET", {"previews": "true"}),
            ("/v1/runs/{id}/events", "GET", {}),
            ("/v1/runs/{id}/deliveries", "GET", {}),
            ("/v1/runs/{id}/cancel", "POST", {}),
        ]:
            operation = api_schema[path][method]
            case = operation.Case(path_parameters={"id": run_id}, query=query)
            response = case.call_and_validate(headers=AUTH)
            assert response.status_code in (200, 409), response.text
            checked += 1
    run = requests.get(
        f"{live['api']}/v1/runs/{live['runs'][0]}", params={"previews": "true"}, headers=AUTH,
        timeout=10,
    ).json()  # fmt: skip
    kinds = {p["kind"] for stage in run["stages"] for p in stage["previews"]}
    assert kinds == {"image", "video", "mesh"}
    assert all(s["mirrored_outputs"] for s in run["stages"])
    deliveries = requests.get(
        f"{live['api']}/v1/runs/{live['runs'][0]}/deliveries", headers=AUTH, timeout=10
    ).json()["deliveries"]
    assert {d["effect"] for d in deliveries} >= {"applied"}
    queries: list[dict[str, Any]] = [
        {"status": "succeeded", "limit": 1},
        {"pipeline": "storyboard"},
        {},
    ]
    for query in queries:
        case = api_schema["/v1/runs"]["GET"].Case(query=query)
        page = case.call_and_validate(headers=AUTH).json()
        assert page["runs"], query
    case = api_schema["/v1/runs/{id}/retry"]["POST"].Case(
        path_parameters={"id": live["runs"][0]}, body={}, media_type="application/json"
    )
    assert case.call_and_validate(headers=AUTH).status_code == 409
    assert checked == 12
    # Text no database column can hold (PostgreSQL refuses NUL): a 400, never a 500.
    nul = {"pipeline": "storyboard", "inputs": {"scene": "a\x00b"}}
    case = api_schema["/v1/runs"]["POST"].Case(body=nul, media_type="application/json")
    response = case.call_and_validate(headers=AUTH)
    assert response.status_code == 400 and "NUL" in response.json()["error"]


@pytest.mark.e2e
def test_the_streams_send_what_the_document_says(live: dict[str, Any]) -> None:
    """The two server-sent event routes (left out of the generated requests: they never
    end): the first event of each, its data a run as documented."""
    run_id = live["runs"][0]
    with requests.get(
        f"{live['api']}/v1/runs/{run_id}/stream", headers=AUTH, stream=True, timeout=10
    ) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = _first_event(r)
    assert lines[0] == "event: run"
    run = json.loads(lines[1].removeprefix("data: "))
    assert run["id"] == run_id and all("previews" in s for s in run["stages"])
    with requests.get(f"{live['api']}/v1/runs/stream", headers=AUTH, stream=True, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert _first_event(r) == ["event: changed", "data: {}"]
    unauthorized = requests.get(f"{live['api']}/v1/runs/stream", timeout=10)
    assert unauthorized.status_code == 401


def _first_event(response: requests.Response) -> list[str]:
    lines: list[str] = []
    for raw in response.iter_lines():
        line = raw.decode()
        if not line and lines:
            return lines
        if line and not line.startswith(":"):
            lines.append(line)
    raise AssertionError(f"the stream ended after {lines}")


@pytest.mark.e2e
def test_an_idempotency_key_makes_one_run(live: dict[str, Any], api_schema: Any) -> None:
    """Eight requests with one Idempotency-Key, at once: one run, which every answer names
    (201 for the first, 200 replayed for the others); the key with another request is a
    422; a key the document forbids is a 400. Over real processes, on both stores."""
    from concurrent.futures import ThreadPoolExecutor

    api, key = live["api"], f"test-{time.monotonic_ns()}"
    body: dict[str, Any] = {"pipeline": "image_video_3d", "inputs": {"prompt": f"once {key}"}}

    def post(_: int) -> requests.Response:
        headers = {**AUTH, "Idempotency-Key": key}
        return requests.post(f"{api}/v1/runs", json=body, headers=headers, timeout=30)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    assert sorted(a.status_code for a in answers) == [200] * 7 + [201], [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert all(
        a.headers.get("Idempotent-Replayed") == "true" for a in answers if a.status_code == 200
    )
    page = requests.get(f"{api}/v1/runs", params={"limit": 200}, headers=AUTH, timeout=10).json()
    assert [r["inputs"].get("prompt") for r in page["runs"]].count(f"once {key}") == 1

    other = {**body, "inputs": {"prompt": "something else"}}
    case = api_schema["/v1/runs"]["POST"].Case(
        body=other, headers={"Idempotency-Key": key}, media_type="application/json"
    )
    reused = case.call_and_validate(headers=AUTH)
    assert reused.status_code == 422 and "different request" in reused.json()["error"]
    bad = requests.post(f"{api}/v1/runs", json=body, headers={**AUTH, "Idempotency-Key": "a b"},
                        timeout=10)  # fmt: skip
    assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["error"]


@pytest.mark.e2e
def test_an_estimate_prices_a_run_without_starting_it(
    live: dict[str, Any], api_schema: Any
) -> None:
    """POST /v1/runs/estimate takes the body of POST /v1/runs: the shipped table knows the
    video's price only, so the other stages are named unknown, not counted; no run starts."""
    api = live["api"]
    before = requests.get(f"{api}/v1/runs", params={"limit": 200}, headers=AUTH, timeout=10)
    case = api_schema["/v1/runs/estimate"]["POST"].Case(
        body={"pipeline": "image_video_3d", "inputs": {"seed": 7}}, media_type="application/json"
    )
    answer = case.call_and_validate(headers=AUTH)
    assert answer.status_code == 200, answer.text
    e = answer.json()
    assert e["stages"]["video"]["usd"] == 0.4 and e["stages"]["video"]["attempts_at_most"] == 2
    assert e["expected_usd"] == 0.4 and e["worst_case_usd"] == 0.8
    assert sorted(e["unknown"]) == ["image", "mesh"] and e["complete"] is False
    bad = requests.post(f"{api}/v1/runs/estimate", json={"pipeline": "image_video_3d",
                        "inputs": {"seed": "x"}}, headers=AUTH, timeout=10)  # fmt: skip
    assert bad.status_code == 400 and "inputs.seed" in bad.json()["error"]
    after = requests.get(f"{api}/v1/runs", params={"limit": 200}, headers=AUTH, timeout=10)
    assert len(after.json()["runs"]) == len(before.json()["runs"])
