"""Typed errors of the agent client: each says what failed and what the agent should do next.

    BrokerClientError                      root; ``code``, ``detail``, ``next_step``, ``status``
    ├── ConfigurationError                 no broker URL, an unsafe URL, a bad option
    │   └── IdTokenUnavailable             no ID token could be found or fetched
    ├── BrokerUnreachable                  the network failed; nothing is known to have happened
    ├── AuthenticationError        401     the ID token or the session was refused
    ├── InvalidRequest             400/422 the request does not fit the scope or the API
    ├── Forbidden                  403     authenticated, but not allowed
    │   └── RequestDenied          403     the task was denied, with the ``reason``
    ├── NotFound                   404
    ├── Conflict                   409/412 the task's state does not allow this
    │   ├── TaskExpired                    the request, approval or credential expired
    │   └── TaskEnded                      the task was cancelled, revoked or completed
    ├── ApprovalPending                    still waiting for an approver (``approvers`` says who)
    ├── RateLimited                429     ``retry_after`` seconds
    ├── ServiceUnavailable         5xx     the broker or a backend is down; retry later
    ├── ScopeMisconfigured         500     the scope's backend setup is incomplete; retrying cannot help
    └── CompletionFailed                   the task could not be completed; it expires on its own

No secret (ID token, session token, credential) is ever part of an error.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.client.models import Task


class BrokerClientError(Exception):
    """Root of every error the client raises on purpose."""

    code: str = "client_error"

    def __init__(
        self,
        detail: str,
        *,
        next_step: str | None = None,
        code: str | None = None,
        status: int | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        self.detail = detail
        self.next_step = next_step
        self.status = status
        self.problem = problem or {}
        if code is not None:
            self.code = code
        super().__init__(detail)

    def __str__(self) -> str:
        if self.next_step:
            return f"{self.detail} (next: {self.next_step})"
        return self.detail

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (for ``--json`` output and MCP tool errors)."""
        out: dict[str, Any] = {"error": self.code, "detail": self.detail}
        if self.next_step:
            out["next_step"] = self.next_step
        if self.status is not None:
            out["status"] = self.status
        return out


class ConfigurationError(BrokerClientError):
    code = "client_configuration"


class IdTokenUnavailable(ConfigurationError):
    code = "id_token_unavailable"


class BrokerUnreachable(BrokerClientError):
    code = "broker_unreachable"


class AuthenticationError(BrokerClientError):
    code = "unauthenticated"


class InvalidRequest(BrokerClientError):
    code = "invalid_request"

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Per-field errors when the broker sent them."""
        value = self.problem.get("errors")
        return value if isinstance(value, list) else []


class Forbidden(BrokerClientError):
    code = "forbidden"


class RequestDenied(Forbidden):
    """The task was denied, by policy at request time or by an approver."""

    code = "request_denied"

    def __init__(self, detail: str, *, reason: str | None, task_id: str | None, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.reason = reason
        self.task_id = task_id


class NotFound(BrokerClientError):
    code = "not_found"


class Conflict(BrokerClientError):
    code = "conflict"


class TaskExpired(Conflict):
    code = "task_expired"


class TaskEnded(Conflict):
    code = "task_ended"


class ApprovalPending(BrokerClientError):
    """The task still waits for a human approver; it stays open on the broker."""

    code = "approval_pending"

    def __init__(self, task: Task, approvers: str | None) -> None:
        who = approvers or "an approver named by the scope's approval rule"
        expires = ""
        if task.request_expires_at:
            left = max(0, int(task.request_expires_at - time.time()))
            expires = f"; the request expires in {format_duration(left)}"
        super().__init__(
            f"task {task.id} for scope {task.scope!r} is waiting for approval by {who}{expires}",
            next_step=(
                f"ask {who} to approve task {task.id}, then continue with "
                f"`broker status {task.id} --wait`; or cancel it with `broker complete {task.id}`"
            ),
        )
        self.task = task
        self.approvers = approvers
        self.cancelled = False

    def mark_cancelled(self) -> None:
        """The pending task was cancelled on the way out (a ``with`` block that never started)."""
        self.cancelled = True
        who = self.approvers or "an approver"
        self.next_step = (
            f"the task was cancelled; ask {who} to stand by, then request again with a longer wait"
        )


class RateLimited(BrokerClientError):
    code = "rate_limited"

    def __init__(self, detail: str, *, retry_after: float, **kw: Any) -> None:
        self.retry_after = max(0.0, float(retry_after))
        self.retry_at = time.time() + self.retry_after
        kw.setdefault("next_step", f"retry in {format_duration(self.retry_after)}")
        super().__init__(detail, **kw)

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "retry_after": self.retry_after}


class ServiceUnavailable(BrokerClientError):
    code = "service_unavailable"

    def __init__(self, detail: str, *, retry_after: float | None = None, **kw: Any) -> None:
        self.retry_after = retry_after
        kw.setdefault(
            "next_step",
            f"retry in {format_duration(retry_after)}"
            if retry_after
            else "retry in a minute; if it persists, tell the broker's operators",
        )
        super().__init__(detail, **kw)


class ScopeMisconfigured(BrokerClientError):
    """The scope names something its backend lacks (a policy, a role, a trust relationship).

    Not the request's fault and not transient: only the scope's owner can fix it. The broker
    logs the cause and shows it to admins (``/readyz``, ``broker scopes check --live``).
    """

    code = "scope_misconfigured"


class CompletionFailed(BrokerClientError):
    code = "completion_failed"


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; short and unambiguous for progress lines and errors."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
