"""The HTTP conversation with the broker, without I/O: what to send, how to read the answer.

The sync and async clients share this module and differ only in how they send and sleep.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

import broker
from broker.client.errors import (
    AuthenticationError,
    BrokerClientError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    RateLimited,
    RequestDenied,
    ScopeMisconfigured,
    ServiceUnavailable,
    TaskEnded,
    TaskExpired,
)
from broker.client.models import Task, describe_approval

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"  # noqa: S105  # a URN
USER_AGENT = f"broker-client/{broker.__version__}"

#: Longest single long-poll (``GET /v1/tasks/{id}?wait=``); proxies often cut idle requests at 60 s.
LONG_POLL_MAX = 25.0
#: Polling backoff when the broker answers at once (no long-poll): 1 s, 2 s, 4 s ... up to 10 s.
POLL_INITIAL = 1.0
POLL_MAX = 10.0
#: Session codes after which a fresh exchange may help (the session ended or expired).
SESSION_CODES = frozenset({"invalid_session", "session_expired", "session_ended", "missing_token"})
EXPIRED_CODES = frozenset(
    {"approval_expired", "request_expired", "task_expired", "credential_expired", "expired"}
)


def exchange_form(id_token: str) -> dict[str, str]:
    """RFC 8693 token exchange of an ID token for a broker session."""
    return {
        "grant_type": GRANT_TYPE,
        "subject_token_type": ID_TOKEN_TYPE,
        "subject_token": id_token,
    }


def base_headers(traceparent: str | None, conversation_id: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if traceparent:
        headers["traceparent"] = traceparent
    if conversation_id:
        headers["X-Conversation-Id"] = conversation_id
    return headers


def task_body(
    scope: str, params: dict[str, Any] | None, purpose: str, ttl: int | None
) -> dict[str, Any]:
    if not scope:
        raise InvalidRequest("a scope name is required", next_step="name the scope to request")
    if not purpose or not purpose.strip():
        raise InvalidRequest(
            "a purpose is required",
            next_step="say in one sentence what the credential is for (--purpose); approvers read it",
        )
    body: dict[str, Any] = {"scope": scope, "params": dict(params or {}), "purpose": purpose}
    if ttl is not None:
        body["ttl"] = ttl
    return body


def retry_after(resp: httpx.Response, problem: dict[str, Any]) -> float | None:
    """Seconds to wait, from ``Retry-After`` (seconds or an HTTP date) or the problem body."""
    header = resp.headers.get("retry-after")
    if header:
        header = header.strip()
        if header.isdigit():
            return float(header)
        try:
            when = email.utils.parsedate_to_datetime(header)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    value = problem.get("retry_after")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def read_problem(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


#: Token-exchange codes that mean the form itself was wrong, not the ID token.
_FORM_ERRORS = frozenset(
    {"invalid_request", "unsupported_grant_type", "unsupported_token_type", "invalid_target"}
)


def _refused_id_token(resp: httpx.Response, status: int, code: str) -> bool:
    """RFC 8693 answers a refused ID token with 400; its problem code says why (token_expired, ...)."""
    try:
        path = resp.request.url.path
    except RuntimeError:  # a response built without a request
        return False
    return status == 400 and path.endswith("/oauth2/token") and code not in _FORM_ERRORS


def error_for(  # noqa: PLR0911, PLR0912  # one answer per status family reads best as a flat table
    resp: httpx.Response, *, audience: str = "broker"
) -> BrokerClientError:
    """The typed error for a non-2xx answer, with the broker's public detail and a next step."""
    status = resp.status_code
    problem = read_problem(resp)
    code = str(problem.get("code") or problem.get("error") or "")
    detail = str(problem.get("detail") or problem.get("error_description") or f"HTTP {status}")
    kw: dict[str, Any] = {"status": status, "problem": problem}
    if code:
        kw["code"] = code
    if status == 401 or _refused_id_token(resp, status, code):
        return AuthenticationError(
            f"the broker refused the credentials: {detail}",
            next_step=(
                "check that the ID token is current and issued for audience "
                f"{audience!r} by an issuer the broker trusts, then run `broker login`"
            ),
            **kw,
        )
    if status == 403:
        if code == "request_denied":
            reason = problem.get("reason")
            return RequestDenied(
                detail,
                reason=str(reason) if reason is not None else None,
                task_id=problem.get("task_id"),
                next_step=(
                    "do not retry the same request; ask the scope's owner for access, "
                    "or request a scope or parameters your identity is allowed"
                ),
                **kw,
            )
        return Forbidden(detail, next_step="this identity may not do that", **kw)
    if status == 404:
        return NotFound(
            detail,
            next_step="check the id: a task is reachable only from the session (or CI run) "
            "that requested it, and `broker tasks` lists this session's",
            **kw,
        )
    if status in (400, 413, 415, 422):
        return InvalidRequest(
            detail,
            next_step="fix the request; `broker status --scopes` lists each scope's parameters",
            **kw,
        )
    if status in (409, 412):
        state = problem.get("state")
        if code in EXPIRED_CODES or state == "expired":
            return TaskExpired(detail, next_step="request a new task", **kw)
        if state in ("cancelled", "revoked", "completed", "denied", "failed"):
            return TaskEnded(detail, next_step="request a new task", **kw)
        if code == "template_changed":
            return Conflict(detail, next_step="request the task again (the scope changed)", **kw)
        return Conflict(detail, next_step=_conflict_hint(code), **kw)
    if code == "scope_misconfigured":
        owner = problem.get("owner")
        return ScopeMisconfigured(
            detail,
            next_step=(
                f"tell the scope's owner{f' ({owner})' if owner else ''}: the cause is in the "
                "broker's log, `/readyz` and `broker scopes check --live`; retrying will not help "
                "until they fix it"
            ),
            **kw,
        )
    if status == 429:
        wait = retry_after(resp, problem)
        return RateLimited(detail, retry_after=60.0 if wait is None else wait, **kw)
    if status >= 500:
        return ServiceUnavailable(detail, retry_after=retry_after(resp, problem), **kw)
    return BrokerClientError(detail, **kw)


