"""Logging, configured once by the entry point: structlog, JSON or console, redacted."""

from __future__ import annotations

import asyncio
import atexit
import functools
import json as _json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

import orjson
import structlog

_SECRET_KEYS = re.compile(r"secret|token|api_?key|authorization|signature|password", re.I)
# Presigned URLs and webhook URLs carry credentials in the query string or path.
_URL_SECRETS = re.compile(
    r"((?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|token)=)[^&\s\"']+",
    re.I,
)
_WEBHOOK_TOKEN = re.compile(r"(/webhooks/[a-z0-9_-]+/)[A-Za-z0-9_\-]{8,}")
_BEARER = re.compile(r"(Bearer\s+)\S+", re.I)
_WHSEC = re.compile(r"whsec_[A-Za-z0-9+/=_-]+")
REDACTED = "[redacted]"


def _may_hold_secret(text: str) -> bool:
    # Every pattern in _scrub needs one of these; most text (ids, statuses, numbers as
    # text) has none, and plain substring tests are far cheaper than any regex (an
    # alternation of the four, case-insensitive, costs five times as much). "/webhooks/"
    # alone is not enough: every webhook route template has it, and has no token. The
    # pattern starts with it, so its search starts at the first one, not from the top.
    return (
        "=" in text
        or "whsec_" in text
        or "bearer" in text.lower()
        or ((at := text.find("/webhooks/")) >= 0 and _WEBHOOK_TOKEN.search(text, at) is not None)
    )


def scrub(text: str) -> str:
    return _scrub(text) if _may_hold_secret(text) else text


@functools.lru_cache(maxsize=1024)  # route templates and the like recur on every line
def _scrub(text: str) -> str:
    text = _URL_SECRETS.sub(rf"\1{REDACTED}", text)
    text = _WEBHOOK_TOKEN.sub(rf"\1{REDACTED}", text)
    text = _BEARER.sub(rf"\1{REDACTED}", text)
    return _WHSEC.sub(REDACTED, text)


@functools.lru_cache(maxsize=4096)
def _secret_key(key: str) -> bool:
    return _SECRET_KEYS.search(key) is not None


@functools.lru_cache(maxsize=1024)  # a line's keys recur: every access line has the same
def _secret_keys(keys: tuple[str, ...]) -> frozenset[str]:
    return frozenset(key for key in keys if _secret_key(key))


def _clean(key: str, value: Any) -> Any:
    if _secret_key(key):
        return REDACTED
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _clean(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(key, v) for v in value]
    return value


