"""The store: its interface and records, and ``open_store`` for a ``DATABASE_URL``.

- ``interface.py``: the ``Store`` protocol every backend implements, and its config.
- ``records.py``: what it returns.
- ``sqlite.py`` (+ ``sqlite_writer.py``): the embedded default, for one process.
- ``postgres.py``: for several processes and replicas.
- ``cache.py``: parsed specs and run states, shared by both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from pipelines.errors import ConfigError
from pipelines.store.interface import Store, StoreConfig
from pipelines.store.records import (
    DueStage,
    Job,
    OutboxRow,
    Pruned,
    RunPage,
    RunView,
    StageContext,
    StageView,
    SubmitContext,
    TaskRef,
    WebhookOutcome,
)

__all__ = [
    "DatabaseUrl",
    "DueStage",
    "Job",
    "OutboxRow",
    "Pruned",
    "RunPage",
    "RunView",
    "StageContext",
    "StageView",
    "Store",
    "StoreConfig",
    "SubmitContext",
    "TaskRef",
    "WebhookOutcome",
    "open_store",
    "parse_database_url",
    "unavailable",
]


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    backend: Literal["sqlite", "postgresql"]
    url: str

    def redacted(self) -> str:
        """The URL without its password, for logs and errors."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":[redacted]@", 1)
        return parts._replace(netloc=netloc).geturl()


def parse_database_url(url: str) -> DatabaseUrl:
    """``sqlite:///PATH`` (or ``sqlite://:memory:``), or ``postgresql://…``
    (``postgres://`` too). Anything else is a ConfigError naming DATABASE_URL."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        from pipelines.store.sqlite import sqlite_path

        sqlite_path(url)  # checks the form
        return DatabaseUrl("sqlite", url)
    if scheme in ("postgresql", "postgres"):
        if not urlsplit(url).hostname and "host=" not in url:
            raise ConfigError("DATABASE_URL: a PostgreSQL URL names its host: postgresql://HOST/DB")
        return DatabaseUrl("postgresql", url)
    raise ConfigError(
        "DATABASE_URL must be sqlite:///PATH or postgresql://USER@HOST/DB, "
        f"got {scheme or 'no scheme'}://…"
    )


def unavailable(exc: BaseException) -> bool:
    """True for an error that says the database cannot be reached or is busy now (worth
    a 503 and a retry), not that the request was wrong."""
    import sqlite3

    import asyncpg

    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return "locked" in text or "busy" in text or "disk i/o" in text or "full" in text
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.CannotConnectNowError
        | asyncpg.TooManyConnectionsError,
    )


def open_store(url: str, config: StoreConfig | None = None) -> Store:
    """The backend ``url`` names (not started: call ``start()``)."""
    parsed = parse_database_url(url)
    if parsed.backend == "sqlite":
        from pipelines.store.sqlite import SqliteStore

        return SqliteStore(url, config)
    from pipelines.store.postgres import PostgresStore

    return PostgresStore(url, config)
