"""The ``wavechain`` command line. Only ``main()`` reads the environment."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import structlog
import yaml
from aiohttp import web

from pipelines import spec as specs
from pipelines.errors import ConfigError, SpecError
from pipelines.prices import PriceTable, estimate, load_prices
from pipelines.provenance import describe, lineage
from pipelines.providers import is_loopback
from pipelines.state import RunStatus
from pipelines.store import parse_database_url
from service.aws import make_clients
from service.client import ApiClient, ApiError, dump, follow, summary
from service.demo import run_demo
from service.logs import configure_logging
from service.serving import loop_factory, serve_until_signal
from service.settings import Settings
from service.supervisor import child_arguments, supervise
from service.tail import Tail, filter_policy, tail
from service.views import estimate_table, pipelines_table, runs_table, spend_table

log = structlog.get_logger("wavechain.cli")


def _assignment(text: str) -> tuple[str, Any]:
    """``NAME=VALUE``, the value read as a YAML scalar or list (``7`` an integer, ``true`` a
    boolean, ``[a, b]`` a list); anything else, a mapping included, stays the text."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    scalar = (str, int, float, bool)
    if value is None or isinstance(value, scalar):
        return name.strip(), raw if value is None else value
    if isinstance(value, list) and all(isinstance(v, scalar) for v in value):
        return name.strip(), value
    return name.strip(), raw


def _add_emulator(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "emulator",
        help="run the offline stand-in for WaveSpeed and the AI/ML API",
        description="An offline stand-in for api.wavespeed.ai and api.aimlapi.com: real "
        "outputs, signed webhooks, and fault knobs. Point WAVESPEED_BASE_URL and "
        "AIMLAPI_BASE_URL at it.",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8900, help="listen port (default 8900)")
    p.add_argument("--latency", type=float, help="seconds from submit to a finished task")
    p.add_argument(
        "--account-level",
        choices=["bronze", "silver", "gold", "ultra"],
        help="enforce a WaveSpeed account level's limits: tasks per minute (429 above) and "
        "tasks at once (queued above); e.g. bronze: 2 per minute, 2 at once",
    )
    p.add_argument(
        "--webhook-secret",
        help="whsec_… secret to sign webhooks with (default: $EMULATOR_WEBHOOK_SECRET or random)",
    )
    p.add_argument(
        "--fault",
        type=_assignment,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a fault, e.g. failure_rate=0.2, drop_rate=0.5, submit_error_status=503; "
        "GET /_emulator/faults lists every name",
    )


def _run_emulator(args: argparse.Namespace, env: dict[str, str]) -> int:
    from emulator.app import create_emulator_app
    from emulator.faults import FaultError, Faults

    changes = dict(args.fault)
    if args.latency is not None:
        changes["latency_s"] = args.latency
    try:
        base = Faults().at_level(args.account_level) if args.account_level else Faults()
        faults = base.updated(changes)
    except FaultError as exc:
        print(f"wavechain emulator: {exc}", file=sys.stderr)
        return 2
    secret = args.webhook_secret or env.get("EMULATOR_WEBHOOK_SECRET")
    app = create_emulator_app(faults, webhook_secret=secret)
    log.info("emulator.starting", host=args.host, port=args.port, faults=changes)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return 0


