"""A task's audit trace as a readable tree: who asked and why, the decision, each issuance, each
use and the end. Pure formatting of stored (or API-fetched) event rows; used by
``broker audit trace``, ``broker audit search`` and the console.

Records that must not be misread are spelled out: a refused attempt (to approve, to mint, ...) is
a ``REFUSED`` line with its code, never a decision; a failed mint says nothing was issued; a
revocation that failed says the credential is still ``revoke_pending``; a task that ended without
a credential because minting failed ends ``FAILED``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from broker.domain.audit import EventName

_LABELS: dict[str, str] = {
    EventName.TASK_REQUEST: "REQUEST",
    EventName.TASK_DECISION: "DECISION",
    EventName.TASK_APPROVAL: "APPROVAL",
    EventName.APPROVAL_REFUSED: "REFUSED",
    EventName.CREDENTIAL_ISSUE: "ISSUE",
    EventName.CREDENTIAL_USE: "USE",
    EventName.CREDENTIAL_REVOKE: "REVOKE",
    EventName.CREDENTIAL_EXPIRE: "EXPIRE",
    EventName.TASK_COMPLETE: "END",
    EventName.TASK_EXPIRE: "EXPIRE",
    EventName.REQUEST_DENIED: "REFUSED",
}


def is_refusal(event: Mapping[str, Any]) -> bool:
    """A refused attempt (to approve, mint, read, ...), as opposed to a decision or an outcome.

    Also recognises refusals recorded before ``broker.approval.refused`` existed (a
    ``broker.task.approval`` event carrying ``broker.refusal.code``).
    """
    name = str(event.get("name"))
    attrs = event.get("attributes") or {}
    return name in (EventName.APPROVAL_REFUSED, EventName.REQUEST_DENIED) or (
        name == EventName.TASK_APPROVAL and "broker.refusal.code" in attrs
    )


def label(event: Mapping[str, Any]) -> str:
    """The trace's word for an event (``REFUSED`` for every refused attempt)."""
    if is_refusal(event):
        return "REFUSED"
    return _LABELS.get(str(event.get("name")), str(event.get("name")))


def when(ts: Any) -> str:
    """An event time as UTC ``YYYY-MM-DD HH:MM:SS.mmm``."""
    try:
        moment = datetime.fromtimestamp(float(ts), tz=UTC)
    except (TypeError, ValueError, OverflowError):
        return "?"
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


Attrs = Mapping[str, Any]


def _request(event: Attrs, a: Attrs) -> list[str]:
    who = event.get("actor_subject") or a.get("broker.principal.sub")
    parts = [
        f"{who} ({event.get('actor_issuer')}) asked for {a.get('broker.scope')}",
        f"purpose {_short(a.get('broker.purpose', ''))}",
    ]
    if a.get("broker.task.params") not in (None, {}, "{}"):
        parts.append(f"params {_short(a.get('broker.task.params'))}")
    if a.get("broker.task.ttl"):
        parts.append(f"ttl {a.get('broker.task.ttl')}s")
    if a.get("gen_ai.conversation.id"):
        parts.append(f"conversation {a.get('gen_ai.conversation.id')}")
    return parts


def _decision(event: Attrs, a: Attrs) -> list[str]:
    parts = [f"{a.get('broker.decision', event.get('outcome'))}"]
    if a.get("broker.approver.sub"):
        parts.append(f"by {a.get('broker.approver.sub')}")
    elif a.get("broker.decision.rule"):
        parts.append(f"by rule {a.get('broker.decision.rule')}")
    if a.get("broker.decision.reason"):
        parts.append(f"reason {_short(a.get('broker.decision.reason'))}")
    return parts


