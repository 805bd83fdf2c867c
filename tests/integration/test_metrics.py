"""/metrics in Prometheus' format, over a real run: deliveries by effect and rejection
reason, hand-off latency, jobs, provider requests, mirror bytes, the outbox, runs."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pipelines import signing
from tests.conftest import TEST_SECRET
from tests.integration.conftest import Wavechain, WavechainFactory
from tests.integration.test_mirror_events import aws_settings
from tests.support.aws import AwsSandbox


async def scrape(wc: Wavechain) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with wc.http.get(f"{wc.base_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_a_run_shows_in_the_metrics(
    make_wavechain: WavechainFactory, aws: AwsSandbox
) -> None:
    """One image_video_3d run (mirrored to S3) and one forged callback move the counters
    they should, and the store's gauges say what the store holds. No label carries a run
    or task id."""
    wc = await make_wavechain(**{**aws_settings(aws), "sns_topic_arn": None})
    before = await scrape(wc)
    run = await wc.wait((await wc.create_run("image_video_3d"))["id"])
    assert run["status"] == "succeeded"
    body = b'{"id":"x","status":"completed"}'
    headers = signing.sign(
        body, secret=TEST_SECRET, webhook_id="m", timestamp=int(time.time()) - 9999
    )
    async with wc.http.post(
        f"{wc.base_url}/webhooks/wavespeed/abc", data=body, headers=headers
    ) as resp:
        assert resp.status == 401
    after = await scrape(wc)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("wavechain_webhook_deliveries_total", effect="applied", reason="") == 3
    assert (
        delta("wavechain_webhook_deliveries_total", effect="rejected", reason="stale_timestamp")
        == 1
    )
    assert delta("wavechain_webhook_handling_seconds_count") == 3
    assert delta("wavechain_handoff_seconds_count") == 2  # video and mesh, after the image
    assert delta("wavechain_jobs_total", kind="submit", outcome="submitted") == 3
    assert delta("wavechain_jobs_total", kind="mirror", outcome="mirrored") == 3
    assert delta("wavechain_job_wait_seconds_count", kind="submit") == 3
    assert delta("wavechain_provider_requests_total", provider="wavespeed", endpoint="submit",
                 status="200") == 3  # fmt: skip
    listing = aws.s3.list_objects_v2(Bucket=aws.bucket)["Contents"]
    sizes = sum(o["Size"] for o in listing if not o["Key"].endswith(".json"))  # not manifests
    assert delta("wavechain_mirror_bytes_total") == sizes
    assert delta("wavechain_mirror_seconds_count") == 3
    # No topic: the run's events wait in the outbox, and the gauges say so.
    assert value(after, "wavechain_outbox_pending_events") == 8
    assert value(after, "wavechain_outbox_oldest_pending_age_seconds") > 0
    assert value(after, "wavechain_runs", status="succeeded") == 1
    for _, labels in after:
        for _, label_value in labels:
            assert not label_value.startswith(("run_", "msg_")) and len(label_value) < 40
