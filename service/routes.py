"""Only route registration."""

from __future__ import annotations

from aiohttp import web

from service import api, webhooks
from service.dashboard import setup_dashboard
from service.metrics import metrics
from service.openapi import openapi_json


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/webhooks/wavespeed/{token}", webhooks.wavespeed_webhook)
    r.add_post("/v1/runs", api.create_run)
    r.add_post("/v1/runs/estimate", api.estimate_run)
    r.add_get("/v1/runs", api.list_runs)
    r.add_get("/v1/runs/stream", api.runs_stream)
    r.add_get("/v1/runs/{id}", api.get_run)
    r.add_get("/v1/runs/{id}/stream", api.run_stream)
    r.add_get("/v1/runs/{id}/events", api.run_events)
    r.add_get("/v1/runs/{id}/deliveries", api.run_deliveries)
    r.add_post("/v1/runs/{id}/cancel", api.cancel_run)
    r.add_post("/v1/runs/{id}/retry", api.retry_run)
    r.add_get("/v1/pipelines", api.list_pipelines)
    r.add_get("/v1/spend", api.spend)
    r.add_get("/healthz", api.healthz)
    r.add_get("/readyz", api.readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi_json)
    setup_dashboard(app)