def _refusal(event: Attrs, a: Attrs) -> list[str]:
    who = event.get("actor_subject") or a.get("broker.approver.sub") or "someone"
    attempted = a.get("broker.approval.attempted") or a.get("broker.approval.decision")
    if attempted or event.get("name") != EventName.REQUEST_DENIED:
        what = f"{who} tried to {attempted or 'decide'}, not a decision"
    elif a.get("broker.audit.access"):
        what = f"{who} tried to read the audit record"
    else:
        what = f"{who} was refused"
    code = a.get("broker.refusal.code") or "refused"
    parts = [f"{what}: refused with {code}"]
    if a.get("broker.refusal.detail"):
        parts.append(f"({_short(a.get('broker.refusal.detail'), 100)})")
    return parts


def _approval(event: Attrs, a: Attrs) -> list[str]:
    who = a.get("broker.approver.sub") or event.get("actor_subject")
    verdict = a.get("broker.approval.decision") or a.get("broker.decision") or event.get("outcome")
    parts = [f"{who}: {verdict}"]
    reason = a.get("broker.approval.reason") or a.get("broker.decision.reason")
    if reason:
        parts.append(f"reason {_short(reason)}")
    return parts


def _issue(event: Attrs, a: Attrs) -> list[str]:
    if event.get("outcome") != "success":
        return _failed_issue(event, a)
    parts = [
        f"{event.get('credential_id')} {a.get('broker.credential.kind', '')} via "
        f"{a.get('broker.backend', '?')}: {event.get('outcome')}"
    ]
    if a.get("broker.credential.expires_at"):
        parts.append(f"expires {when(a.get('broker.credential.expires_at'))}")
    if a.get("broker.credential.policies"):
        parts.append(f"policies {_short(a.get('broker.credential.policies'))}")
    if a.get("broker.error.code"):
        parts.append(f"error {a.get('broker.error.code')}")
    return parts


def _failed_issue(event: Attrs, a: Attrs) -> list[str]:
    code = a.get("broker.error.code") or "backend_error"
    parts = [f"{event.get('credential_id')} via {a.get('broker.backend', '?')}: FAILED ({code})"]
    if a.get("broker.credential.outcome_unknown") or a.get("broker.credential.state") == (
        "revoke_pending"
    ):
        parts.append(
            "the backend's answer was lost: revoke_pending until the broker has taken back "
            "whatever it may have made"
        )
    else:
        parts.append("nothing was issued")
    return parts


def _use(event: Attrs, a: Attrs) -> list[str]:
    if a.get("broker.use.source") == "exec":
        parts = [
            f"exec {a.get('broker.exec.executable', '?')} (via {a.get('broker.use.via', '?')}, "
            f"reported by the agent): {event.get('outcome')}"
        ]
        if a.get("broker.exec.exit_code") is not None:
            parts.append(f"exit {a.get('broker.exec.exit_code')}")
        return parts
    parts = [
        f"{a.get('broker.use.source')} {a.get('broker.use.operation')} "
        f"{_short(a.get('broker.use.target', ''), 100)}: {event.get('outcome')}"
    ]
    if a.get("broker.use.kind") == "lease_operation":
        parts.append(f"on the lease, by {a.get('vault.auth.display_name', 'another token')}")
    if a.get("client.address"):
        parts.append(f"from {a.get('client.address')}")
    if a.get("broker.use.error"):
        parts.append(f"({_short(a.get('broker.use.error'), 60)})")
    if a.get("broker.use.after_revocation"):
        parts.append("AFTER REVOCATION")
    if a.get("broker.use.after_expiry"):
        parts.append("AFTER EXPIRY")
    return parts


def _revoke(event: Attrs, a: Attrs) -> list[str]:
    if event.get("name") == EventName.CREDENTIAL_REVOKE and event.get("outcome") != "success":
        parts = [
            f"{event.get('credential_id')}: NOT REVOKED ({a.get('broker.revoke.error') or 'failed'}), "
            "still revoke_pending"
        ]
        if a.get("broker.revoke.next_attempt_at"):
            parts.append(f"next attempt {when(a.get('broker.revoke.next_attempt_at'))}")
    else:
        parts = [f"{event.get('credential_id')}: {event.get('outcome')}"]
    if a.get("broker.revoke.reason"):
        parts.append(f"({a.get('broker.revoke.reason')})")
    return parts


