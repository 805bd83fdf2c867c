"""`wavechain demo`: emulator, local S3/SNS/SQS and the receiver on free ports, end to end."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import anyio.to_thread
from aiohttp import web

from pipelines.errors import ConfigError
from service.app import create_app
from service.aws import AwsClients, make_clients
from service.client import ApiClient, follow, summary
from service.middlewares import AccessLog
from service.settings import Settings
from service.tail import Tail

BUCKET = "wavechain-demo"
TOPIC = "wavechain-events"


async def _start(
    app: web.Application, port: int = 0, *, access_log: bool = False
) -> tuple[web.AppRunner, int]:
    runner = (
        web.AppRunner(app, access_log_class=AccessLog)
        if access_log
        else web.AppRunner(app, access_log=None)
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, int(runner.addresses[0][1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_aws(log: Path) -> Iterator[str]:
    """A moto server (S3, SNS, SQS over HTTP, no account) in its own process."""
    try:
        import moto.server  # noqa: F401 - only checks that the local extra is installed
    except ImportError:
        raise ConfigError(
            "the demo needs a local S3/SNS endpoint: pip install 'wavechain[local]'"
        ) from None
    port = _free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - fixed arguments, our own interpreter
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ConfigError(f"the local S3/SNS endpoint did not start; see {log}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _forever() -> None:
    import asyncio
    import contextlib

    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()


def _prepare_aws(aws: AwsClients) -> tuple[str, Tail]:
    aws.s3.create_bucket(Bucket=BUCKET)
    topic = aws.sns.create_topic(Name=TOPIC)["TopicArn"]
    return topic, Tail(aws.sns, aws.sqs, topic, {})


def _report(aws: AwsClients, tail: Tail, run_id: str, out: TextIO) -> dict[str, Any]:
    listing = aws.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{run_id}/").get("Contents", [])
    print(f"\nmirrored to s3://{BUCKET}:", file=out)
    objects = []
    for item in listing:
        head = aws.s3.head_object(Bucket=BUCKET, Key=item["Key"])
        objects.append({"key": item["Key"], "size": item["Size"], "type": head["ContentType"]})
        print(f"  {item['Key']:<52} {item['Size']:>9,} B  {head['ContentType']}", file=out)
    events: list[dict[str, Any]] = []
    while batch := tail.receive(wait_s=1):
        events.extend(batch)
    events.sort(key=lambda e: e["time"])
    print(f"\nevents received by a queue subscribed to {TOPIC}:", file=out)
    for event in events:
        print(f"  {event['type']:<16} {event.get('stage') or '':<8} {event['status']}", file=out)
    return {"objects": objects, "events": events}


async def run_demo(
    pipeline: str = "image_video_3d",
    inputs: dict[str, Any] | None = None,
    *,
    out: TextIO = sys.stdout,
    latency_s: float = 1.0,
    keep: bool = False,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``pipeline`` end to end on local parts; print what was made and the run's page
    on the dashboard; hand the result to ``on_result``. With ``keep``, everything stays up
    until Ctrl-C."""
    from emulator.app import create_emulator_app
    from emulator.faults import Faults

    started = time.monotonic()
    emulator, emulator_port = await _start(create_emulator_app(Faults(latency_s=latency_s)))
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    runners = [emulator]
    try:
        with (
            tempfile.TemporaryDirectory(prefix="wavechain-demo-") as tmp,
            local_aws(Path(tmp) / "moto.log") as aws_endpoint,
        ):
            port = _free_port()
            settings = Settings(
                port=port,
                database_url=f"sqlite:///{tmp}/state.db",
                # No keys: both providers are the local emulator.
                wavespeed_base_url=emulator_url,
                aimlapi_base_url=emulator_url,
                poll_interval_s=0.2,
                aws_endpoint_url=aws_endpoint,
                s3_bucket=BUCKET,
            )
            aws = await anyio.to_thread.run_sync(make_clients, settings)
            topic, tail = await anyio.to_thread.run_sync(_prepare_aws, aws)
            settings = settings.replace(sns_topic_arn=topic)
            runner, _ = await _start(create_app(settings), port, access_log=True)
            runners.append(runner)
            print(f"emulator   {emulator_url}  (offline WaveSpeed + AI/ML API)", file=out)
            print(f"local AWS  {aws_endpoint}  (S3 + SNS + SQS, moto)", file=out)
            print(f"wavechain  {settings.base_url}  (receiver + API, SQLite in {tmp})", file=out)
            async with aiohttp.ClientSession() as session:
                client = ApiClient(session, settings.base_url)
                run = await client.create_run(pipeline, inputs or {})
                print(f"\nrun {run['id']}: {pipeline}", file=out)
                final = await follow(client, run["id"], out)
                async with session.get(f"{emulator_url}/_emulator/stats") as resp:
                    counters = (await resp.json())["counters"]
            print(file=out)
            summary(final, out)
            report = await anyio.to_thread.run_sync(_report, aws, tail, run["id"], out)
            polls = counters.get("result_polls", 0)
            print(
                f"\nprovider: {counters.get('submits', 0)} submits, "
                f"{counters.get('webhooks_delivered', 0)} signed webhooks, "
                f"{polls} result polls; {time.monotonic() - started:.1f}s in all",
                file=out,
            )
            await anyio.to_thread.run_sync(tail.close)
            dashboard = f"{settings.base_url}/#/runs/{run['id']}"
            print(f"\ndashboard: {dashboard}", file=out)
            result = {"run": final, "provider": counters, **report, "dashboard": dashboard}
            if on_result is not None:
                on_result(result)
            if keep:
                print("kept up (the emulator, local AWS and wavechain): Ctrl-C to stop", file=out)
                await _forever()
            return result
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
