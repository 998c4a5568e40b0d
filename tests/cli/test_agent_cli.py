"""The agent CLI's local pieces: parameter typing and the approval progress indicator."""

from __future__ import annotations

import io
import time

import pytest

from broker.cli.agent import Progress, _parse_params
from broker.client._protocol import WaitStatus
from broker.client.errors import InvalidRequest
from broker.client.models import Task

SCOPE = {
    "name": "s",
    "parameters": {
        "type": "object",
        "properties": {
            "bucket": {"type": "string"},
            "days": {"type": "integer"},
            "dry_run": {"type": "boolean"},
        },
        "required": ["bucket"],
    },
}


def test_params_are_typed_by_the_scope() -> None:
    """-p values become the scope's declared types; key:=JSON passes JSON as is; bad input is a
    usage error, never a request."""
    assert _parse_params(
        ["bucket=example-data-x", "days=7", "dry_run=TRUE", 'tags:=["a","b"]'], SCOPE
    ) == {"bucket": "example-data-x", "days": 7, "dry_run": True, "tags": ["a", "b"]}
    assert _parse_params(["days=7"], None) == {"days": "7"}
    for bad in (["days=seven"], ["dry_run=maybe"], ["novalue"], ["x:={"]):
        with pytest.raises(InvalidRequest):
            _parse_params(bad, SCOPE)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def status(waited: float = 0.0) -> WaitStatus:
    task = Task.from_json(
        {
            "id": "tsk_wait",
            "scope": "postgres-readwrite",
            "state": "pending",
            "request_expires_at": time.time() + 3600,
        }
    )
    return WaitStatus(task, "1 approver with groups equals 'dba', never the requester", waited)


def test_progress_names_the_approvers_once_per_30s_when_not_a_terminal() -> None:
    """In a log (no terminal), the waiting line is printed once, then at most every 30 s; it names
    the task, the approvers and when the request expires."""
    out = io.StringIO()
    progress = Progress(out)
    progress(status())
    progress(status(1.0))
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("broker: waiting for approval of tsk_wait (postgres-readwrite)")
    assert "by 1 approver with groups equals 'dba', never the requester" in lines[0]
    assert "request expires in 59m" in lines[0] or "request expires in 1h" in lines[0]


def test_progress_animates_on_a_terminal_and_clears_its_line() -> None:
    """On a terminal the line is redrawn in place with a spinner and cleared when the wait ends."""
    out = Terminal()
    progress = Progress(out)
    progress(status())
    deadline = time.monotonic() + 5
    while out.getvalue().count("\r") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    progress.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K") >= 2
    assert "groups equals 'dba'" in text
    assert text.endswith("\r\x1b[K")


def test_quiet_progress_prints_nothing() -> None:
    """--quiet keeps stderr clean (credential_process output relies on it)."""
    out = io.StringIO()
    progress = Progress(out, quiet=True)
    progress(status())
    progress.close()
    assert out.getvalue() == ""
