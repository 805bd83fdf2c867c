"""Prometheus metrics: names and units by Prometheus' conventions, labels of low
cardinality only (never a run id or a task id).

Each process counts its own; `/metrics` (service/metrics.py) adds what the store knows
at scrape time (the outbox's backlog, runs by status). Under `serve --processes N` the
processes share a directory (prometheus-client's multiprocess mode) and any one of them
answers for all; several replicas are scraped one by one, as pods.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

#: Latency buckets in seconds, from a millisecond to a minute.
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)
_SLOW = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

WEBHOOKS = Counter(
    "wavechain_webhook_deliveries",
    "Provider callbacks received, by what they did (effect) and, when rejected, why.",
    ["effect", "reason"],
)
WEBHOOK_SECONDS = Histogram(
    "wavechain_webhook_handling_seconds",
    "From a callback's arrival to its answer (verification and the durable commit).",
    buckets=_FAST,
)
HANDOFF_SECONDS = Histogram(
    "wavechain_handoff_seconds",
    "From the callback that completed a stage to the next stage's submit leaving.",
    buckets=_FAST,
)
JOBS = Counter(
    "wavechain_jobs",
    "Jobs carried out, by kind (submit, mirror, delete) and outcome.",
    ["kind", "outcome"],
)
CACHE_LOOKUPS = Counter(
    "wavechain_cache_lookups",
    "Result cache lookups of stages that opted in: hit, miss, gone (an entry whose objects "
    "were deleted), or uncacheable (no fixed seed, or an upstream without a digest).",
    ["result"],
)
CHECKS = Counter(
    "wavechain_output_checks",
    "Stages whose outputs were checked against the request, by result (passed, rejected).",
    ["result"],
)
GOVERNOR_THROTTLED = Counter(
    "wavechain_governor_throttled",
    "429s received despite the governor: each lowers the provider's rate for a window.",
    ["provider"],
)
JOB_WAIT_SECONDS = Histogram(
    "wavechain_job_wait_seconds",
    "From a job becoming due to a worker claiming it.",
    ["kind"],
    buckets=_FAST,
)
RECONCILE_POLLS = Counter(
    "wavechain_reconcile_polls",
    "Result polls by the sweeper, by what they found (completed, failed, running, "
    "poll_failed, timed_out).",
    ["result"],
)
MIRROR_BYTES = Counter("wavechain_mirror_bytes", "Bytes of outputs copied to S3.")
MIRROR_SECONDS = Histogram(
    "wavechain_mirror_seconds", "Time to copy one output to S3.", buckets=_SLOW
)
PROVIDER_REQUESTS = Counter(
    "wavechain_provider_requests",
    "Requests to the providers, by provider, endpoint and HTTP status ('error': none came).",
    ["provider", "endpoint", "status"],
)
EVENTS = Counter(
    "wavechain_events",
    "Lifecycle events handed to SNS (published) or given up on (parked).",
    ["outcome"],
)
