"""Read-only S3 access for ingesting CloudTrail files (``s3://bucket/prefix`` sources).

Kept beside the STS backend because boto3 lives in ``broker/backends``; it mints nothing. The
broker needs only ``s3:ListBucket`` on the prefix and ``s3:GetObject`` on its objects.
"""

from __future__ import annotations

from collections.abc import Iterator

import boto3
from botocore.config import Config

from broker.settings import AwsSettings

#: Largest object read (CloudTrail's files are far smaller).
MAX_OBJECT_BYTES = 256 * 1024 * 1024


class S3ObjectStore:
    """Lists and reads objects with the standard AWS credential chain."""

    def __init__(self, settings: AwsSettings) -> None:
        self.client = boto3.client(
            "s3",
            region_name=settings.region,
            endpoint_url=settings.endpoint_url,
            config=Config(
                connect_timeout=settings.timeout,
                read_timeout=settings.timeout * 6,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )

    def list_objects(self, bucket: str, prefix: str) -> Iterator[tuple[str, int, str]]:
        """``(key, size, etag)`` of every object under ``prefix``, in key order."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"], int(obj["Size"]), str(obj.get("ETag", "")).strip('"')

    def read_object(self, bucket: str, key: str) -> bytes:
        body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
        data: bytes = body.read(MAX_OBJECT_BYTES + 1)
        if len(data) > MAX_OBJECT_BYTES:
            raise ValueError(f"s3://{bucket}/{key} is larger than {MAX_OBJECT_BYTES} bytes")
        return data
