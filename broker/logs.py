"""Logging set-up: plain structured lines, and library loggers that could print secrets kept quiet."""

from __future__ import annotations

import logging

#: Libraries that log request bodies, headers or signing material at DEBUG/INFO.
QUIET_LOGGERS = ("botocore", "boto3", "urllib3", "hvac", "httpx", "httpcore", "s3transfer")


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
