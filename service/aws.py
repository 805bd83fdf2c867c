"""boto3 clients, built once per process and shared (clients are thread-safe; sessions not)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config

from service.settings import Settings


@dataclass(frozen=True, slots=True)
class AwsClients:
    s3: Any
    sns: Any
    sqs: Any


def make_clients(settings: Settings) -> AwsClients:
    session = boto3.session.Session(region_name=settings.aws_region)
    config = Config(
        max_pool_connections=max(10, settings.aws_concurrency * 2),
        connect_timeout=3,
        read_timeout=60,
        # Our jobs retry with their own backoff; botocore only smooths over blips.
        retries={"max_attempts": 2, "mode": "standard"},
    )
    kwargs: dict[str, Any] = {"config": config}
    if settings.aws_endpoint_url:
        # A local endpoint (moto) takes any keys. Never walk boto3's credential chain here:
        # it would query the EC2 metadata address, which is not ours to call.
        key, secret = settings.aws_access_key_id, settings.aws_secret_access_key
        kwargs |= {
            "endpoint_url": settings.aws_endpoint_url,
            "aws_access_key_id": key.reveal() if key else "local",
            "aws_secret_access_key": secret.reveal() if secret else "local",
        }
    # SigV4 for S3 too (presigned URLs included); SNS and SQS sign with SigV4 by default.
    s3_kwargs = kwargs | {"config": config.merge(Config(signature_version="s3v4"))}
    if (settings.aws_endpoint_url or "").startswith("http://"):
        # The mirror streams a download straight into PutObject, so the body can be read
        # only once. Over TLS botocore sends such a body unsigned with a trailing checksum;
        # over plain HTTP it would read the body first to sign and checksum it. There,
        # send it unsigned and without the optional checksum.
        s3_kwargs["config"] = s3_kwargs["config"].merge(
            Config(
                request_checksum_calculation="when_required", s3={"payload_signing_enabled": False}
            )
        )
    return AwsClients(
        s3=session.client("s3", **s3_kwargs),
        sns=session.client("sns", **kwargs),
        sqs=session.client("sqs", **kwargs),
    )
