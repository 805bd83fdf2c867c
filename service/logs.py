"""Logging, configured once by the entry point: structlog, JSON or console, redacted.

Every line is redacted twice over: values under secret-looking keys are dropped and
credentials are cut out of strings before rendering, and the rendered line is scrubbed
again, so a value rendered late (a URL object, bytes, an exception's repr) cannot carry
a secret out. The access line (one per request) takes a short path with the same
timestamp, redaction and renderer; docs/benchmarks.md has what each shortcut saves.
"""

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

REDACTED = "[redacted]"
_SECRET_KEYS = re.compile(r"secret|token|api_?key|authorization|signature|password", re.I)
# Query parameters that carry credentials: presigned URLs, webhook tokens, API keys. Also
# percent-encoded (a webhook URL inside a submit URL's query). The value stops before a
# backslash so that scrubbing a rendered JSON line never eats an escape.
_QUERY_SECRETS = re.compile(
    r"((?:[?&]|%3F|%26)(?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|sig"
    r"|key|api_?key|access_token|token|secret|password)(?:=|%3D))(?:(?!%26)[^&\s\"'\\])+",
    re.I,
)
# A stage attempt's token is the last part of its webhook path, plain or percent-encoded.
_WEBHOOK_TOKEN = re.compile(
    r"((?:/|%2F)webhooks(?:/|%2F)[a-z0-9_-]+(?:/|%2F))[A-Za-z0-9_\-]{8,}", re.I
)
# user:password@ in a URL, plain or percent-encoded.
_USERINFO = re.compile(r"((?:://|%3A%2F%2F))[^/\s@\"'\\]+(?::|%3A)[^/\s@\"'\\]+(?:@|%40)", re.I)
_BEARER = re.compile(r"(Bearer\s+)[^\s\"'\\]+", re.I)
_WHSEC = re.compile(r"whsec_[A-Za-z0-9+/=_-]+")


def _may_hold_secret(text: str) -> bool:
    # Every pattern in _scrub needs one of these; most text (ids, statuses, numbers as
    # text) has none, and substring tests are far cheaper than any regex. "webhooks"
    # alone is not enough (every webhook route template has it, with no token), so the
    # token pattern is searched from there.
    return (
        "=" in text
        or "%3" in text
        or "@" in text
        or "whsec_" in text
        or "bearer" in text.lower()
        or (
            (at := text.find("ebhooks")) >= 0
            and _WEBHOOK_TOKEN.search(text, max(0, at - 4)) is not None
        )
    )


def scrub(text: str) -> str:
    """``text`` with every credential it holds replaced by ``[redacted]``."""
    return _scrub(text) if _may_hold_secret(text) else text


@functools.lru_cache(maxsize=1024)  # route templates and the like recur on every line
def _scrub(text: str) -> str:
    text = _QUERY_SECRETS.sub(rf"\1{REDACTED}", text)
    text = _WEBHOOK_TOKEN.sub(rf"\1{REDACTED}", text)
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
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


