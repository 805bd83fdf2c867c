"""Log redaction: no secret, token, key or presigned signature reaches a log line."""

from __future__ import annotations

import asyncio
import contextvars
import copy
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from service import logs
from service.logs import (
    ACCESS,
    REDACTED,
    configure_logging,
    redact,
    scrub,
    timestamp,
    unconfigure_logging,
)


def _unconfigure() -> None:
    unconfigure_logging()


def test_secret_looking_keys_are_dropped() -> None:
    """Values under secret-like keys are replaced whatever they contain."""
    event = {"event": "x", "api_key": "k", "webhook_secret": "s",
             "Authorization": "Bearer abc", "token": "t", "count": 3}  # fmt: skip
    out = redact(None, "info", event)
    assert out["api_key"] == out["webhook_secret"] == out["Authorization"] == REDACTED
    assert out["token"] == REDACTED and out["count"] == 3


def test_credentials_inside_strings_are_scrubbed() -> None:
    """Presigned signatures, webhook tokens, bearer keys and whsec_ secrets are cut from text."""
    text = (
        "GET https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA/x&X-Amz-Signature=deadbeef "
        "POST /webhooks/wavespeed/AbCdEfGhIjKlMnOp123 Bearer sk-live-123 whsec_c2VjcmV0"
    )
    out = scrub(text)
    for leaked in ("deadbeef", "AKIA", "AbCdEfGhIjKlMnOp123", "sk-live-123", "c2VjcmV0"):
        assert leaked not in out
    assert "/webhooks/wavespeed/" in out and "X-Amz-Signature=" in out


def test_nested_values_are_scrubbed() -> None:
    """Extras such as request lines and header dicts are cleaned too."""
    out = redact(None, "info", {"event": "x", "request": {"line": "POST /webhooks/wavespeed/"
                 "AbCdEfGhIjKlMnOp123 HTTP/1.1", "headers": {"Authorization": "Bearer k"}},
                 "list": ["whsec_c2VjcmV0"]})  # fmt: skip
    assert "AbCdEfGhIjKlMnOp123" not in str(out) and "Bearer k" not in str(out)
    assert "c2VjcmV0" not in str(out)


def test_every_value_type_under_a_secret_key_is_dropped_and_others_kept() -> None:
    """Numbers, None and booleans under secret-like keys go too; plain values stay as they are."""
    event = {"event": "x", "token": None, "api_key": 42, "secret": True, "count": 3,
             "ok": False, "route": "/webhooks/wavespeed/{token}", "ratio": 0.5}  # fmt: skip
    out = redact(None, "info", event)
    assert out["token"] == out["api_key"] == out["secret"] == REDACTED
    assert (out["count"], out["ok"], out["ratio"]) == (3, False, 0.5)
    assert out["route"] == "/webhooks/wavespeed/{token}"


def test_scrub_matches_credentials_whatever_their_case() -> None:
    assert scrub("auth: BEARER sk-live-123") == f"auth: BEARER {REDACTED}"
    assert scrub("GET /k?x-amz-signature=deadbeef") == f"GET /k?x-amz-signature={REDACTED}"
    assert scrub("msg_b1234 a8c3b0f1e2d34c5b") == "msg_b1234 a8c3b0f1e2d34c5b"


def test_top_level_strings_take_the_same_scrub_as_nested_ones() -> None:
    """The inlined test for plain strings misses nothing scrub() would catch, in any case."""
    event = {"event": "x", "auth": "BeArEr sk-live-123", "url": "https://h/k?Signature=abc",
             "path": "/webhooks/wavespeed/AbCdEfGhIjKl", "key": "whsec_c2VjcmV0",
             "id": "msg_1"}  # fmt: skip
    out = redact(None, "info", dict(event))
    for key, value in event.items():
        assert out[key] == scrub(value)
    assert "sk-live-123" not in str(out) and "abc" not in str(out) and out["id"] == "msg_1"


