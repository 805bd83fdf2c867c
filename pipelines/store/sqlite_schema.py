"""The SQLite backend's schema, as its history: each migration is applied once, in order
(``PRAGMA user_version`` counts those applied)."""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema (CREATE IF NOT EXISTS: databases made before versioning pass).
    """
    CREATE TABLE IF NOT EXISTS runs (
        id TEXT PRIMARY KEY,
        pipeline TEXT NOT NULL,
        spec TEXT NOT NULL,
        inputs TEXT NOT NULL,
        status TEXT NOT NULL,
        cancelled INTEGER NOT NULL DEFAULT 0,
        mirror INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        version INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at DESC);
    CREATE TABLE IF NOT EXISTS stages (
        run_id TEXT NOT NULL REFERENCES runs (id),
        name TEXT NOT NULL,
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        task_id TEXT,
        outputs TEXT NOT NULL DEFAULT '[]',
        mirrored TEXT NOT NULL DEFAULT '[]',
        error TEXT NOT NULL DEFAULT '',
        base_attempt INTEGER NOT NULL DEFAULT 0,
        submitted_at REAL,
        finished_at REAL,
        deadline REAL,
        hard_deadline REAL,
        PRIMARY KEY (run_id, name)
    );
    CREATE INDEX IF NOT EXISTS stages_due ON stages (deadline) WHERE deadline IS NOT NULL;
    CREATE TABLE IF NOT EXISTS attempts (
        token_hash TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        stage TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        task_id TEXT,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (run_id, stage, attempt)
    );
    CREATE INDEX IF NOT EXISTS attempts_by_task ON attempts (task_id);
    CREATE TABLE IF NOT EXISTS deliveries (
        provider TEXT NOT NULL,
        webhook_id TEXT NOT NULL,
        run_id TEXT,
        stage TEXT,
        attempt INTEGER,
        task_id TEXT,
        status TEXT,
        effect TEXT NOT NULL,
        received_at REAL NOT NULL,
        PRIMARY KEY (provider, webhook_id)
    );
    CREATE TABLE IF NOT EXISTS jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        run_id TEXT NOT NULL,
        stage TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        run_after REAL NOT NULL,
        lease_until REAL,
        tries INTEGER NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        UNIQUE (kind, run_id, stage, attempt)
    );
    CREATE INDEX IF NOT EXISTS jobs_due ON jobs (run_after);
    CREATE TABLE IF NOT EXISTS outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        run_id TEXT NOT NULL,
        type TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at REAL NOT NULL,
        sent_at REAL,
        tries INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (sent_at, seq);
    """,
    # 2: an attempt's provider, stage order, the outbox's retries and dead letters,
    # singleton leases, and indexes for retention and paging.
    """
    ALTER TABLE attempts ADD COLUMN provider TEXT NOT NULL DEFAULT 'wavespeed';
    ALTER TABLE stages ADD COLUMN position INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN not_before REAL;
    ALTER TABLE outbox ADD COLUMN dead_at REAL;
    ALTER TABLE outbox ADD COLUMN last_error TEXT NOT NULL DEFAULT '';
    CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, until REAL NOT NULL);
    DROP INDEX outbox_pending;
    CREATE INDEX outbox_pending ON outbox (seq) WHERE sent_at IS NULL AND dead_at IS NULL;
    CREATE INDEX outbox_by_run ON outbox (run_id, seq);
    CREATE INDEX deliveries_by_received ON deliveries (received_at);
    CREATE INDEX deliveries_by_run ON deliveries (run_id);
    CREATE INDEX attempts_by_created ON attempts (created_at);
    CREATE INDEX runs_by_status ON runs (status, created_at DESC);
    """,
    # 3: each stage's dependencies, for the dashboard's graph.
    """
    ALTER TABLE stages ADD COLUMN needs TEXT NOT NULL DEFAULT '[]';
    """,
    # 4: the client's Idempotency-Key of the request that started a run, and its digest.
    """
    ALTER TABLE runs ADD COLUMN idempotency_key TEXT;
    ALTER TABLE runs ADD COLUMN request_hash TEXT;
    CREATE UNIQUE INDEX runs_by_idempotency_key ON runs (idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    """,
    # 5: a run's deadline and budget; the spend ledger (what each attempt cost, or was
    # priced at before it was sent: NULL is unknown), kept when runs are pruned.
    """
    ALTER TABLE runs ADD COLUMN deadline_at REAL;
    ALTER TABLE runs ADD COLUMN budget_usd REAL;
    CREATE INDEX runs_by_deadline ON runs (deadline_at)
        WHERE deadline_at IS NOT NULL AND status = 'running';
    CREATE TABLE spend (
        run_id TEXT NOT NULL,
        stage TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        pipeline TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        usd REAL,
        source TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (run_id, stage, attempt)
    );
    CREATE INDEX spend_by_at ON spend (at);
    """,
    # 6: the result cache: a stage served from it, each entry, and an attempt's key.
    """
    ALTER TABLE stages ADD COLUMN cached INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE attempts ADD COLUMN cache_key TEXT;
    CREATE TABLE result_cache (
        key TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        run_id TEXT NOT NULL,
        stage TEXT NOT NULL,
        outputs TEXT NOT NULL,
        mirrored TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 7: the provider governor: a run's priority and concurrency key (and its cap),
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
        factor REAL NOT NULL,
        until REAL NOT NULL
    );
    """,
    # 8: the seed the provider reported for a stage's task (its provenance).
    """
    ALTER TABLE stages ADD COLUMN seed INTEGER;
    """,
)