DESCRIPTION = """\
Durable, webhook-driven pipelines for Hunyuan models on WaveSpeedAI: each stage is
submitted with a webhook, advanced on the provider's signed callback, mirrored to S3
and announced on SNS.

Start with:
  wavechain demo                      the whole chain offline: emulator, local S3/SNS, SQLite
  wavechain serve                     the receiver, REST API and workers
  wavechain run FILE|EXAMPLE --wait   start a run on a server and follow it
"""


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        type=_assignment,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline input, e.g. --set prompt='a red kite' --set seed=7 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wavechain",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO; WARNING for demo)"
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="log JSON lines even on a terminal (the default elsewhere)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="run a pipeline end to end offline: emulator, local S3/SNS, SQLite",
        description="Starts the provider emulator, a local S3/SNS/SQS endpoint and the "
        "receiver on free ports, runs one bundled pipeline, and shows what was mirrored "
        "and published. Needs no account and no network.",
    )
    p.add_argument(
        "--pipeline",
        default="image_video_3d",
        help="the bundled example to run (default image_video_3d; see GET /v1/pipelines)",
    )
    _add_inputs(p)
    p.add_argument("--latency", type=float, default=1.0, help="emulated seconds per task")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep everything running afterwards, to look at the run on the dashboard",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON (the run, the S3 objects, the events, the dashboard "
        "URL) instead of the report",
    )

    p = sub.add_parser(
        "serve",
        help="run the receiver, REST API and workers",
        description="Serves the webhook receiver and the REST API, and runs the workers, "
        "the reconciliation sweeper and the event relay. Configured by environment "
        "variables (see the README).",
    )
    p.add_argument("--host", help="listen address (default $WAVECHAIN_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default $WAVECHAIN_PORT or 8000)")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="serving processes sharing the port (SO_REUSEPORT), to use N cores (default 1)",
    )
    p.add_argument(
        "--reuse-port",
        action="store_true",
        help="share the port with other serving processes (set by --processes)",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve the REST API without WAVECHAIN_API_TOKEN on a non-loopback address",
    )

    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--server", help="wavechain API base URL (default $WAVECHAIN_URL or http://127.0.0.1:8000)"
    )
    server.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser(
        "run", parents=[server], help="start a run of a pipeline file or bundled example"
    )
    p.add_argument("pipeline", help="a pipeline YAML file, or the name of a bundled example")
    _add_inputs(p)
    p.add_argument("--wait", action="store_true", help="follow progress until the run ends")
    p.add_argument(
        "--deadline",
        metavar="SECONDS|TIME",
        help="cancel what still runs after this many seconds, or at this ISO 8601 time "
        "(overrides the pipeline's deadline)",
    )
    p.add_argument(
        "--budget-usd",
        type=float,
        metavar="USD",
        help="what the run may spend (overrides the pipeline's budget_usd)",
    )
    p.add_argument(
        "--priority",
        help="batch, normal (default) or interactive (or 0..9): the order submits go in "
        "while the provider governor makes them wait",
    )
    p.add_argument(
        "--concurrency-key",
        metavar="KEY",
        help="runs sharing this key (a customer id) share --concurrency-limit",
    )
    p.add_argument(
        "--concurrency-limit",
        type=int,
        metavar="N",
        help="at most N tasks of runs with --concurrency-key at the provider at once",
    )

    p = sub.add_parser(
        "spend",
        parents=[server],
        help="what attempts cost, by day, pipeline or model",
        description="What was spent since a time (the spend ledger: the provider's figure "
        "where it gives one, else the price table's price of each attempt sent).",
    )
    p.add_argument(
        "--since",
        default="7d",
        help="7d, 24h, 30m, 2w ago, a day (2026-12-01) or an ISO 8601 time (default 7d)",
    )
    p.add_argument(
        "--by", choices=["day", "pipeline", "model"], default="day", help="group by (default day)"
    )

    p = sub.add_parser(
        "status",
        parents=[server],
        help="show one run as the tree of its stages",
        description="Shows a run's stages as the graph they form (each under the stage it "
        "waits for), with status, attempt, timings, cost, provider task id, error, and "
        "the S3 keys of the outputs.",
    )
    p.add_argument("run_id", help="the run's id (run_…)")
    p = sub.add_parser("runs", parents=[server], help="list recent runs, newest first")
    p.add_argument(
        "--status",
        choices=[status.value for status in RunStatus],
        help="only runs in this status",
    )
    p.add_argument("--pipeline", help="only runs of this pipeline")
    p.add_argument(
        "--limit", type=int, default=20, help="the most runs to list, 1..200 (default 20)"
    )
    sub.add_parser("pipelines", parents=[server], help="list the bundled pipelines and inputs")
    p = sub.add_parser("cancel", parents=[server], help="cancel a run")
    p.add_argument("run_id", help="the run's id (run_…)")
    p = sub.add_parser(
        "retry",
        parents=[server],
        help="re-run a run's failed stages, or --from STAGE and everything downstream",
    )
    p.add_argument("run_id", help="the run's id (run_…)")
    p.add_argument(
        "--from", dest="from_stage", metavar="STAGE", help="re-run this stage and its downstream"
    )
    p.add_argument("--wait", action="store_true", help="follow progress until the run ends")

    p = sub.add_parser("validate", help="check pipeline files without submitting anything")
    p.add_argument("files", nargs="+", help="pipeline YAML files")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per file: file, ok, and the pipeline's stages or the error",
    )
    p.add_argument(
        "--estimate",
        action="store_true",
        help="also estimate each file's cost with its inputs (--set), by the price table "
        "($PRICES_FILE or the shipped one): per stage, in total, and with every retry spent",
    )
    _add_inputs(p)

    p = sub.add_parser(
        "lineage",
        help="walk back from an output in S3 to the prompt that started it",
        description="Reads the provenance manifest beside an output (KEY.json) and those of "
        "the input media it was made from, down to stages made from a prompt. Reads S3 with "
        "the server's AWS settings (AWS_ENDPOINT_URL and credentials).",
    )
    p.add_argument("uri", help="an output's s3://BUCKET/KEY (from wavechain status)")
    p.add_argument("--json", action="store_true", help="print the lineage as JSON")

    p = sub.add_parser("events", help="watch lifecycle events on the SNS topic")
    events = p.add_subparsers(dest="events_command", required=True, metavar="SUBCOMMAND")
    p = events.add_parser(
        "tail",
        help="subscribe a fresh SQS queue to $SNS_TOPIC_ARN and print events as they arrive",
        description="Subscribes a fresh SQS queue to the topic, prints events as they "
        "arrive, and removes the queue and subscription when it stops.",
    )
    p.add_argument("--topic-arn", help="the SNS topic (default $SNS_TOPIC_ARN)")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="SNS filter policy on an attribute (event_type, pipeline, run_id, stage, model, "
        "status), e.g. --filter event_type=stage.succeeded,run.failed",
    )
    p.add_argument("--json", action="store_true", help="print each event's JSON")
    p.add_argument("--max", type=int, help="stop after this many events")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")

    _add_emulator(sub)
    return parser


