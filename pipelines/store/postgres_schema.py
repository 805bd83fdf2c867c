"""The PostgreSQL backend's schema as its history, and ``migrate``: each migration is
applied once, in order, under an advisory lock, and recorded in ``wavechain_migrations``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from pipelines.errors import ConfigError

log = structlog.get_logger("wavechain.store")

#: pg_advisory_lock key for migrations (any constant; this one spells "wavechai").
_MIGRATION_LOCK = 0x7761766563686169
MIGRATIONS: tuple[str, ...] = (
    # 1: the schema.
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        pipeline TEXT NOT NULL,
        spec TEXT NOT NULL,
        inputs TEXT NOT NULL,
        status TEXT NOT NULL,
        cancelled BOOLEAN NOT NULL DEFAULT false,
        mirror BOOLEAN NOT NULL DEFAULT false,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        version INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX runs_by_created ON runs (created_at DESC, id DESC);
    CREATE INDEX runs_by_status ON runs (status, created_at DESC, id DESC);
    CREATE TABLE stages (
        run_id TEXT NOT NULL REFERENCES runs (id),
        name TEXT NOT NULL,
        position INTEGER NOT NULL DEFAULT 0,
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        task_id TEXT,
        outputs TEXT NOT NULL DEFAULT '[]',
        mirrored TEXT NOT NULL DEFAULT '[]',
        error TEXT NOT NULL DEFAULT '',
        base_attempt INTEGER NOT NULL DEFAULT 0,
        submitted_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        deadline DOUBLE PRECISION,
        hard_deadline DOUBLE PRECISION,
        PRIMARY KEY (run_id, name)
    );
    CREATE INDEX stages_due ON stages (deadline) WHERE deadline IS NOT NULL;
    CREATE TABLE attempts (
        token_hash TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        stage TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        task_id TEXT,
        state TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        provider TEXT NOT NULL DEFAULT 'wavespeed',
        UNIQUE (run_id, stage, attempt)
    );
    CREATE INDEX attempts_by_created ON attempts (created_at);
    CREATE TABLE deliveries (
        provider TEXT NOT NULL,
        webhook_id TEXT NOT NULL,
        run_id TEXT,
        stage TEXT,
        attempt INTEGER,
        task_id TEXT,
        status TEXT,
        effect TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (provider, webhook_id)
    );
    CREATE INDEX deliveries_by_received ON deliveries (received_at);
    CREATE INDEX deliveries_by_run ON deliveries (run_id);
    CREATE TABLE jobs (
        id BIGSERIAL PRIMARY KEY,
        kind TEXT NOT NULL,
        run_id TEXT NOT NULL,
        stage TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        run_after DOUBLE PRECISION NOT NULL,
        lease_until DOUBLE PRECISION,
        tries INTEGER NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        UNIQUE (kind, run_id, stage, attempt)
    );
    CREATE INDEX jobs_due ON jobs (run_after, id);
    CREATE TABLE outbox (
        seq BIGSERIAL PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        run_id TEXT NOT NULL,
        type TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        sent_at DOUBLE PRECISION,
        tries INTEGER NOT NULL DEFAULT 0,
        not_before DOUBLE PRECISION,
        dead_at DOUBLE PRECISION,
        last_error TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX outbox_pending ON outbox (seq) WHERE sent_at IS NULL AND dead_at IS NULL;
    CREATE INDEX outbox_by_run ON outbox (run_id, seq);
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until DOUBLE PRECISION NOT NULL
    );
    """,
    # 2: each stage's dependencies, for the dashboard's graph.
    """
    ALTER TABLE stages ADD COLUMN needs TEXT NOT NULL DEFAULT '[]';
    """,
    # 3: the client's Idempotency-Key of the request that started a run, and its digest.
    """
    ALTER TABLE runs ADD COLUMN idempotency_key TEXT;
    ALTER TABLE runs ADD COLUMN request_hash TEXT;
    CREATE UNIQUE INDEX runs_by_idempotency_key ON runs (idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    """,
    # 4: a run's deadline and budget; the spend ledger (what each attempt cost, or was
    # priced at before it was sent: NULL is unknown), kept when runs are pruned.
    """
    ALTER TABLE runs ADD COLUMN deadline_at DOUBLE PRECISION;
    ALTER TABLE runs ADD COLUMN budget_usd DOUBLE PRECISION;
    CREATE INDEX runs_by_deadline ON runs (deadline_at)
        WHERE deadline_at IS NOT NULL AND status = 'running';
    CREATE TABLE spend (
        run_id TEXT NOT NULL,
        stage TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        pipeline TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        usd DOUBLE PRECISION,
        source TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (run_id, stage, attempt)
    );
    CREATE INDEX spend_by_at ON spend (at);
    """,
    # 5: the result cache: a stage served from it, each entry, and an attempt's key.
    """
    ALTER TABLE stages ADD COLUMN cached BOOLEAN NOT NULL DEFAULT false;
    ALTER TABLE attempts ADD COLUMN cache_key TEXT;
    CREATE TABLE result_cache (
        key TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        run_id TEXT NOT NULL,
        stage TEXT NOT NULL,
        outputs TEXT NOT NULL,
        mirrored TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 6: the provider governor: a run's priority and concurrency key (and its cap),
    # copied to its jobs with their provider; a provider's rate after a 429.
    """
    ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 5;
    ALTER TABLE runs ADD COLUMN concurrency_key TEXT;
    ALTER TABLE runs ADD COLUMN concurrency_limit INTEGER;
    ALTER TABLE jobs ADD COLUMN provider TEXT;
    ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 5;
    ALTER TABLE jobs ADD COLUMN concurrency_key TEXT;
    ALTER TABLE jobs ADD COLUMN concurrency_limit INTEGER;
    CREATE INDEX attempts_sending ON attempts (provider) WHERE state = 'sending';
    CREATE TABLE governor_state (
        provider TEXT PRIMARY KEY,
        factor DOUBLE PRECISION NOT NULL,
        until DOUBLE PRECISION NOT NULL
    );
    """,
    # 7: the seed the provider reported for a stage's task (its provenance).
    """
    ALTER TABLE stages ADD COLUMN seed BIGINT;
    """,
)


async def migrate(conn: Any, migrations: Sequence[str] = MIGRATIONS) -> int:
    """Apply what is missing of ``migrations``, under an advisory lock: replicas starting
    at once apply each migration once, and the others wait. Returns the version."""
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS wavechain_migrations ("
            "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        version = int(
            await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM wavechain_migrations")
        )
        if version > len(migrations):
            raise ConfigError(
                f"DATABASE_URL: the database's schema is version {version}, newer than this "
                f"wavechain knows ({len(migrations)}): upgrade wavechain"
            )
        for number in range(version + 1, len(migrations) + 1):
            async with conn.transaction():
                await conn.execute(migrations[number - 1])
                await conn.execute("INSERT INTO wavechain_migrations (version) VALUES ($1)", number)
            log.info("store.migrated", version=number)
        return max(version, len(migrations))
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
