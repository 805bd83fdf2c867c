"""`wavechain events tail`: a consumer example. Subscribes an SQS queue to the topic
(with an optional filter policy on the message attributes) and prints events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from pipelines.errors import ConfigError
from pipelines.events import ATTRIBUTES


def filter_policy(filters: Sequence[str]) -> dict[str, list[str]]:
    """``event_type=stage.succeeded,run.failed`` → ``{"event_type": ["stage.succeeded", ...]}``."""
    policy: dict[str, list[str]] = {}
    for item in filters:
        name, sep, values = item.partition("=")
        if not sep or name not in ATTRIBUTES or not values:
            raise ConfigError(
                f"--filter {item!r}: expected NAME=V1,V2 with NAME one of {', '.join(ATTRIBUTES)}"
            )
        policy.setdefault(name, []).extend(v.strip() for v in values.split(",") if v.strip())
    return policy


class Tail:
    """A queue subscribed to the topic; ``close()`` removes both subscription and queue."""

    def __init__(self, sns: Any, sqs: Any, topic_arn: str, policy: Mapping[str, list[str]]):
        self._sns, self._sqs = sns, sqs
        name = f"wavechain-tail-{uuid.uuid4().hex[:10]}"
        self.queue_url: str = sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])
        queue_arn = arn["Attributes"]["QueueArn"]
        # Real SQS accepts SNS deliveries only when the queue's policy allows the topic.
        sqs.set_queue_attributes(
            QueueUrl=self.queue_url,
            Attributes={
                "Policy": json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Principal": {"Service": "sns.amazonaws.com"},
                                "Action": "sqs:SendMessage",
                                "Resource": queue_arn,
                                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
                            }
                        ],
                    }
                )
            },
        )
        attributes = {"RawMessageDelivery": "true"}
        if policy:
            attributes["FilterPolicy"] = json.dumps(policy)
        self.subscription_arn: str = sns.subscribe(
            TopicArn=topic_arn,
            Protocol="sqs",
            Endpoint=queue_arn,
            Attributes=attributes,
            ReturnSubscriptionArn=True,
        )["SubscriptionArn"]

    def receive(self, wait_s: int = 10) -> list[dict[str, Any]]:
        answer = self._sqs.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_s
        )
        events = []
        for message in answer.get("Messages", []):
            events.append(json.loads(message["Body"]))
            self._sqs.delete_message(
                QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"]
            )
        return events

    def close(self) -> None:
        self._sns.unsubscribe(SubscriptionArn=self.subscription_arn)
        self._sqs.delete_queue(QueueUrl=self.queue_url)


def format_event(event: Mapping[str, Any]) -> str:
    where = f"{event.get('run_id')}" + (f"/{event['stage']}" if event.get("stage") else "")
    outputs = " ".join(event.get("outputs") or [])
    error = f" error={event['error']}" if event.get("error") else ""
    kind = f"{event.get('type'):<16}"
    return f"{event.get('time')} {kind} {where} {event.get('status')} {outputs}{error}"


def tail(
    tail: Tail,
    out: TextIO,
    *,
    as_json: bool,
    max_events: int | None,
    timeout_s: float | None,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    seen = 0
    deadline = clock() + timeout_s if timeout_s else None
    while max_events is None or seen < max_events:
        if deadline is not None and clock() >= deadline:
            break
        wait = 10 if deadline is None else max(0, min(10, int(deadline - clock())))
        for event in tail.receive(wait_s=wait):
            print(json.dumps(event) if as_json else format_event(event), file=out, flush=True)
            seen += 1
    return seen