def _validate(
    files: Sequence[str],
    *,
    as_json: bool = False,
    prices: PriceTable | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> int:
    failed = False
    for name in files:
        try:
            pipeline = specs.load_file(name)
            cost = (
                estimate(pipeline, inputs or {}, prices, where=name) if prices is not None else None
            )
        except SpecError as exc:
            failed = True
            if as_json:
                print(json.dumps({"file": name, "ok": False, "error": str(exc)}))
            else:
                print(exc, file=sys.stderr)
            continue
        if as_json:
            stages = {
                n: {"model": s.model, "needs": list(s.needs)} for n, s in pipeline.stages.items()
            }
            line = {"file": name, "ok": True, "pipeline": pipeline.name, "stages": stages}
            print(json.dumps(line | ({"estimate": cost} if cost is not None else {})))
            continue
        chain = ", ".join(f"{n} ({s.model})" for n, s in pipeline.stages.items())
        print(f"ok: {name}: pipeline '{pipeline.name}': {chain}")
        if cost is not None:
            print(estimate_table(cost))
    return 1 if failed else 0


def _pipeline_arg(value: str) -> Any:
    """A file is validated here and sent inline; anything else names a bundled example."""
    path = Path(value)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return specs.load_file(path).source
    return value


async def _show(
    client: ApiClient, run: dict[str, Any], args: argparse.Namespace, *, wait: bool = False
) -> int:
    """Optionally follow a run to its end, print it (JSON or summary), return an exit code."""
    if wait:
        run = await follow(client, run["id"], sys.stdout, quiet=args.json)
    dump(run, sys.stdout) if args.json else summary(run, sys.stdout)
    return 0 if run["status"] in ("succeeded", "running") else 1


def _deadline_arg(value: str | None) -> str | float | None:
    """--deadline: seconds (a number), or an ISO 8601 time left as text."""
    return float(value) if value is not None and value.replace(".", "", 1).isdigit() else value


async def _start_run(client: ApiClient, args: argparse.Namespace) -> dict[str, Any]:
    priority = args.priority
    return await client.create_run(
        _pipeline_arg(args.pipeline),
        dict(args.set),
        deadline=_deadline_arg(args.deadline),
        budget_usd=args.budget_usd,
        priority=int(priority) if priority is not None and priority.isdigit() else priority,
        concurrency=(args.concurrency_key, args.concurrency_limit),
    )


def _print(args: argparse.Namespace, value: Any, as_text: Callable[[Any], str]) -> int:
    """``value`` as JSON with --json, else as text."""
    if args.json:
        dump(value, sys.stdout)
    else:
        print(as_text(value))
    return 0


async def _client_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    base = args.server or env.get("WAVECHAIN_URL") or "http://127.0.0.1:8000"
    token = env.get("WAVECHAIN_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        client = ApiClient(session, base)
        if args.command == "run":
            run = await _start_run(client, args)
            if args.wait and not args.json:
                print(f"run {run['id']}: {run['pipeline']}")
            return await _show(client, run, args, wait=args.wait)
        if args.command == "status":
            await _show(client, await client.get_run(args.run_id), args)
            return 0
        if args.command == "runs":
            if not 1 <= args.limit <= 200:
                raise SpecError(f"--limit must be in range 1..200, got {args.limit}")
            runs = await client.list_runs(args.limit, status=args.status, pipeline=args.pipeline)
            return _print(args, runs, lambda r: runs_table(r, time.time()))
        if args.command == "spend":
            return _print(args, await client.spend(since=args.since, by=args.by), spend_table)
        if args.command == "pipelines":
            return _print(args, await client.pipelines(), pipelines_table)
        if args.command == "retry":
            run = await client.retry(args.run_id, args.from_stage)
            return await _show(client, run, args, wait=args.wait)
        if args.command == "cancel":
            await _show(client, await client.cancel(args.run_id), args)
            return 0
    raise AssertionError(args.command)


def _serve(args: argparse.Namespace, env: Mapping[str, str], argv: Sequence[str]) -> int:
    settings = Settings.from_env(env)
    if args.host:
        settings = settings.replace(host=args.host)
    if args.port is not None:
        settings = settings.replace(port=args.port)
    if settings.api_token is None and not is_loopback(f"http://{_bracketed(settings.host)}"):
        if not args.insecure_no_auth:
            raise ConfigError(
                f"listening on {settings.host}, beyond this machine, without "
                "WAVECHAIN_API_TOKEN: anyone who can reach the port could start paid runs. "
                "Set WAVECHAIN_API_TOKEN, listen on 127.0.0.1, or pass --insecure-no-auth"
            )
        log.warning("service.insecure_no_auth", host=settings.host)
    if args.processes > 1:
        if not 2 <= args.processes <= 64:
            raise ConfigError("--processes must be in range 1..64")
        if settings.port == 0:
            raise ConfigError("--processes needs a fixed port (not 0) to share")
        if parse_database_url(settings.database_url).backend == "sqlite":
            # Measured (tests/bench/RESULTS.md, scale): two processes on one SQLite file
            # made less than one, as every write waits for the file's one lock.
            raise ConfigError(
                "--processes needs DATABASE_URL=postgresql://…: on SQLite, several processes "
                "share one write lock and made fewer deliveries/s than one process"
            )
        return supervise(child_arguments(argv), args.processes, env)
    log.info("service.starting", host=settings.host, port=settings.port)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve_until_signal(settings, reuse_port=args.reuse_port))
    return 0


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _lineage(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    if not args.uri.startswith("s3://") or "/" not in args.uri.removeprefix("s3://"):
        raise SpecError(f"uri: must be s3://BUCKET/KEY, got {args.uri[:100]!r}")
    s3 = make_clients(Settings.from_env(env)).s3

    def read(uri: str) -> dict[str, Any] | None:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None
        doc = json.loads(body)
        return doc if isinstance(doc, dict) else None

    found = lineage(args.uri, read)
    if args.json:
        dump(found, sys.stdout)
    else:
        print("\n".join(describe(found)))
    return 0 if "missing" not in found else 1


def _events_tail(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = Settings.from_env(env)
    topic = args.topic_arn or settings.sns_topic_arn
    if not topic:
        raise ConfigError("no topic: pass --topic-arn or set SNS_TOPIC_ARN")
    policy = filter_policy(args.filter)
    aws = make_clients(settings)
    subscription = Tail(aws.sns, aws.sqs, topic, policy)
    try:
        tail(
            subscription,
            sys.stdout,
            as_json=args.json,
            max_events=args.max,
            timeout_s=args.timeout,
        )
    except KeyboardInterrupt:
        pass
    finally:
        subscription.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(os.environ)
    default_level = "WARNING" if args.command == "demo" else "INFO"
    configure_logging(json=args.log_json, level=args.log_level or default_level)
    try:
        if args.command == "emulator":
            return _run_emulator(args, env)
        if args.command == "validate":
            prices = load_prices(env.get("PRICES_FILE") or None) if args.estimate else None
            return _validate(args.files, as_json=args.json, prices=prices, inputs=dict(args.set))
        if args.command == "serve":
            return _serve(args, env, sys.argv[1:] if argv is None else argv)
        if args.command == "events":
            return _events_tail(args, env)
        if args.command == "lineage":
            return _lineage(args, env)
        if args.command == "demo":
            try:
                result = asyncio.run(
                    run_demo(
                        args.pipeline,
                        dict(args.set),
                        latency_s=args.latency,
                        keep=args.keep,
                        out=io.StringIO() if args.json else sys.stdout,
                        on_result=(lambda r: dump(r, sys.stdout)) if args.json else None,
                    )
                )
            except KeyboardInterrupt:
                return 0
            return 0 if result["run"]["status"] == "succeeded" else 1
        return asyncio.run(_client_command(args, env))
    except (ConfigError, SpecError, ApiError) as exc:
        print(f"wavechain {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
