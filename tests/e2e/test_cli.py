"""The CLI as a user runs it: real processes for the emulator, the server and each command."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.aws import sandbox
from tests.support.postgres import Databases
from tests.support.procs import free_port, serve_env, wavechain

SECRET = "whsec_ZTJlLXNlY3JldC1rZXk="


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`wavechain emulator` and `wavechain serve` as processes, on each store; yields the
    API URL."""
    tmp = tmp_path_factory.mktemp("stack")
    emu_port, port = free_port(), free_port()
    emu = f"http://127.0.0.1:{emu_port}"
    env = serve_env(emu, port, tmp / "state.db", SECRET)
    if request.param == "postgres":
        databases: Databases = request.getfixturevalue("pg_databases")
        env["DATABASE_URL"] = asyncio.run(databases.create())
    with (
        wavechain("emulator", "--port", str(emu_port), "--latency", "0.1",
                  "--webhook-secret", SECRET, port=emu_port, log=tmp / "emulator.log"),
        wavechain("--log-json", "serve", port=port, log=tmp / "serve.log", env=env),
    ):  # fmt: skip
        yield f"http://127.0.0.1:{port}"
    for log in ("serve.log", "emulator.log"):
        text = (tmp / log).read_text()
        assert "ZTJlLXNlY3JldC1rZXk" not in text, f"secret leaked into {log}"


def test_run_wait_json(stack: str) -> None:
    """`run FILE --set --wait --json` prints a JSON summary of a finished run."""
    example = Path("pipelines/examples/image_video_3d.yaml")
    proc = cli("run", str(example), "--set", "seed=7", "--set", "prompt=a red fox",
               "--wait", "--json", "--server", stack)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)
    assert run["status"] == "succeeded" and run["inputs"] == {"prompt": "a red fox", "seed": 7}
    assert [s["status"] for s in run["stages"]] == ["succeeded"] * 3

    status = cli("status", run["id"], "--server", stack)
    assert status.returncode == 0 and "succeeded" in status.stdout and ".mp4" in status.stdout
    runs = cli("runs", "--server", stack)
    assert run["id"] in runs.stdout


def test_runs_table_status_tree_and_json_for_scripts(stack: str) -> None:
    """`runs` is an aligned table (filtered by status and pipeline), `status` the stage tree
    with attempts, timings, costs and S3 keys; `--json` gives scripts the same data."""
    ran = cli("run", "storyboard", "--wait", "--json", "--server", stack)
    run = json.loads(ran.stdout)
    table = cli("runs", "--pipeline", "storyboard", "--status", "succeeded", "--server", stack)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["RUN", "STATUS", "PIPELINE", "STAGES", "AGE", "DURATION", "COST"]
    assert any(line.startswith(run["id"]) and "3/3" in line for line in lines[1:])
    assert all("storyboard" in line and "succeeded" in line for line in lines[1:])
    assert len({line.index("PIPELINE") for line in lines[:1]} | {
        line.index("storyboard") for line in lines[1:]}) == 1  # fmt: skip
    none = cli("runs", "--status", "cancelled", "--pipeline", "storyboard", "--server", stack)
    assert none.stdout.strip() == "no runs"
    as_json = json.loads(
        cli("runs", "--pipeline", "storyboard", "--json", "--server", stack).stdout
    )
    assert run["id"] in [r["id"] for r in as_json]
    bad = cli("runs", "--limit", "0", "--server", stack)
    assert bad.returncode == 2 and "--limit must be in range 1..200" in bad.stderr

    tree = cli("status", run["id"], "--server", stack).stdout
    assert "├─ clip" in tree or "└─ clip" in tree
    assert "─ prop" in tree and "attempt 1" in tree and "cost —" in tree
    for stage in run["stages"]:
        assert f"task {stage['task_id']}" in tree
        for key in stage["mirrored_outputs"] or stage["provider_outputs"]:
            assert key[:60] in tree
    # prop is drawn under keyframes, the stage it needs: deeper than the roots.
    heads = {
        n: next(t for t in tree.splitlines() if f"─ {n} " in t)
        for n in ("clip", "keyframes", "prop")
    }
    depth = {n: t.index("─") for n, t in heads.items()}
    assert depth["clip"] == depth["keyframes"] < depth["prop"]
    assert json.loads(cli("status", run["id"], "--json", "--server", stack).stdout) == run | {
        "updated_at": json.loads(cli("status", run["id"], "--json", "--server", stack).stdout)[
            "updated_at"]}  # fmt: skip

    pipelines = cli("pipelines", "--server", stack)
    assert "image_video_3d" in pipelines.stdout and "clip, keyframes, prop" in pipelines.stdout
    names = [p["name"] for p in json.loads(cli("pipelines", "--json", "--server", stack).stdout)]
    assert names == ["image_video_3d", "storyboard"]


