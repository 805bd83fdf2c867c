"""A local S3/SNS/SQS endpoint (moto server, its own process) and helpers to use it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from tests.support.procs import free_port, wait_listening

REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@contextmanager
def moto_server(log: Path) -> Iterator[str]:
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=out,
        )  # fmt: skip
    try:
        wait_listening(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def clients(endpoint: str) -> tuple[Any, Any, Any]:
    kw: dict[str, Any] = {"endpoint_url": endpoint, "region_name": REGION, **CREDENTIALS}
    return boto3.client("s3", **kw), boto3.client("sns", **kw), boto3.client("sqs", **kw)


@dataclass
class AwsSandbox:
    """A fresh bucket, topic and subscribed queue on the local endpoint."""

    endpoint: str
    bucket: str
    topic_arn: str
    queue_url: str
    s3: Any
    sns: Any
    sqs: Any

    def subscribe(self, filter_policy: dict[str, Any] | None = None) -> str:
        return subscribe_queue(self.sns, self.sqs, self.topic_arn, filter_policy)

    def receive(self, queue_url: str | None = None, *, wait_s: int = 1) -> list[dict[str, Any]]:
        """Drain a queue: every message body (raw delivery) with its attributes."""
        out: list[dict[str, Any]] = []
        while True:
            answer = self.sqs.receive_message(
                QueueUrl=queue_url or self.queue_url, MaxNumberOfMessages=10,
                WaitTimeSeconds=wait_s, MessageAttributeNames=["All"],
            )  # fmt: skip
            messages = answer.get("Messages", [])
            if not messages:
                return out
            for m in messages:
                attrs = {k: v["StringValue"] for k, v in m.get("MessageAttributes", {}).items()}
                out.append({"body": json.loads(m["Body"]), "attributes": attrs})
                self.sqs.delete_message(
                    QueueUrl=queue_url or self.queue_url, ReceiptHandle=m["ReceiptHandle"]
                )

    def sha256_tag(self, key: str) -> str | None:
        tags = self.s3.get_object_tagging(Bucket=self.bucket, Key=key)["TagSet"]
        return next((t["Value"] for t in tags if t["Key"] == "sha256"), None)

    def objects(self) -> dict[str, dict[str, Any]]:
        listing = self.s3.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return {o["Key"]: self.s3.head_object(Bucket=self.bucket, Key=o["Key"]) for o in listing}


def subscribe_queue(
    sns: Any, sqs: Any, topic_arn: str, filter_policy: dict[str, Any] | None
) -> str:
    queue_url = sqs.create_queue(QueueName=f"q-{uuid.uuid4().hex[:12]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    attributes = {"RawMessageDelivery": "true"}
    if filter_policy:
        attributes["FilterPolicy"] = json.dumps(filter_policy)
    sns.subscribe(
        TopicArn=topic_arn, Protocol="sqs", Endpoint=arn["Attributes"]["QueueArn"],
        Attributes=attributes,
    )  # fmt: skip
    return str(queue_url)


def sandbox(endpoint: str) -> AwsSandbox:
    s3, sns, sqs = clients(endpoint)
    name = f"wavechain-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    topic = sns.create_topic(Name=name)["TopicArn"]
    queue = subscribe_queue(sns, sqs, topic, None)
    return AwsSandbox(endpoint, name, topic, queue, s3, sns, sqs)
