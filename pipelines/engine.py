"""The engine: the imperative shell around ``state.decide``.

It accepts runs, applies provider results (webhooks, synchronous answers), and runs
the workers that carry out jobs. Workers claim jobs with a lease, so a job whose
worker died is taken again once the lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import structlog

from pipelines import budget
from pipelines.backoff import backoff_s
from pipelines.cache import cache_key, wants_cache
from pipelines.catalog import ModelSpec, get_model
from pipelines.checks import FAILED, reseeded, verdict
from pipelines.errors import (
    BudgetExceededError,
    ProviderError,
    ProviderNotConfiguredError,
    SpecError,
    SubmitOutcomeUnknownError,
)
from pipelines.governor import Governor
from pipelines.health import NO_REPORTS, Reporter
from pipelines.metrics import (
    CACHE_LOOKUPS,
    CHECKS,
    GOVERNOR_THROTTLED,
    HANDOFF_SECONDS,
    JOB_WAIT_SECONDS,
    JOBS,
    MIRROR_BYTES,
    MIRROR_SECONDS,
)
from pipelines.mirror import MirroredObject, MirrorRejectedError, S3Mirror
from pipelines.prices import NO_PRICES, PriceTable, estimate
from pipelines.probe import MediaInfo, Probe, ProbeError
from pipelines.provenance import manifest, manifest_uri, media_inputs
from pipelines.providers import AimlClient, Prediction, ProviderAccess, WaveSpeedClient
from pipelines.spec import Pipeline, StageSpec, bind_inputs, render
from pipelines.state import (
    CacheHit,
    CancelRequested,
    Decision,
    Event,
    Mirrored,
    MirrorFailed,
    OutputRejected,
    RetryRequested,
    StageState,
    StageStatus,
    SubmitRejected,
    Submitted,
    TaskFailed,
    TaskProcessing,
    TaskSucceeded,
)
from pipelines.store import Job, StageContext, Store, SubmitContext, WebhookOutcome
from pipelines.store.records import CacheEntry, Charge, Idempotency, RunOptions

log = structlog.get_logger("wavechain.engine")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    public_base_url: str
    workers: int = 8
    job_lease_s: float = 120.0
    poll_interval_s: float = 0.5
    max_submit_tries: int = 8
    #: First wait before a failed job is tried again (doubling, up to ``max_backoff_s``).
    submit_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    #: Downstream stages get presigned URLs of our copies ("mirrored") or the provider's.
    downstream_urls: Literal["mirrored", "provider"] = "mirrored"
    presign_ttl_s: int = 6 * 3600
    #: Transient mirror failures (S3 down) are retried this often before the stage fails.
    max_mirror_tries: int = 30
    #: What every run together may spend per UTC day (None: no cap).
    daily_budget_usd: float | None = None
    #: A stage that would cross a cap: its run fails, or it waits ``budget_wait_s`` and
    #: is tried again.
    budget_exceeded: Literal["fail", "wait"] = "fail"
    budget_wait_s: float = 60.0
    #: Converts the AI/ML API's ``credits_used`` to USD (None: its calls cost the price
    #: table's price).
    aiml_usd_per_credit: float | None = None
    #: Refuse a run whose estimate is more than the WaveSpeed account's balance (asked,
    #: then kept this long).
    check_balance: bool = False
    balance_cache_s: float = 60.0
    #: Serve stages from the result cache unless they say ``cache: false`` (a stage's
    #: ``cache: true`` opts in either way). Needs the S3 mirror.
    result_cache: bool = False
    #: Providers' account limits (enforced by the store's claims); a 429 lowers the rate
    #: for a window.
    governor: Governor = field(default_factory=Governor)
    #: A task delete refused by a 5xx or throttled, or waiting for its submit's answer
    #: (the task id), is tried this often before it is given up (and logged).
    max_delete_tries: int = 10


class Engine:
    def __init__(
        self,
        store: Store,
        config: EngineConfig,
        *,
        wavespeed: WaveSpeedClient,
        aiml: AimlClient,
        mirror: S3Mirror | None = None,
        clock: Callable[[], float] = time.time,
        new_token: Callable[[], str] = lambda: secrets.token_urlsafe(32),
        prices: PriceTable | None = None,
        on_iteration: Reporter = NO_REPORTS,
    ) -> None:
        self.store = store
        self.prices = prices or NO_PRICES
        self._balance: tuple[float, float] | None = None  # (USD, when asked)
        self.config = config
        self._wavespeed = wavespeed
        self._aiml = aiml
        self._mirror = mirror
        self._clock = clock
        self._new_token = new_token
        self._wake = asyncio.Event()
        self._busy = 0
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._running: set[asyncio.Task[None]] = set()
        self._on_iteration = on_iteration

    @property
    def stopping(self) -> bool:
        """Draining: no new jobs are claimed."""
        return self._stopping

    def notify(self) -> None:
        """New jobs may be due (called by the store after a commit that added some)."""
        self._wake.set()

    # runs -----------------------------------------------------------------------------

    def _access(self) -> dict[str, ProviderAccess]:
        return {"wavespeed": self._wavespeed.access, "aimlapi": self._aiml.access}

    def check_providers(self, pipeline: Pipeline) -> None:
        """Refuse a pipeline with a stage whose provider has no key, naming both."""
        access = self._access()
        missing = []
        for name, stage in pipeline.stages.items():
            model = get_model(stage.model)
            if model is not None and access[model.provider].mode == "off":
                variable = access[model.provider].key_variable
                missing.append(f"stage '{name}' ({model.id}) needs {variable}")
        if missing:
            raise ProviderNotConfiguredError(
                f"pipeline '{pipeline.name}': {'; '.join(missing)}, which is not set on this "
                "server: set it, or point the provider's base URL at a local emulator"
            )

    async def create_run(
        self,
        pipeline: Pipeline,
        inputs: Mapping[str, Any],
        *,
        idempotency: Idempotency | None = None,
        deadline: float | datetime | None = None,
        budget_usd: float | None = None,
        priority: int = 5,
        concurrency: tuple[str | None, int | None] = (None, None),
    ) -> str:
        """The new run's id. With ``idempotency`` whose key names a run already, raises
        ``IdempotentReplay`` (from the store) and starts nothing. ``deadline`` (seconds
        from now, or a time) and ``budget_usd`` override the pipeline's."""
        self.check_providers(pipeline)
        bound = bind_inputs(pipeline, inputs)  # SpecError before anything is written
        now = self._clock()
        options = RunOptions(
            deadline_at=_deadline_at(deadline, pipeline.deadline_s, now),
            budget_usd=pipeline.budget_usd if budget_usd is None else budget_usd,
            priority=priority,
            concurrency_key=concurrency[0],
            concurrency_limit=concurrency[1],
        )
        if idempotency is not None and (replay := await self.store.run_for_key(idempotency.key)):
            raise replay  # a request sent again: its run, even if a cap is reached since
        await self._affordable(pipeline, bound, options.budget_usd, now)
        run_id = await self.store.create_run(
            pipeline,
            bound,
            now=now,
            mirror=self._mirror is not None,
            idempotency=idempotency,
            options=options,
        )
        log.info("run.created", run_id=run_id, pipeline=pipeline.name)
        return run_id

    async def _affordable(
        self, pipeline: Pipeline, inputs: Mapping[str, Any], cap: float | None, now: float
    ) -> None:
        """Refuse (``BudgetExceededError``, naming the cap) a run whose estimate is more than
        its budget, than what is left of the day's, or than the account's balance. Only a
        first check: each submit is checked again, atomically, in the store."""
        caps = self.config.daily_budget_usd is not None or cap is not None
        if not caps and not self.config.check_balance:
            return
        priced = estimate(pipeline, inputs, self.prices)
        expected: float = priced["expected_usd"]
        if caps and priced["unknown"]:
            stages = ", ".join(f"'{name}'" for name in priced["unknown"])
            raise BudgetExceededError(
                f"pipeline '{pipeline.name}': a budget applies, but stage(s) {stages} have no "
                "known price: set them in the price table (PRICES_FILE)"
            )
        if cap is not None and expected > cap + budget.EPSILON:
            raise BudgetExceededError(
                f"pipeline '{pipeline.name}': estimated at {budget.usd(expected)}, over the "
                f"run's budget_usd of {budget.usd(cap)}"
            )
        daily = self.config.daily_budget_usd
        if daily is not None:
            spent = await self.store.spent(since=budget.day_start(now))
            left = max(0.0, daily - spent.known_usd)
            if expected > left + budget.EPSILON:
                raise BudgetExceededError(
                    f"pipeline '{pipeline.name}': estimated at {budget.usd(expected)}, over "
                    f"what is left today of DAILY_BUDGET_USD ({budget.usd(left)} of "
                    f"{budget.usd(daily)})"
                )
        if self.config.check_balance:
            balance = await self._account_balance(now)
            if expected > balance + budget.EPSILON:
                raise BudgetExceededError(
                    f"pipeline '{pipeline.name}': estimated at {budget.usd(expected)}, more "
                    f"than the WaveSpeed account's balance ({budget.usd(balance)}) "
                    "(CHECK_BALANCE=on)"
                )

    async def _account_balance(self, now: float) -> float:
        if self._balance is not None and now - self._balance[1] < self.config.balance_cache_s:
            return self._balance[0]
        usd = await self._wavespeed.balance()
        self._balance = (usd, now)
        return usd

    async def cancel(self, run_id: str) -> Decision:
        decision = await self.store.apply(run_id, CancelRequested(), now=self._clock())
        log.info("run.cancel_requested", run_id=run_id, changed=decision.changed)
        return decision

    async def retry(self, run_id: str, from_stage: str | None = None) -> Decision:
        """Re-run ``from_stage`` and its downstream (or what failed), reusing upstream outputs."""
        decision = await self.store.apply(run_id, RetryRequested(from_stage), now=self._clock())
        log.info("run.retry_requested", run_id=run_id, from_stage=from_stage)
        return decision

    # results --------------------------------------------------------------------------

    async def on_wavespeed_webhook(
        self,
        token: str,
        webhook_id: str,
        prediction: Prediction,
        *,
        received_at: float | None = None,
    ) -> WebhookOutcome:
        """Apply a verified delivery. ``received_at``: when the request arrived (now if not
        given), the delivery's time and that of the transition it causes."""

        def make_event(stage: str, attempt: int) -> Event:
            return result_event(stage, attempt, prediction)

        return await self.store.webhook(
            provider="wavespeed",
            webhook_id=webhook_id,
            token=token,
            task_id=prediction.id,
            status=prediction.status,
            make_event=make_event,
            now=self._clock() if received_at is None else received_at,
        )

    # workers --------------------------------------------------------------------------

    async def run_workers(self) -> None:
        """Claim and carry out jobs until ``stop`` (or cancelled).

        A failed claim (the database locked or down) is logged and retried after a
        backoff; the loop never ends on an error, and reports each iteration to the
        health checks, so readiness shows a store that cannot be reached.
        """
        failures = 0
        while not self._stopping:
            self._wake.clear()
            free = self.config.workers - self._busy
            jobs: list[Job] = []
            if free > 0:
                self._on_iteration.begin()
                try:
                    jobs = await self.store.claim_jobs(
                        now=self._clock(), limit=free, lease_s=self.config.job_lease_s
                    )
                except Exception as exc:
                    failures += 1
                    delay = backoff_s(failures, base=0.1, cap=5.0)
                    log.warning("workers.claim_failed", error=repr(exc), retry_in_s=delay)
                    self._on_iteration(exc)
                    await self._sleep(delay)
                    continue
                failures = 0
            self._on_iteration(None)
            for job in jobs:
                self._busy += 1
                self._idle.clear()
                task = asyncio.create_task(self._handle(job), name=f"job-{job.id}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            if free > 0 and len(jobs) == free:
                continue
            await self._sleep(self.config.poll_interval_s)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def drain(self) -> None:
        """Claim no new jobs from now on (shutdown has started)."""
        self._stopping = True
        self._wake.set()

    async def stop(self, grace_s: float) -> bool:
        """Take no new jobs; wait up to ``grace_s`` for running ones, then cancel what is
        left (its lease expires and another process takes it). True if all finished."""
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)
            return False
        return True

    async def _heartbeat(self, job: Job) -> None:
        """Keep the lease while the job runs, so a short lease still covers a long job.
        A failed renewal is logged; if the lease then lapses, the job may be taken again,
        which every job kind is safe against (a submit is never re-sent blindly)."""
        while True:
            await asyncio.sleep(self.config.job_lease_s / 3)
            try:
                await self.store.renew_lease(job, until=self._clock() + self.config.job_lease_s)
            except Exception as exc:
                log.warning("job.lease_renewal_failed", error=repr(exc))

    async def _handle(self, job: Job) -> None:
        """Carry out one job. Never raises: whatever goes wrong, the job is released with a
        backoff, or, if even that fails, its lease expires and it is taken again."""
        heartbeat = asyncio.create_task(self._heartbeat(job))
        with structlog.contextvars.bound_contextvars(
            run_id=job.run_id, stage=job.stage, attempt=job.attempt, job=job.kind
        ):
            outcome = "crashed"
            try:
                if job.due_at is not None:
                    JOB_WAIT_SECONDS.labels(job.kind).observe(max(0.0, self._clock() - job.due_at))
                if job.kind == "submit":
                    outcome = await self._submit(job)
                elif job.kind == "mirror":
                    outcome = await self._mirror_outputs(job)
                elif job.kind == "delete":
                    outcome = await self._delete_task(job)
                else:
                    log.error("job.unknown_kind")
                    await self.store.drop_job(job)
                    outcome = "dropped"
            except Exception as exc:
                log.exception("job.crashed")
                try:
                    delay = self._backoff(job.tries)
                    await self.store.retry_job(job, at=self._clock() + delay, error=repr(exc))
                except Exception as again:
                    log.warning("job.release_failed", error=repr(again))
            finally:
                JOBS.labels(job.kind, outcome).inc()
                heartbeat.cancel()
                self._busy -= 1
                if not self._busy:
                    self._idle.set()
                self._wake.set()

    async def _submit(self, job: Job) -> str:
        """Carry out a submit job; its outcome, for the metrics."""
        # Read when the job was claimed; read again (raising the reason) if that failed.
        ctx = job.context or await self.store.submit_context(job)
        stage = ctx.stage
        if ctx.cancelled or stage.attempt != job.attempt or stage.status is not StageStatus.PENDING:
            await self.store.drop_job(job)
            return "dropped"
        if ctx.previous_attempt in ("sending", "unknown"):
            # An earlier try may have reached the provider and created (and charged) a
            # task. Never send again blindly: the signed callback on that attempt's token,
            # or reconciliation, settles it.
            await self.store.attempt_unknown(job, now=self._clock())
            log.warning("stage.submit_outcome_unknown", reason="an earlier try may have reached it")
            return "unknown"
        spec = ctx.pipeline.stages[job.stage]
        model = get_model(spec.model)
        if model is None:  # the spec was validated; a catalog change could still do this
            await self._reject(job, f"unknown model {spec.model!r}")
            return "rejected"
        try:
            cache_key = await self._cache_key(ctx, spec, model)
            if cache_key is not None and await self._from_cache(job, model.id, cache_key):
                return "cached"
            upstream = {name: await self._inputs_from(s) for name, s in ctx.upstream.items()}
            body = render(spec, ctx.inputs, upstream, where=f"run {job.run_id}")
            if stage.error.startswith(FAILED):  # the last output was refused: another seed
                body, cache_key = reseeded(body, job.attempt - stage.base_attempt), None
        except SpecError as exc:
            await self._reject(job, str(exc))
            return "rejected"
        token = self._new_token()
        now = self._clock()
        charge = Charge(
            pipeline=ctx.pipeline.name,
            model=model.id,
            usd=self.prices.attempt(model.id, body),
            daily_cap_usd=self.config.daily_budget_usd,
            day_start=budget.day_start(now),
        )
        try:
            await self.store.record_attempt(
                job, token, provider=model.provider, now=now, charge=charge, cache_key=cache_key
            )
        except BudgetExceededError as exc:
            return await self._over_budget(job, str(exc))
        try:
            if model.provider == "aimlapi":
                await self._submit_aiml(job, token, model.id, body)
                return "submitted"
            else:
                webhook = f"{self.config.public_base_url}/webhooks/wavespeed/{token}"
                log.debug("stage.submitting", model=model.id, webhook=webhook)  # token scrubbed
                # From the moment the job became due (for a downstream stage: the upstream's
                # completion callback was received) to the submit being handed to the HTTP
                # client: the hand-off latency, on the stage.submitted line.
                since_due = None if job.due_at is None else self._clock() - job.due_at
                prediction = await self._wavespeed.submit(model.id, body, webhook=webhook)
                event = Submitted(job.stage, job.attempt, prediction.id)
                await self.store.accept_attempt(
                    job, token, prediction.id, [event], now=self._clock()
                )
                log.info(
                    "stage.submitted",
                    task_id=prediction.id,
                    model=model.id,
                    tries=job.tries,
                    since_due_ms=None if since_due is None else round(since_due * 1000, 3),
                )
                if since_due is not None and spec.needs:
                    HANDOFF_SECONDS.observe(since_due)
                return "submitted"
        except SubmitOutcomeUnknownError as exc:
            # A task may exist and be charged: keep the attempt and its token; the signed
            # callback, or reconciliation, settles it.
            await self.store.attempt_unknown(job, now=self._clock())
            log.warning("stage.submit_outcome_unknown", error=str(exc))
            return "unknown"
        except ProviderError as exc:
            if exc.status == 429:
                await self._throttled(model.provider, exc.retry_after)
            if exc.retryable and job.tries < self.config.max_submit_tries:
                # Proven not to have created a task: this attempt's row goes, and the job
                # comes back after its backoff, never sooner than the provider's Retry-After.
                await self.store.discard_attempt(job)
                delay = max(self._backoff(job.tries), exc.retry_after or 0.0)
                await self.store.retry_job(job, at=self._clock() + delay, error=str(exc))
                log.warning("stage.submit_retrying", error=str(exc), delay_s=delay)
                return "retrying"
            await self.store.attempt_rejected(job)
            await self._reject(job, str(exc))
            return "rejected"

    async def _cache_key(self, ctx: SubmitContext, spec: StageSpec, model: ModelSpec) -> str | None:
        """The stage's result cache key, or None if it did not opt in or its output is not
        determined by its input (pipelines/cache.py has the rules)."""
        if self._mirror is None or not wants_cache(spec, default=self.config.result_cache):
            return None
        digests: dict[str, list[str]] = {}
        for name, upstream in ctx.upstream.items():
            found = [await self._mirror.digest(uri) for uri in upstream.mirrored]
            if not upstream.mirrored or any(d is None for d in found):
                CACHE_LOOKUPS.labels("uncacheable").inc()
                log.info("cache.uncacheable", reason=f"stage '{name}' has no digest")
                return None
            digests[name] = [d for d in found if d is not None]
        key, why = cache_key(spec, model, ctx.inputs, digests)
        if key is None:
            CACHE_LOOKUPS.labels("uncacheable").inc()
            log.info("cache.uncacheable", reason=why)
        return key

    async def _from_cache(self, job: Job, model: str, key: str) -> bool:
        """Serve the stage from an earlier run's outputs for ``key``: copy its objects (in
        S3) under this run's keys and apply a cache hit. False on a miss, or when an
        entry's objects are gone (the entry is dropped, and the stage runs)."""
        assert self._mirror is not None  # noqa: S101 - _cache_key checked it
        entry = await self.store.cached_result(key)
        if entry is None:
            CACHE_LOOKUPS.labels("miss").inc()
            return False
        metadata = {"run-id": job.run_id, "stage": job.stage, "model": model,
                    "cached-from": f"{entry.run_id}/{entry.stage}"}  # fmt: skip
        uris = []
        for n, uri in enumerate(entry.mirrored):
            stem = self._mirror.key_stem(job.run_id, job.stage, n)
            copied = await self._mirror.duplicate(uri, stem=stem, metadata=metadata)
            if copied is None:
                CACHE_LOOKUPS.labels("gone").inc()
                log.warning("cache.objects_gone", key=key, missing=uri)
                await self.store.forget_result(key)
                return False
            uris.append(copied.uri)
            earlier = await self._mirror.get_json(manifest_uri(uri))
            if earlier is not None:  # the copy's provenance: the original's, and where from
                output = {**earlier.get("output", {}), "uri": copied.uri}
                copy = {**earlier, "output": output, "run_id": job.run_id, "stage": job.stage,
                        "attempt": job.attempt, "cached_from": uri, "cost_usd": 0.0}  # fmt: skip
                await self._mirror.put_json(manifest_uri(copied.uri), copy)
        event = CacheHit(job.stage, job.attempt, entry.outputs, tuple(uris))
        decision = await self.store.apply(job.run_id, event, now=self._clock(), finish_job=job.id)
        CACHE_LOOKUPS.labels("hit").inc()
        log.info("stage.cached", key=key, source_run=entry.run_id, changed=decision.changed)
        return True

    async def _throttled(self, provider: str, retry_after: float | None) -> None:
        """A 429 despite the governor (another client on the account, or limits set too
        high): every replica lowers the provider's rate for a window (or Retry-After)."""
        limits = self.config.governor.limits.get(provider)
        window = limits.window_s if limits is not None else 60.0
        factor = await self.store.throttle(
            provider, now=self._clock(), for_s=max(window, retry_after or 0.0)
        )
        GOVERNOR_THROTTLED.labels(provider).inc()
        log.warning("governor.throttled", provider=provider, rate_factor=factor)

    async def _over_budget(self, job: Job, error: str) -> str:
        """A stage that would cross a cap is not submitted: its run fails with the reason,
        or (BUDGET_EXCEEDED=wait) it is tried again later."""
        if self.config.budget_exceeded == "wait":
            at = self._clock() + self.config.budget_wait_s
            await self.store.retry_job(job, at=at, error=error)
            log.warning("stage.over_budget", error=error, retry_in_s=self.config.budget_wait_s)
            return "over_budget_waiting"
        log.warning("stage.over_budget", error=error)
        await self._reject(job, error)
        return "over_budget"

    async def _submit_aiml(self, job: Job, token: str, model: str, body: dict[str, Any]) -> None:
        try:
            generated = await self._aiml.generate(model, body)
        except SubmitOutcomeUnknownError as exc:
            # No webhook and no task id to ask about: the attempt fails, and the stage's
            # retry policy decides whether to pay for another one.
            task_id = f"aiml_{job.run_id}_{job.stage}_{job.attempt}"
            events: list[Event] = [
                Submitted(job.stage, job.attempt, task_id),
                TaskFailed(job.stage, job.attempt, task_id, str(exc), retryable=True),
            ]
            await self.store.accept_attempt(job, token, task_id, events, now=self._clock())
            return
        task_id = f"aiml_{secrets.token_hex(8)}"
        outputs = generated.outputs
        # The synchronous answer goes through the same transition as a webhook would.
        events = [
            Submitted(job.stage, job.attempt, task_id),
            TaskSucceeded(job.stage, job.attempt, task_id, outputs),
        ]
        rate, credits = self.config.aiml_usd_per_credit, generated.credits_used
        cost = None if rate is None or credits is None else round(credits * rate, 6)
        await self.store.accept_attempt(
            job, token, task_id, events, now=self._clock(), cost_usd=cost
        )
        log.info(
            "stage.completed_sync", task_id=task_id, outputs=len(outputs), credits_used=credits
        )

    async def preview_urls(
        self, mirrored: Sequence[str], outputs: Sequence[str], *, expires_s: int = 3600
    ) -> list[str]:
        """URLs a browser may fetch a stage's outputs from: presigned URLs of our copies,
        else the provider's own (http ones: inline outputs have none)."""
        if self._mirror is not None and mirrored:
            return [await self._mirror.presign(uri, expires_s=expires_s) for uri in mirrored]
        return [o for o in outputs if o.startswith(("http://", "https://"))]

    async def _inputs_from(self, stage: StageState) -> list[str]:
        """What a downstream stage receives: presigned URLs of our copies, or provider URLs."""
        provider_urls = self.config.downstream_urls == "provider" and not stage.cached
        if self._mirror is None or not stage.mirrored or provider_urls:
            # A cached stage's provider URLs are an earlier run's, perhaps expired.
            return list(stage.outputs)
        ttl = self.config.presign_ttl_s
        return [await self._mirror.presign(uri, expires_s=ttl) for uri in stage.mirrored]

    def _backoff(self, tries: int) -> float:
        return backoff_s(tries, base=self.config.submit_backoff_s, cap=self.config.max_backoff_s)

    async def _mirror_outputs(self, job: Job) -> str:
        """Carry out a mirror job; its outcome, for the metrics."""
        current = await self.store.stage_state(job.run_id, job.stage)
        stage = current.stage
        stale = current.cancelled or stage.attempt != job.attempt or not stage.awaiting_mirror
        if self._mirror is None or stale:
            await self.store.drop_job(job)
            return "dropped"
        metadata = {
            "run-id": job.run_id,
            "stage": job.stage,
            "model": current.model,
            "task-id": stage.task_id or "",
        }
        uris: list[str] = []
        # The copies first (a provider's output may not live long), each probed on the way
        # (a probe holds headers only); what the stage asked for is read afterwards.
        probes: list[Probe | None] = []
        copies: list[MirroredObject] = []
        try:
            for n, output in enumerate(stage.outputs):
                stem = self._mirror.key_stem(job.run_id, job.stage, n)
                started = time.monotonic()
                probe = Probe()
                copied = await self._mirror.copy(
                    output, stem=stem, metadata=metadata, first_try=job.tries == 1, probe=probe
                )
                probes.append(None if copied.reused else probe)
                copies.append(copied)
                if not copied.reused:
                    MIRROR_SECONDS.observe(time.monotonic() - started)
                    MIRROR_BYTES.inc(copied.size)
                uris.append(copied.uri)
                log.info(
                    "output.mirrored",
                    key=copied.key,
                    size=copied.size,
                    content_type=copied.content_type,
                    reused=copied.reused,
                )
        except MirrorRejectedError as exc:
            event: Event = MirrorFailed(job.stage, job.attempt, str(exc))
            await self.store.apply(job.run_id, event, now=self._clock(), finish_job=job.id)
            log.warning("output.mirror_rejected", error=str(exc))
            return "rejected"
        except Exception as exc:  # S3 or the network: transient until proven otherwise
            if job.tries >= self.config.max_mirror_tries:
                event = MirrorFailed(job.stage, job.attempt, f"mirroring gave up: {exc!r}")
                await self.store.apply(job.run_id, event, now=self._clock(), finish_job=job.id)
                return "gave_up"
            delay = self._backoff(job.tries)
            await self.store.retry_job(job, at=self._clock() + delay, error=repr(exc))
            log.warning("output.mirror_retrying", error=repr(exc), retry_in_s=delay)
            return "retrying"
        ctx = await self.store.submit_context(job)
        gate = self._gate(job, ctx)
        if gate is not None and (problem := gate.judge(probes)):
            rejected = OutputRejected(job.stage, job.attempt, problem)
            await self.store.apply(job.run_id, rejected, now=self._clock(), finish_job=job.id)
            CHECKS.labels("rejected").inc()
            log.warning("stage.output_rejected", error=problem)
            return "output_rejected"
        if gate is not None:
            CHECKS.labels("passed").inc()
        try:
            await self._write_manifests(job, ctx, current, copies)
        except Exception as exc:  # S3: transient, as a copy's failure is
            delay = self._backoff(job.tries)
            await self.store.retry_job(job, at=self._clock() + delay, error=repr(exc))
            log.warning("output.manifest_retrying", error=repr(exc), retry_in_s=delay)
            return "retrying"
        event = Mirrored(job.stage, job.attempt, tuple(uris))
        decision = await self.store.apply(job.run_id, event, now=self._clock(), finish_job=job.id)
        if decision.changed and (ref := await self.store.task_of(job)) and ref.cache_key:
            entry = CacheEntry(ref.cache_key, job.run_id, job.stage, stage.outputs, tuple(uris))
            await self.store.save_result(entry, model=current.model, now=self._clock())
            log.info("cache.saved", key=ref.cache_key)
        return "mirrored"

    async def _delete_task(self, job: Job) -> str:
        """Carry out a delete job: stop the attempt's task at the provider (after a cancel,
        a timeout or a failed sibling). Idempotent: a task the provider no longer knows
        (404) or one already finished is not an error. Its outcome, for the metrics."""
        ref = await self.store.task_of(job)
        if ref is None or ref.state in ("rejected", "deleted") or ref.provider != "wavespeed":
            # No attempt left (its submit never left, or was proven not to have created a
            # task), or a synchronous provider whose answer came with the call.
            await self.store.finish_delete(job, deleted=False)
            return "nothing"
        if ref.task_id is None:
            if ref.state == "sending" and job.tries < self.config.max_delete_tries:
                # The submit is on its way: its answer will name the task.
                await self.store.retry_job(
                    job, at=self._clock() + self._backoff(job.tries), error="awaiting task id"
                )
                return "waiting"
            log.warning("task.delete_impossible", reason="the submit's answer named no task")
            await self.store.finish_delete(job, deleted=False)
            return "no_task_id"
        try:
            deleted = await self._wavespeed.delete(ref.task_id)
        except ProviderError as exc:
            if exc.retryable and job.tries < self.config.max_delete_tries:
                delay = max(self._backoff(job.tries), exc.retry_after or 0.0)
                await self.store.retry_job(job, at=self._clock() + delay, error=str(exc))
                log.warning("task.delete_retrying", task_id=ref.task_id, error=str(exc))
                return "retrying"
            log.error("task.delete_failed", task_id=ref.task_id, error=str(exc))
            await self.store.finish_delete(job, deleted=False)
            return "failed"
        await self.store.finish_delete(job, deleted=deleted)
        log.info("task.deleted", task_id=ref.task_id, found=deleted)
        return "deleted" if deleted else "gone"

    async def _write_manifests(
        self,
        job: Job,
        ctx: SubmitContext,
        current: StageContext,
        copies: Sequence[MirroredObject],
    ) -> None:
        """Beside each output, its provenance (pipelines/provenance.py)."""
        assert self._mirror is not None  # noqa: S101 - only called while mirroring
        spec = ctx.pipeline.stages[job.stage]
        model = get_model(spec.model)
        upstream = {n: list(s.mirrored or s.outputs) for n, s in ctx.upstream.items()}
        params = render(spec, ctx.inputs, upstream, where=f"run {job.run_id}", validate=False)
        if current.stage.error.startswith(FAILED):
            params = reseeded(params, job.attempt - current.stage.base_attempt)
        digests = {
            uri: digest
            for uris in upstream.values()
            for uri in uris
            if uri.startswith("s3://") and (digest := await self._mirror.digest(uri))
        }
        view = await self.store.get_run(job.run_id)
        stage_view = next((s for s in view.stages if s.name == job.stage), None) if view else None
        for copied in copies:
            doc = manifest(
                output={"uri": copied.uri, "sha256": copied.sha256, "size": copied.size,
                        "content_type": copied.content_type},
                run_id=job.run_id, pipeline=ctx.pipeline, stage=job.stage, attempt=job.attempt,
                model=spec.model, provider=model.provider if model else "unknown",
                task_id=current.stage.task_id, params=params,
                inputs=media_inputs(params, upstream, digests),
                submitted_at=stage_view.submitted_at if stage_view else None,
                completed_at=self._clock(),
                cost_usd=stage_view.spent.usd if stage_view else None,
                reported_seed=current.stage.seed,
            )  # fmt: skip
            await self._mirror.put_json(manifest_uri(copied.uri), doc)

    def _gate(self, job: Job, ctx: SubmitContext) -> Gate | None:
        """The stage's quality checks on its outputs' bytes (None when it has none)."""
        spec = ctx.pipeline.stages[job.stage]
        checks = spec.checks - {"nsfw"}  # judged on the callback, by the state machine
        model = get_model(spec.model)
        if not checks or model is None:
            return None
        params = render(spec, ctx.inputs, {}, where=f"run {job.run_id}", placeholders=True)
        return Gate(model, params, checks)

    async def _reject(self, job: Job, error: str) -> None:
        event = SubmitRejected(job.stage, job.attempt, error)
        await self.store.apply(job.run_id, event, now=self._clock(), finish_job=job.id)
        log.warning("stage.submit_rejected", error=error)