def test_run_wait_shows_progress(stack: str) -> None:
    """Without --json, --wait shows each stage's progress and the outputs."""
    proc = cli("run", "storyboard", "--wait", "--server", stack)
    assert proc.returncode == 0, proc.stderr
    for fragment in ("clip", "keyframes", "prop", "submitted", "succeeded", ".png", ".glb"):
        assert fragment in proc.stdout


def test_run_rejects_bad_set_before_submitting(stack: str) -> None:
    """An out-of-range --set is refused with the stage, field and rule; exit code 2."""
    proc = cli("run", "image_video_3d", "--set", "seed=-9", "--server", stack)
    assert proc.returncode == 2
    assert "stage 'image': input.seed: must be in range -1..2147483647" in proc.stderr


def test_cancel_command(stack: str) -> None:
    """`cancel` on a finished run reports the conflict clearly."""
    run = json.loads(cli("run", "image_video_3d", "--wait", "--json", "--server", stack).stdout)
    proc = cli("cancel", run["id"], "--server", stack)
    assert proc.returncode == 2 and "already succeeded" in proc.stderr


def test_unreachable_server_is_explained() -> None:
    """A client command with no server running says so instead of a traceback."""
    proc = cli("runs", "--server", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 2 and "cannot reach wavechain" in proc.stderr


def test_validate(tmp_path: Path) -> None:
    """`validate` passes the examples and names the file, stage, field and rule of a bad one."""
    ok = cli(
        "validate", "pipelines/examples/image_video_3d.yaml", "pipelines/examples/storyboard.yaml"
    )
    assert ok.returncode == 0 and ok.stdout.count("ok:") == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "stages:\n  img:\n    model: wavespeed-ai/hunyuan-image-2.1\n"
        "    input: {prompt: x, size: '2048*2048'}\n"
    )
    proc = cli("validate", str(bad))
    assert proc.returncode == 1
    assert (
        f"{bad}: stage 'img': input.size: each dimension must be in range 256..1536" in proc.stderr
    )
    both = cli("validate", "--json", "pipelines/examples/storyboard.yaml", str(bad))
    assert both.returncode == 1
    good, wrong = (json.loads(line) for line in both.stdout.splitlines())
    assert good["ok"] and good["stages"]["prop"] == {
        "model": "wavespeed-ai/hunyuan3d/v2.1", "needs": ["keyframes"]}  # fmt: skip
    assert not wrong["ok"] and "input.size" in wrong["error"] and wrong["file"] == str(bad)


def test_validate_estimate_uses_the_price_table(tmp_path: Path) -> None:
    """`validate --estimate` prices each stage by $PRICES_FILE with the given inputs, says
    which prices are unknown, and refuses a bad table naming the field."""
    prices = tmp_path / "prices.yaml"
    prices.write_text(
        "models:\n  wavespeed-ai/hunyuan-image-2.1: {usd: 0.05}\n"
        "  wavespeed-ai/hunyuan-video/i2v: {usd: 0.40, when: {duration: {10: 0.80}}}\n"
    )
    env = {"PRICES_FILE": str(prices)}
    example = "pipelines/examples/image_video_3d.yaml"
    proc = cli("validate", "--estimate", "--json", example, env=env)
    assert proc.returncode == 0, proc.stderr
    e = json.loads(proc.stdout)["estimate"]
    assert e["stages"]["image"]["usd"] == 0.05 and e["unknown"] == ["mesh"]
    assert e["expected_usd"] == 0.45 and e["worst_case_usd"] == 0.85
    table = cli("validate", "--estimate", example, env=env)
    assert "total: $0.45, $0.85 with every retry spent" in table.stdout
    assert "unknown prices: mesh" in table.stdout
    prices.write_text("models:\n  x: {usd: free}\n")
    bad = cli("validate", "--estimate", example, env=env)
    assert bad.returncode == 2 and "models.x.usd: must be a price" in bad.stderr