_PLAIN = frozenset({int, float, bool, type(None)})  # numbers, None, booleans stay as they are


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop values under secret-looking keys; scrub credentials out of every string, nested
    values included."""
    # The keys are checked once per distinct set of keys. Replacing values while
    # iterating is safe, as the keys do not change.
    secret = _secret_keys(tuple(event_dict))
    for key, value in event_dict.items():
        kind = type(value)
        if secret and key in secret:
            event_dict[key] = REDACTED
        elif kind is str:
            if _may_hold_secret(value):
                event_dict[key] = _scrub(value)
        elif kind not in _PLAIN and isinstance(value, str | dict | list | tuple):
            event_dict[key] = _clean(key, value)
    return event_dict


_second: tuple[int, str] = (0, "")  # the last second formatted, and its text


def timestamp(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """UTC ISO 8601 with microseconds, as structlog's TimeStamper(fmt="iso", utc=True)
    writes it, at a fifth of the cost: the date and time of day are formatted once a
    second, not once a line, and the microseconds without a format specification."""
    global _second
    second, micros = divmod(time.time_ns() // 1000, 1_000_000)
    cached = _second
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)))
    event_dict["timestamp"] = cached[1] + str(1_000_000 + micros)[1:] + "Z"
    return event_dict


def _fallback(obj: Any) -> Any:
    """What JSON does not know: the object's own ``__structlog__`` text, else its repr
    (structlog's rule)."""
    to_log = getattr(obj, "__structlog__", None)
    return to_log() if callable(to_log) else repr(obj)


def _dumps(event_dict: Any) -> str:
    """JSON for one line: orjson (several times faster than the standard library, and the
    serializer structlog's performance guide suggests). What orjson refuses outright (an
    integer wider than 64 bits) still gets a line, from the standard library."""
    try:
        return orjson.dumps(event_dict, default=_fallback, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return _json.dumps(event_dict, default=_fallback, separators=(",", ":"))


def _line_may_hold_secret(line: str) -> bool:
    # The rendered line holds every key and value verbatim (JSON escapes none of the
    # characters _may_hold_secret needs), so if it passes, no value would have been
    # changed by redact(). A nested object or array (rendered without spaces: '":{' or
    # '":[') may hold a key that looks secret, which only redact() checks. Brackets are
    # looked for one character at a time first (memchr speed; a search for '":{' walks
    # every '"' of the line): an array is rare, and a brace after the line's own first
    # one is mostly a route template's '{token}'.
    if "[" in line and '":[' in line:
        return True
    brace = line.find("{", 1)
    while brace >= 0:
        if line[brace - 2 : brace] == '":':
            return True
        brace = line.find("{", brace + 1)
    return _may_hold_secret(line)


def render_json(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> str:
    """redact() and then JSON, the last processor of every JSON line. Most lines have
    nothing to redact: they are rendered once and the line is checked as a whole (one
    set of substring tests instead of one per value); a line that may hold a secret is
    redacted value by value and rendered again."""
    if not _secret_keys(tuple(event_dict)):
        line = _dumps(event_dict)
        if not _line_may_hold_secret(line):
            return line
    return _dumps(redact(_, __, event_dict))


#: The current request's (request id, route template), set by the app's middleware and
#: added to every line logged while the request is handled. One variable set per request
#: instead of structlog's clear_contextvars() and bind_contextvars() (a twentieth of the
#: cost); nothing needs clearing, as aiohttp handles each request in a task of its own,
#: which starts from a copy of the connection's context.
request_context: ContextVar[tuple[str, str] | None] = ContextVar("wavechain_request", default=None)


def merge_request_context(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    current = request_context.get()
    if current is not None:
        event_dict.setdefault("request_id", current[0])
        event_dict.setdefault("route", current[1])
    return event_dict


_LOCK = threading.RLock()
# Access lines written during the current turn of the event loop, not yet on stderr.
_held: list[str] = []


def _write(line: str) -> None:
    with _LOCK:
        # After any held access lines, in one write: lines keep the order of writing.
        _held.append(line)
        _flush_held_locked()


def _flush_held_locked() -> None:
    if _held:
        lines = "\n".join(_held) + "\n"
        _held.clear()
        sys.stderr.write(lines)
        sys.stderr.flush()


def flush_held() -> None:
    """Write out the access lines held for the end of this turn of the event loop."""
    with _LOCK:
        _flush_held_locked()


def _write_this_turn(line: str) -> None:
    """Hold an access line until the end of the current turn of the event loop, then
    write all the lines held with one system call: under load a turn finishes dozens of
    requests, and a write per line was a twentieth of the event loop's time. Any other
    line written meanwhile (from any thread) writes the held ones first, so the order of
    lines is kept; at exit, whatever is still held is written."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not on an event loop: nothing would flush, so write now
        _write(line)
        return
    with _LOCK:
        first = not _held
        _held.append(line)
    if first:
        loop.call_soon(flush_held)


atexit.register(flush_held)


#: Writes one access line from its fields, its ``event`` (``http.request``) first; set by
#: configure_logging. The dict is the line's own: the writer adds to it in place.
#: The access line is the hottest log call (one per request), so it skips structlog's
#: bound-logger machinery and the processors that have nothing to do for it: context
#: variables (the line carries its request id and route itself), level and logger name
#: (fixed), exceptions (none). Timestamp, redaction and renderer are the same as every
#: other line's; the write is held to the end of the event loop's turn (_write_this_turn).
#: Measured under the receiver benchmark's load: about 45 µs less event-loop CPU per
#: request than going through a bound logger.
access_writer: Callable[[dict[str, Any]], None] | None = None


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stdlib records' handler: writes the held access lines first, like ``_write``."""

    def emit(self, record: logging.LogRecord) -> None:
        with _LOCK:
            _flush_held_locked()
            super().emit(record)


class _StderrLogger:
    """structlog's output for our own events: one finished line to the current
    ``sys.stderr``, under the same lock as the stdlib handler, so lines from threads
    (boto's, the SQLite writer's) never interleave."""

    __slots__ = ("name",)

    def __init__(self, name: str = "wavechain") -> None:
        self.name = name  # read by add_logger_name

    def msg(self, message: str) -> None:
        _write(message)

    debug = info = warning = warn = error = err = critical = fatal = exception = log = msg


def configure_logging(*, json: bool | None = None, level: str = "INFO") -> None:
    """Our events go straight from structlog's processors to stderr (no stdlib record per
    line); other libraries' stdlib records (aiohttp, botocore) get the same processors
    through a ProcessorFormatter. Both write the same JSON (or console) lines."""
    if json is None:
        json = not sys.stderr.isatty()
    levels = logging.getLevelNamesMapping()
    if level.upper() not in levels:
        raise ValueError(f"unknown log level {level!r}")
    threshold = levels[level.upper()]
    # The last processors of every line: redact, render (in one for JSON: render_json).
    final: list[Any] = [render_json] if json else [redact, structlog.dev.ConsoleRenderer()]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        merge_request_context,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        timestamp,
        structlog.processors.format_exc_info,
    ]

    def write_access(fields: dict[str, Any]) -> None:
        # Completed in place: the caller's dict is this line's, not copied into another.
        fields["level"] = "info"
        fields["logger"] = "wavechain.access"
        line: Any = timestamp(None, "info", fields)
        for processor in final:
            line = processor(None, "info", line)
        _write_this_turn(line)

    global access_writer
    access_writer = write_access
    structlog.configure(
        processors=[*shared, *final],
        # Calls below the level return at once, before any processor runs.
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=True,
    )
    handler = _Handler(sys.stderr)
    handler.lock = _LOCK
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # Extras (aiohttp's request line, headers) first, so redaction sees them too.
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        )
    )
    # Our renderer never prints the caller's file and line, thread or process: don't have
    # every record look them up (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(threshold)
    # botocore at DEBUG prints request signatures; keep it quieter than ours.
    logging.getLogger("botocore").setLevel(max(logging.INFO, root.level))