def _deadline_at(
    given: float | datetime | None, pipeline_s: float | None, now: float
) -> float | None:
    """When a run must end: a time given, seconds given, or the pipeline's seconds."""
    if isinstance(given, datetime):
        at = given.timestamp()
        if at <= now:
            raise SpecError(f"deadline: {given.isoformat()} has passed already")
        return at
    seconds = pipeline_s if given is None else given
    return None if seconds is None else now + seconds


@dataclass(frozen=True, slots=True)
class Gate:
    """A stage's quality checks, with what was asked of it."""

    model: ModelSpec
    params: Mapping[str, Any]
    checks: frozenset[str]

    def judge(self, probes: Sequence[Probe | None]) -> str | None:
        """Why the probed outputs fail a check, or None."""
        infos: list[MediaInfo | None] = []
        for n, probe in enumerate(probes):
            if probe is None:
                infos.append(None)  # an earlier try's copy, reused: not read again
                continue
            try:
                infos.append(probe.finish())
            except ProbeError as exc:
                if "media" in self.checks:
                    return f"{FAILED}: outputs[{n}]: {exc}"
                infos.append(None)
        return verdict(self.model, self.params, infos, self.checks)


def result_event(stage: str, attempt: int, prediction: Prediction) -> Event:
    """The state-machine event a provider's prediction stands for."""
    if prediction.completed:
        return TaskSucceeded(
            stage, attempt, prediction.id, prediction.outputs, prediction.nsfw, prediction.seed
        )
    if prediction.failed:
        error = prediction.error or f"task {prediction.status}"
        return TaskFailed(stage, attempt, prediction.id, error, retryable=prediction.retryable)
    # created, processing, or a status we do not know: still running.
    return TaskProcessing(stage, attempt, prediction.id)