def _conflict_hint(code: str) -> str:
    return {
        "already_issued": "a credential is shown once; request a new task for a new one",
        "task_not_approved": "wait for the approval (`broker status TASK --wait`)",
        "idempotency_key_reused": "use a new Idempotency-Key for a different request",
        "session_ending": "log in again (`broker login`) and request a new task",
        "ttl_below_backend_minimum": (
            "your session ends too soon for this backend's shortest credential: get a fresh ID "
            "token, `broker login`, and request a new task"
        ),
    }.get(code, "check the task's state with `broker status TASK`")


def settle(task: Task) -> Task:
    """Return an approved (or active) task; raise the matching error for every other end state."""
    if task.state in ("approved", "active"):
        return task
    if task.state == "denied":
        reason = task.reason or "no reason given"
        raise RequestDenied(
            f"task {task.id} for {task.scope!r} was denied: {reason}",
            reason=task.reason,
            task_id=task.id,
            code="request_denied",
            next_step="do not retry the same request; read the reason, adjust, and ask again if it applies",
        )
    if task.state == "expired":
        raise TaskExpired(
            f"task {task.id} for {task.scope!r} expired before it was used",
            next_step="request a new task (and ask an approver to look sooner)",
        )
    if task.terminal:
        raise TaskEnded(
            f"task {task.id} for {task.scope!r} is {task.state}",
            next_step="request a new task",
        )
    raise Conflict(f"task {task.id} is {task.state}")


@dataclass
class Poller:
    """Decides how long to long-poll, and how long to sleep when the broker does not hold requests.

    The broker may or may not support ``?wait=``: an answer that comes back much sooner than asked
    while the task is still pending means it did not hold the request, so the client sleeps with
    backoff before asking again. Once long-poll works, no sleeps are added.
    """

    deadline: float | None  # time.monotonic() value, or None to wait until the request expires
    clock: Callable[[], float] = time.monotonic
    backoff: float = POLL_INITIAL

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock()

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def long_poll(self) -> float:
        left = self.remaining()
        return LONG_POLL_MAX if left is None else max(0.0, min(LONG_POLL_MAX, left))

    def pause(self, asked: float, took: float) -> float:
        """Seconds to sleep after a poll that asked ``asked`` and took ``took`` seconds."""
        if asked > 0 and took >= asked / 2:
            self.backoff = POLL_INITIAL  # the broker held the request: long-poll works
            return 0.0
        pause = self.backoff
        self.backoff = min(POLL_MAX, self.backoff * 2)
        left = self.remaining()
        return pause if left is None else max(0.0, min(pause, left))


@dataclass(frozen=True, slots=True)
class WaitStatus:
    """Handed to an ``on_wait`` callback while a task waits for its approver."""

    task: Task
    approvers: str | None
    waited: float


def approvers_text(task: Task, scopes: list[dict[str, Any]] | None) -> str | None:
    """Who may approve ``task``: the scope's rule with the task's progress ("1 of 2 so far")."""
    own = task.approvers()
    if own:
        return own
    rule: dict[str, Any] = {"mode": "manual"}
    for scope in scopes or []:
        if scope.get("name") == task.scope and isinstance(scope.get("approval"), dict):
            rule = dict(scope["approval"])
            break
    required = task.raw.get("approvals_required")
    if isinstance(required, int) and required > 0:
        rule["count"] = required
    decisions = task.raw.get("approvals")
    if isinstance(decisions, list):
        rule["approvals"] = sum(
            1
            for d in decisions
            if isinstance(d, dict) and d.get("decision") == "approve" and d.get("counts", True)
        )
    return describe_approval(rule)
