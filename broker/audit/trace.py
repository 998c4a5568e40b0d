"""A task's audit trace as a readable tree: who asked and why, the decision, each issuance, each
use and the end. Pure formatting of stored (or API-fetched) event rows; used by
``broker audit trace``."""

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
    EventName.CREDENTIAL_ISSUE: "ISSUE",
    EventName.CREDENTIAL_USE: "USE",
    EventName.CREDENTIAL_REVOKE: "REVOKE",
    EventName.CREDENTIAL_EXPIRE: "EXPIRE",
    EventName.TASK_COMPLETE: "END",
    EventName.TASK_EXPIRE: "EXPIRE",
    EventName.REQUEST_DENIED: "DENIED",
}


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


def _approval(event: Attrs, a: Attrs) -> list[str]:
    who = a.get("broker.approver.sub") or event.get("actor_subject")
    verdict = a.get("broker.approval.decision") or a.get("broker.decision") or event.get("outcome")
    parts = [f"{who}: {verdict}"]
    reason = a.get("broker.approval.reason") or a.get("broker.decision.reason")
    if reason:
        parts.append(f"reason {_short(reason)}")
    return parts


def _issue(event: Attrs, a: Attrs) -> list[str]:
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
    parts = [f"{event.get('credential_id')}: {event.get('outcome')}"]
    if a.get("broker.revoke.reason"):
        parts.append(f"({a.get('broker.revoke.reason')})")
    return parts


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
}


def describe(event: Attrs) -> str:
    """One line saying what an event records."""
    attrs: Attrs = event.get("attributes") or {}
    how = _DESCRIBE.get(str(event.get("name")), _other)
    return ", ".join(p for p in how(event, attrs) if p)


def render_trace(events: Sequence[Mapping[str, Any]], task_id: str) -> str:
    """The tree of a task's events, parents before children, siblings in time order."""
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
    header = (
        f"task {task_id}  scope {attrs.get('broker.scope', '?')}  trace {first.get('trace_id')}"
    )
    lines = [header]

    def walk(nodes: list[Mapping[str, Any]], prefix: str) -> None:
        nodes = sorted(nodes, key=lambda e: (float(e.get("time") or 0), int(e.get("seq") or 0)))
        for i, node in enumerate(nodes):
            last = i == len(nodes) - 1
            label = _LABELS.get(str(node.get("name")), str(node.get("name")))
            lines.append(
                f"{prefix}{'└─ ' if last else '├─ '}{when(node.get('time'))}  "
                f"{label:<8} {describe(node)}"
            )
            walk(children.get(str(node["span_id"]), []), prefix + ("   " if last else "│  "))

    walk(roots, "")
    return "\n".join(lines)
