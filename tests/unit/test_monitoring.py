"""infra/monitoring checked against the metrics the code exports: every alert's and
panel's PromQL parses as Prometheus parses it and names only metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

import pipelines.metrics  # noqa: F401 - registers the metrics

ROOT = Path(__file__).resolve().parents[2] / "infra" / "monitoring"
#: Gauges /metrics adds from the store at scrape time (service/metrics.py).
STORE_GAUGES = {
    "wavechain_outbox_pending_events",
    "wavechain_outbox_oldest_pending_age_seconds",
    "wavechain_outbox_parked_events",
    "wavechain_runs",
    "wavechain_spend_today_usd",
    "wavechain_spend_today_unpriced_attempts",
}


def _exported() -> set[str]:
    names = set(STORE_GAUGES)
    for collector in list(REGISTRY._collector_to_names):
        for family in collector.collect():
            if family.name.startswith("wavechain_"):
                names |= {s.name for s in family.samples}
                if family.type == "counter":
                    names.add(f"{family.name}_total")
                if family.type == "histogram":
                    names |= {f"{family.name}_{s}" for s in ("bucket", "count", "sum")}
    return names


def _expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((ROOT / "alerts.yaml").read_text())
    found = [
        (f"alert {rule['alert']}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]
    dashboard = json.loads((ROOT / "grafana-dashboard.json").read_text())
    found += [
        (f"panel {panel['title']}", target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]
    return found


@pytest.mark.parametrize(("where", "expr"), _expressions(), ids=lambda v: str(v)[:40])
def test_each_expression_parses_and_names_exported_metrics(where: str, expr: str) -> None:
    """PromQL that Prometheus would refuse, or a metric the code does not export (a typo,
    a rename), fails here rather than silently never firing."""
    promql_parser.parse(expr)
    names = set(re.findall(r"\b(wavechain_[a-z_]+)\b", expr))
    assert names, where
    assert names <= _exported(), f"{where}: {sorted(names - _exported())}"


def test_the_alerts_cover_what_operators_need() -> None:
    """Callbacks stopped, outbox lag, lost webhooks found by reconciliation, provider
    errors: each has a rule with a severity and a summary."""
    rules = {
        rule["alert"]: rule
        for group in yaml.safe_load((ROOT / "alerts.yaml").read_text())["groups"]
        for rule in group["rules"]
    }
    for name in ("WavechainCallbacksStopped", "WavechainOutboxLag", "WavechainLostWebhooks",
                 "WavechainProviderErrors"):  # fmt: skip
        assert rules[name]["labels"]["severity"] in ("page", "warn")
        assert rules[name]["annotations"]["summary"]
