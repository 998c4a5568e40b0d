"""Logging: plain lines, every record scrubbed of secrets, chatty libraries kept quiet.

:func:`install_log_scrubber` wraps the process's log record factory, so every record of every
logger (the broker's, uvicorn's, a library's), whichever handler later writes it, has its message
and any traceback passed through :func:`broker.domain.scrub.scrub_text` when it is created. The
libraries that log request bodies, headers or signing material at DEBUG/INFO (botocore, hvac via
urllib3/requests, httpx) are held at WARNING whatever the broker's level.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
from typing import Any

from broker.domain.scrub import scrub_text

#: Libraries that log request bodies, headers or signing material at DEBUG/INFO.
QUIET_LOGGERS = (
    "botocore",
    "boto3",
    "s3transfer",
    "urllib3",
    "requests",
    "hvac",
    "httpx",
    "httpcore",
    "grpc",
    "opentelemetry",
)
#: Longest log message kept (a message is never the place for a payload).
MAX_MESSAGE = 8192

_lock = threading.Lock()
#: The record factory wrapped by the scrubber (set once installed).
_state: dict[str, Any] = {}


def scrub_record(record: logging.LogRecord) -> logging.LogRecord:
    """Replace a record's message, traceback and stack with scrubbed text (idempotent)."""
    if getattr(record, "broker_scrubbed", False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # a bad format string must not hide the record
        message = f"{record.msg!r} {record.args!r}"
    record.msg = scrub_text(message, limit=MAX_MESSAGE)
    record.args = None
    if record.exc_info and record.exc_info[0] is not None:
        text = "".join(traceback.format_exception(*record.exc_info))
        # Formatters print a record's exc_text when it is set instead of formatting exc_info.
        record.exc_text = scrub_text(text.rstrip("\n"), limit=None)
    elif record.exc_text:
        record.exc_text = scrub_text(record.exc_text, limit=None)
    if record.stack_info:
        record.stack_info = scrub_text(record.stack_info, limit=None)
    record.broker_scrubbed = True
    return record


class ScrubbingFilter(logging.Filter):
    """A handler filter doing the same, for handlers created outside this process's factory."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


def install_log_scrubber() -> None:
    """Scrub every log record this process creates from now on (safe to call again)."""
    with _lock:
        if "original" in _state:
            return
        original = _state["original"] = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return scrub_record(original(*args, **kwargs))

        logging.setLogRecordFactory(factory)


def quiet_libraries() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class JsonLines(logging.Formatter):
    """One JSON object per record (``broker serve --json``): time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        scrub_record(record)  # the message and traceback come from the scrubbed record only
        body = {
            "time": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:
            body["exception"] = record.exc_text
        return json.dumps(body, ensure_ascii=False)


def configure_logging(level: str = "info", *, json_lines: bool = False) -> None:
    """Set up the process's logging: level, format, scrubbing, quiet libraries."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if json_lines:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLines())
    install_log_scrubber()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ScrubbingFilter) for f in handler.filters):
            handler.addFilter(ScrubbingFilter())
    quiet_libraries()