_PLAIN = frozenset({int, float, bool, type(None)})


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop values under secret-looking keys; scrub credentials out of every string, nested
    values included."""
    secret = _secret_keys(tuple(event_dict))
    for key, value in event_dict.items():  # values only are replaced: safe while iterating
        kind = type(value)
        if secret and key in secret:
            event_dict[key] = REDACTED
        elif kind is str:
            if _may_hold_secret(value):
                event_dict[key] = _scrub(value)
        elif kind not in _PLAIN and isinstance(value, str | dict | list | tuple):
            event_dict[key] = _clean(key, value)
    return event_dict


def scrub_line(_: Any, __: str, line: str) -> str:
    """The last processor of a console line: what was rendered late is scrubbed too."""
    return scrub(line)


class _Timestamps:
    """UTC ISO 8601 with microseconds, as structlog's TimeStamper(fmt="iso", utc=True)
    writes it, with the date and time of day formatted once a second, not once a line."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(
        self, _: Any, __: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        second, micros = divmod(time.time_ns() // 1000, 1_000_000)
        if second != self._second:  # two threads may both format it: same text
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self._second = second
        event_dict["timestamp"] = self._text + str(1_000_000 + micros)[1:] + "Z"
        return event_dict


timestamp = _Timestamps()


def _fallback(obj: Any) -> Any:
    """What JSON does not know: the object's ``__structlog__`` text, else its repr."""
    to_log = getattr(obj, "__structlog__", None)
    return to_log() if callable(to_log) else repr(obj)


def _dumps(event_dict: Any) -> str:
    """orjson, several times faster than the standard library; what orjson refuses (an
    integer wider than 64 bits) still gets a line, from the standard library."""
    try:
        return orjson.dumps(event_dict, default=_fallback, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return _json.dumps(event_dict, default=_fallback, separators=(",", ":"))


def _line_may_hold_secret(line: str) -> bool:
    # A rendered JSON line holds every key and value verbatim, so if it passes these
    # tests nothing in it needs redacting, except a nested object or array (rendered as
    # '":{' or '":['), which may hold a secret-looking key that only redact() checks.
    if "[" in line and '":[' in line:
        return True
    brace = line.find("{", 1)
    while brace >= 0:
        if line[brace - 2 : brace] == '":':
            return True
        brace = line.find("{", brace + 1)
    return _may_hold_secret(line)


def render_json(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> str:
    """redact(), JSON, and a last scrub of the line: the last processor of a JSON line.

    Most lines have nothing to redact: they are rendered once and checked as a whole. A
    line that may hold a secret is redacted value by value, rendered again, and scrubbed
    as text, which catches what was rendered from non-string values.
    """
    if not _secret_keys(tuple(event_dict)):
        line = _dumps(event_dict)
        if not _line_may_hold_secret(line):
            return line
    return scrub(_dumps(redact(_, __, event_dict)))


#: The current request's (request id, route template), set by the app's middleware and
#: added to every line logged while the request is handled. aiohttp handles each request
#: in a task of its own, started from a copy of the connection's context, so nothing
#: needs clearing.
request_context: ContextVar[tuple[str, str] | None] = ContextVar("wavechain_request", default=None)


def merge_request_context(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    current = request_context.get()
    if current is not None:
        event_dict.setdefault("request_id", current[0])
        event_dict.setdefault("route", current[1])
    return event_dict


class _Output:
    """stderr, shared by every line from every thread, in the order lines were logged.

    Access lines logged on an event loop are held until the end of the loop's turn and
    written together, one system call for dozens of lines under load. Any other line
    writes the held ones first, so order is kept; at exit, what is held is written.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._held: list[str] = []

    def write(self, line: str) -> None:
        with self.lock:
            self._held.append(line)
            self._flush_locked()

    def hold(self, line: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: nothing would flush, so write now
            self.write(line)
            return
        with self.lock:
            first = not self._held
            self._held.append(line)
        if first:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._held:
            lines = "\n".join(self._held) + "\n"
            self._held.clear()
            sys.stderr.write(lines)
            sys.stderr.flush()


class _AccessLines:
    """The access line's short path: the same timestamp and final processors as every
    line, without structlog's bound-logger machinery, held to the end of the loop's turn.
    Not configured (``processors`` empty) until ``configure_logging`` runs."""

    def __init__(self, output: _Output) -> None:
        self._output = output
        self.processors: tuple[Callable[..., Any], ...] = ()

    def write(self, fields: dict[str, Any]) -> bool:
        """Write one line from ``fields`` (completed in place); False if not configured."""
        if not self.processors:
            return False
        fields["level"] = "info"
        fields["logger"] = "wavechain.access"
        line: Any = timestamp(None, "info", fields)
        for processor in self.processors:
            line = processor(None, "info", line)
        self._output.hold(line)
        return True


OUTPUT = _Output()
ACCESS = _AccessLines(OUTPUT)
atexit.register(OUTPUT.flush)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Other libraries' stdlib records: written after the held access lines, in order."""

    def emit(self, record: logging.LogRecord) -> None:
        with OUTPUT.lock:
            OUTPUT.flush()
            super().emit(record)


class _StderrLogger:
    """structlog's output for our own events: one finished line, through ``OUTPUT``."""

    __slots__ = ("name",)

    def __init__(self, name: str = "wavechain") -> None:
        self.name = name  # read by add_logger_name

    def msg(self, message: str) -> None:
        OUTPUT.write(message)

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
    final: list[Any] = (
        [render_json] if json else [redact, structlog.dev.ConsoleRenderer(), scrub_line]
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        merge_request_context,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        timestamp,
        structlog.processors.format_exc_info,
    ]
    ACCESS.processors = tuple(final)
    structlog.configure(
        processors=[*shared, *final],
        # Calls below the level return at once, before any processor runs.
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=True,
    )
    handler = _Handler(sys.stderr)
    handler.lock = OUTPUT.lock
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # Extras (aiohttp's request line, headers) first, so redaction sees them too.
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        )
    )
    # Our renderer never prints a record's thread or process: don't look them up.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(threshold)
    # botocore at DEBUG prints request signatures; keep it quieter than ours.
    logging.getLogger("botocore").setLevel(max(logging.INFO, root.level))


def unconfigure_logging() -> None:
    """Undo ``configure_logging`` (tests)."""
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()
    ACCESS.processors = ()