def test_timestamp_is_utc_iso_with_microseconds() -> None:
    """The cached-second stamper writes what datetime would, for the current time."""
    before = datetime.now(UTC)
    stamp = timestamp(None, "info", {})["timestamp"]
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
    assert before <= datetime.fromisoformat(stamp) <= after


def test_json_lines_render_whatever_is_logged(capsys: pytest.CaptureFixture[str]) -> None:
    """orjson renders the line; what it cannot (a 70-bit integer) or does not know (any
    object) still gives one valid JSON line, never an error at the call site."""
    configure_logging(json=True, level="INFO")
    try:
        log = structlog.get_logger("wavechain.test")
        log.info("plain", count=3, ratio=0.5, nested={1: "a"}, token="t")
        log.info("odd", big=2**70, thing=object())
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        _unconfigure()
    assert [line["event"] for line in lines] == ["plain", "odd"]
    assert lines[0]["nested"] == {"1": "a"} and lines[0]["token"] == REDACTED
    assert lines[1]["big"] == 2**70 and lines[1]["thing"].startswith("<object object")
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "wavechain.test"


@pytest.mark.parametrize("as_json", [True, False])
def test_access_lines_take_the_same_timestamp_redaction_and_renderer(
    as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """The access line's short path still stamps, redacts and renders like any line: a
    token in a client-supplied request id and a webhook path are cut, in JSON and on
    the console alike."""
    configure_logging(json=as_json, level="INFO")
    try:
        assert ACCESS.write({
            "event": "http.request", "method": "POST", "route": "/webhooks/wavespeed/{token}",
            "status": 200,
            "request_id": "Bearer sk-live-123", "path": "/webhooks/wavespeed/AbCdEfGhIjKlMn",
            "duration_ms": 1.5, "api_key": "k-1",
        })  # fmt: skip
        err = capsys.readouterr().err
    finally:
        _unconfigure()
    assert err.count("\n") == 1
    for leaked in ("sk-live-123", "AbCdEfGhIjKlMn", "k-1"):
        assert leaked not in err
    assert "http.request" in err and "/webhooks/wavespeed/{token}" in err
    if as_json:
        line = json.loads(err)
        assert (line["level"], line["logger"], line["status"]) == ("info", "wavechain.access", 200)
        assert line["request_id"] == f"Bearer {REDACTED}" and line["api_key"] == REDACTED
        assert datetime.fromisoformat(line["timestamp"]) <= datetime.now(UTC)


GET = {"event": "http.request", "method": "GET", "status": 200}


async def test_access_lines_on_a_loop_are_written_at_the_end_of_its_turn_in_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On an event loop, access lines wait for the end of the loop's turn and then go
    out together; any other line written meanwhile writes the held ones first, so the
    order on stderr is the order in which lines were logged."""
    configure_logging(json=True, level="INFO")
    try:
        for i in range(3):
            assert ACCESS.write({**GET, "n": i})
        held = capsys.readouterr().err
        logging.getLogger("aiohttp.test").warning("stdlib")  # a library's record
        ACCESS.write({**GET, "n": 3})
        structlog.get_logger("wavechain.test").info("between")  # one of ours
        ACCESS.write({**GET, "n": 4})
        await asyncio.sleep(0)  # the end of this turn: the last access line goes out
        await asyncio.sleep(0)
        err = capsys.readouterr().err
    finally:
        _unconfigure()
    assert held == ""
    lines = [json.loads(line) for line in err.splitlines()]
    order = [line.get("n", line["event"]) for line in lines]
    assert order == [0, 1, 2, "stdlib", 3, "between", 4]


@pytest.mark.parametrize(
    "event",
    [
        {"route": "/webhooks/wavespeed/{token}", "status": 200, "task_id": "t1"},
        {"route": "/webhooks/wavespeed/{token}", "path": "/webhooks/wavespeed/AbCdEfGhIjKlMn"},
        {"url": "https://b.s3/k?X-Amz-Signature=deadbeef", "n": 1},
        {"detail": {"headers": {"Authorization": "Bearer k"}, "list": ["whsec_c2VjcmV0"]}},
        {"request_id": "BeArEr\tsk-live-123"},
        {"api_key": 42, "plain": "msg_b1234"},
        {"headers": {"api_key": "abc123", "accept": "*/*"}, "n": 2},
        {"items": [{"password": "pw-9z"}], "big": 2**70},
    ],
)
def test_json_lines_are_redacted_as_if_every_value_were_checked(event: dict[str, Any]) -> None:
    """The JSON renderer checks the rendered line as a whole and redacts value by value
    only when the line may hold a secret: the result is the same line as redacting every
    value first, secret or not."""
    expected = json.loads(json.dumps(redact(None, "info", copy.deepcopy(event))))
    line = logs.render_json(None, "info", copy.deepcopy(event))
    assert json.loads(line) == expected
    for leaked in ("AbCdEfGhIjKlMn", "deadbeef", "Bearer k", "c2VjcmV0", "sk-live-123", "abc123",
                   "pw-9z"):  # fmt: skip
        assert leaked not in line


def test_lines_logged_while_a_request_is_handled_carry_its_id_and_route(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The middleware sets the request's id and route once; every line logged in that
    request's context carries them, and lines logged outside it do not."""
    configure_logging(json=True, level="INFO")
    try:
        log = structlog.get_logger("wavechain.test")

        def in_request() -> None:
            logs.request_context.set(("req-1", "/v1/runs"))
            log.info("inside", request_id_given=False)

        contextvars.copy_context().run(in_request)
        log.info("outside")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        _unconfigure()
    assert (lines[0]["request_id"], lines[0]["route"]) == ("req-1", "/v1/runs")
    assert "request_id" not in lines[1] and "route" not in lines[1]


class _Url:
    """A value whose text only appears when rendered (as yarl.URL or an exception)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"URL({self.text!r})"


@pytest.mark.parametrize("as_json", [True, False])
@pytest.mark.parametrize(
    ("value", "secret"),
    [
        (_Url("https://x/webhooks/wavespeed/AbCdEfGhIjKlMnOp"), "AbCdEfGhIjKlMnOp"),
        (b"POST /webhooks/wavespeed/QrStUvWxYz012345", "QrStUvWxYz012345"),
        (ValueError("https://b.s3/k?X-Amz-Signature=deadbeefcafe"), "deadbeefcafe"),
        (
            "https://api/x?webhook=https%3A%2F%2Fh%2Fwebhooks%2Fwavespeed%2FTokEn9876543210",
            "TokEn9876543210",
        ),
        ("https://api/x?model=m&key=sk-abc123def", "sk-abc123def"),
        ("https://cdn/x.png?sig=0a1b2c3d4e&exp=1", "0a1b2c3d4e"),
        ("postgresql://wave:hunter2pass@db:5432/wc", "hunter2pass"),
        (_Url("postgresql://wave:hunter2pass@db/wc"), "hunter2pass"),
        ("https%3A%2F%2Fuser%3Ahunter2pass%40h%2Fx", "hunter2pass"),
    ],
)
def test_secrets_rendered_late_or_encoded_are_redacted(
    value: Any, secret: str, as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A credential in a value rendered with repr (a URL object, bytes, an exception), in a
    percent-encoded webhook URL, in key=/sig= parameters, or as user:password@ in a URL
    never reaches the line, in JSON or on the console."""
    configure_logging(json=as_json, level="INFO")
    try:
        structlog.get_logger("wavechain.test").info("x", value=value)
        err = capsys.readouterr().err
    finally:
        _unconfigure()
    assert secret not in err
    assert REDACTED in err
    if as_json:
        json.loads(err)  # still one valid JSON line


def test_console_key_fields_are_not_mistaken_for_query_parameters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A field named key (an S3 key) is printed on the console: only URL query parameters
    called key= are credentials."""
    configure_logging(json=False, level="INFO")
    try:
        structlog.get_logger("wavechain.test").info("output.mirrored", key="runs/r/a/0.png")
        err = capsys.readouterr().err
    finally:
        _unconfigure()
    assert "runs/r/a/0.png" in err