def test_serve_refuses_bad_config() -> None:
    """A bad variable stops `serve` with a message naming it."""
    proc = cli("serve", env={"WAVECHAIN_PORT": "http"})
    assert proc.returncode == 2 and "WAVECHAIN_PORT must be an integer" in proc.stderr
    proc = cli("serve", env={"WAVECHAIN_PORT": str(free_port())})
    assert proc.returncode == 2 and "no provider is configured" in proc.stderr
    assert "WAVESPEED_API_KEY" in proc.stderr and "AIMLAPI_KEY" in proc.stderr


def test_demo_completes_without_polling() -> None:
    """`wavechain demo` runs image → video + 3D end to end with zero result polls."""
    proc = cli("demo", "--latency", "0.2", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "image_video_3d  ✓ succeeded" in proc.stdout
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/#/runs/run_", proc.stdout)
    assert "0 result polls" in proc.stdout and "3 signed webhooks" in proc.stdout
    for line in ("/image/0.png", "/video/0.mp4", "/mesh/0.glb", "image/png", "video/mp4",
                 "model/gltf-binary", "s3://wavechain-demo/runs/"):  # fmt: skip
        assert line in proc.stdout
    events = proc.stdout.split("events received by a queue", 1)[1]
    for kind in ("run.started", "stage.submitted", "stage.succeeded", "run.succeeded"):
        assert kind in events
    assert events.count("stage.succeeded") == 3


def test_demo_json_is_the_whole_result() -> None:
    """`demo --json` prints one JSON document: the run, the S3 objects, the events and the
    dashboard's URL of the run, and nothing else."""
    proc = cli("demo", "--latency", "0.1", "--pipeline", "storyboard", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["run"]["status"] == "succeeded" and result["run"]["pipeline"] == "storyboard"
    assert result["dashboard"].endswith(f"/#/runs/{result['run']['id']}")
    assert {o["type"] for o in result["objects"]} >= {"image/png", "video/mp4"}
    assert result["provider"].get("result_polls", 0) == 0 and result["provider"]["submits"] == 3


def test_emulator_serves_faults_endpoint(stack: str) -> None:
    """Sanity: the stack's API answers readiness."""
    assert requests.get(f"{stack}/readyz", timeout=5).json() == {"ready": True, "loops": {}}


def test_events_tail_filters_and_cleans_up(moto_endpoint: str) -> None:
    """`events tail --filter` prints only matching events, then removes its queue."""
    aws = sandbox(moto_endpoint)
    env = {"SNS_TOPIC_ARN": aws.topic_arn, "AWS_ENDPOINT_URL": moto_endpoint,
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # fmt: skip
    before = len(aws.sns.list_subscriptions_by_topic(TopicArn=aws.topic_arn)["Subscriptions"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "events", "tail", "--json", "--max", "1",
         "--timeout", "30", "--filter", "event_type=run.succeeded"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while (
        len(aws.sns.list_subscriptions_by_topic(TopicArn=aws.topic_arn)["Subscriptions"]) == before
    ):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
        time.sleep(0.1)
    for kind in ("run.started", "run.succeeded"):
        body = {"version": 1, "id": kind, "type": kind, "run_id": "r1", "status": "x", "time": "t"}
        aws.sns.publish(
            TopicArn=aws.topic_arn, Message=json.dumps(body),
            MessageAttributes={"event_type": {"DataType": "String", "StringValue": kind}},
        )  # fmt: skip
    out, err = proc.communicate(timeout=40)
    assert proc.returncode == 0, err
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["run.succeeded"]
    after = aws.sns.list_subscriptions_by_topic(TopicArn=aws.topic_arn)["Subscriptions"]
    assert len(after) == before
    assert not [q for q in aws.sqs.list_queues().get("QueueUrls", []) if "wavechain-tail-" in q]


def test_debug_logs_of_the_whole_demo_hold_no_secrets() -> None:
    """At DEBUG, nothing secret reaches a log line: webhook secrets, tokens, API keys,
    presigned signatures or AWS credentials."""
    import re

    proc = cli("--log-level", "DEBUG", "--log-json", "demo", "--latency", "0.2", timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    # The scan must see what it guards: webhook paths (tokens) went through the logs.
    assert sum("/webhooks/wavespeed/[redacted]" in line for line in lines) >= 3
    leaks = {
        "webhook secret": re.compile(r"whsec_[A-Za-z0-9+/=]{4,}"),
        "webhook token": re.compile(r"/webhooks/wavespeed/(?!\[redacted\])[A-Za-z0-9_-]{16,}"),
        "presigned signature": re.compile(r"X-Amz-Signature=(?!\[redacted\])[0-9a-f]{8,}"),
        "aws credential": re.compile(r"X-Amz-Credential=(?!\[redacted\])\w"),
        "bearer key": re.compile(r"Bearer (?!\[redacted\])\S+"),
        "sigv4 header": re.compile(r"Signature=[0-9a-f]{64}"),
    }
    assert not [line for line in lines if "169.254.169.254" in line], "AWS metadata was queried"
    for line in lines + proc.stdout.splitlines():
        for what, pattern in leaks.items():
            assert not pattern.search(line), f"{what} leaked: {line[:300]}"


def test_retry_command(stack: str) -> None:
    """`retry` says when there is nothing to retry; `--from` re-runs a stage and downstream."""
    run = json.loads(cli("run", "image_video_3d", "--wait", "--json", "--server", stack).stdout)
    nothing = cli("retry", run["id"], "--server", stack)
    assert nothing.returncode == 2 and "nothing to retry" in nothing.stderr
    again = cli("retry", run["id"], "--from", "video", "--wait", "--json", "--server", stack)
    assert again.returncode == 0, again.stderr
    stages = {s["name"]: s["attempt"] for s in json.loads(again.stdout)["stages"]}
    assert stages == {"image": 1, "video": 2, "mesh": 1}


def test_serve_beyond_loopback_needs_a_token_or_an_explicit_opt_out(tmp_path: Path) -> None:
    """Bound to 0.0.0.0 with no API token, `serve` refuses to start and says why; with a
    token, or with --insecure-no-auth (logged as a warning), it serves."""
    emu = "http://127.0.0.1:9"  # never reached: refused before anything starts
    base = {"WAVESPEED_BASE_URL": emu, "AIMLAPI_BASE_URL": emu, "DATABASE_URL":
            f"sqlite:///{tmp_path}/s.db", "WAVESPEED_WEBHOOK_SECRETS": SECRET}  # fmt: skip
    everywhere = "0.0.0.0"  # noqa: S104 - what the test is about
    proc = cli("serve", "--host", everywhere, env={**base, "WAVECHAIN_PORT": str(free_port())})
    assert proc.returncode == 2
    assert "without WAVECHAIN_API_TOKEN" in proc.stderr and "--insecure-no-auth" in proc.stderr
    for extra_args, extra_env in (
        (["--insecure-no-auth"], {}),
        ([], {"WAVECHAIN_API_TOKEN": "t0ken-for-the-test"}),
    ):
        port = free_port()
        env = {**base, **extra_env, "WAVECHAIN_PORT": str(port)}
        log = tmp_path / f"serve-{port}.log"
        with wavechain("--log-json", "serve", "--host", everywhere, *extra_args, port=port,
                       log=log, env=env):  # fmt: skip
            assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        assert ("service.insecure_no_auth" in log.read_text()) == bool(extra_args)


def test_run_takes_a_deadline_and_a_budget_and_spend_reports(stack: str) -> None:
    """`run --deadline --budget-usd`: the run carries both; a budget the shipped price
    table cannot check (image and 3D prices unknown) is refused, naming why; `spend`
    reports what was spent (i2v's published $0.40 per run so far, at least)."""
    proc = cli("run", "image_video_3d", "--deadline", "600", "--priority", "interactive",
               "--concurrency-key", "acme", "--concurrency-limit", "2", "--wait", "--json",
               "--server", stack)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)
    assert run["deadline_at"] is not None and run["budget_usd"] is None
    assert (run["priority"], run["concurrency_key"], run["concurrency_limit"]) == (9, "acme", 2)
    assert run["cost_usd"] is None and run["cost_known_usd"] == 0.4  # image, 3D unknown
    refused = cli("run", "image_video_3d", "--budget-usd", "5", "--server", stack)
    assert refused.returncode == 2 and "no known price" in refused.stderr, refused.stderr
    spend = cli("spend", "--by", "model", "--json", "--server", stack)
    report = json.loads(spend.stdout)
    by_model = {g["key"]: g for g in report["groups"]}
    assert by_model["wavespeed-ai/hunyuan-video/i2v"]["usd"] >= 0.4
    assert by_model["wavespeed-ai/hunyuan-image-2.1"]["unknown"] >= 1
    table = cli("spend", "--server", stack)
    assert "without a known price" in table.stdout and "DAY" in table.stdout