def _end(event: Attrs, a: Attrs) -> list[str]:
    state = a.get("broker.task.state")
    if state == "failed" or event.get("outcome") == "failure":
        parts = [f"FAILED, state {state or 'failed'}"]
        if a.get("broker.task.end_reason"):
            parts.append(str(a.get("broker.task.end_reason")))
        return parts
    return _other(event, a)


def _other(event: Attrs, a: Attrs) -> list[str]:
    parts = [f"{event.get('outcome')}"]
    if a.get("broker.task.state"):
        parts.append(f"state {a.get('broker.task.state')}")
    return parts


_DESCRIBE: dict[str, Any] = {
    EventName.TASK_REQUEST: _request,
    EventName.TASK_DECISION: _decision,
    EventName.TASK_APPROVAL: _approval,
    EventName.CREDENTIAL_ISSUE: _issue,
    EventName.CREDENTIAL_USE: _use,
    EventName.USE_UNMATCHED: _use,
    EventName.CREDENTIAL_REVOKE: _revoke,
    EventName.CREDENTIAL_EXPIRE: _revoke,
    EventName.TASK_COMPLETE: _end,
}


def describe(event: Attrs) -> str:
    """One line saying what an event records."""
    attrs: Attrs = event.get("attributes") or {}
    how = _refusal if is_refusal(event) else _DESCRIBE.get(str(event.get("name")), _other)
    return ", ".join(p for p in how(event, attrs) if p)


def credential_warnings(credentials: Sequence[Mapping[str, Any]]) -> list[str]:
    """A sentence for each credential that is not safely over: still ``revoke_pending``."""
    out = []
    for cred in credentials:
        if cred.get("state") != "revoke_pending":
            continue
        line = (
            f"credential {cred.get('id')} is still revoke_pending: its revocation has not "
            "succeeded yet; the broker keeps retrying"
        )
        if cred.get("next_attempt_at"):
            line += f" (next attempt {when(cred.get('next_attempt_at'))})"
        if cred.get("expires_at"):
            line += f"; it expires on its own at {when(cred.get('expires_at'))}"
        out.append(line)
    return out


def render_trace(
    events: Sequence[Mapping[str, Any]],
    task_id: str,
    *,
    state: str | None = None,
    credentials: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The tree of a task's events, parents before children, siblings in time order; with the
    task's ``state`` and its ``credentials`` (as recorded now), what is still not over."""
    if not events:
        return f"no audit events for task {task_id}"
    by_span = {str(e["span_id"]): e for e in events}
    children: dict[str | None, list[Mapping[str, Any]]] = {}
    roots: list[Mapping[str, Any]] = []
    for event in events:
        parent = event.get("parent_span_id")
        if parent and parent in by_span and parent != event["span_id"]:
            children.setdefault(str(parent), []).append(event)
        else:
            roots.append(event)
    first = events[0]
    attrs = first.get("attributes") or {}
    header = f"task {task_id}  scope {attrs.get('broker.scope', '?')}"
    if state:
        header += f"  state {state}"
    header += f"  trace {first.get('trace_id')}"
    lines = [header]

    def walk(nodes: list[Mapping[str, Any]], prefix: str) -> None:
        nodes = sorted(nodes, key=lambda e: (float(e.get("time") or 0), int(e.get("seq") or 0)))
        for i, node in enumerate(nodes):
            last = i == len(nodes) - 1
            lines.append(
                f"{prefix}{'└─ ' if last else '├─ '}{when(node.get('time'))}  "
                f"{label(node):<8} {describe(node)}"
            )
            walk(children.get(str(node["span_id"]), []), prefix + ("   " if last else "│  "))

    walk(roots, "")
    lines.extend(f"WARNING: {w}" for w in credential_warnings(credentials))
    return "\n".join(lines)
