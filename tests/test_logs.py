"""Every log line is scrubbed (message, arguments and traceback), whatever logger wrote it, and
libraries that log secrets are held at WARNING."""

from __future__ import annotations

import logging

import pytest

from broker.logs import QUIET_LOGGERS, configure_logging, install_log_scrubber

TOKEN = "s.LogCanaryVaultToken0123456789"
SESSION = "brk_sess_LogCanarySessionToken0123456789"


def test_messages_arguments_and_tracebacks_are_scrubbed(caplog: pytest.LogCaptureFixture) -> None:
    """A secret in a format argument, in the message and in an exception's text never reaches a
    handler; the rest of the line does."""
    install_log_scrubber()
    log = logging.getLogger("some.library")
    with caplog.at_level(logging.DEBUG):
        log.warning("lookup failed for %s", TOKEN)
        log.info(f"retrying with Authorization: Bearer {SESSION}")
        try:
            raise ValueError(f"backend said: invalid token {TOKEN}")
        except ValueError:
            log.exception("mint failed")
    text = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    assert TOKEN not in text and SESSION not in text
    assert "lookup failed for [REDACTED:vault_token]" in caplog.text
    assert "ValueError: backend said: invalid token [REDACTED:vault_token]" in text


def test_chatty_libraries_are_quiet() -> None:
    """botocore, hvac, urllib3, httpx and friends log nothing below WARNING, even at debug."""
    configure_logging("debug")
    for name in QUIET_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING
    assert not logging.getLogger("botocore.endpoint").isEnabledFor(logging.DEBUG)
