"""Signed webhooks when a task starts waiting for approvers and when it is decided.

Deliveries are an outbox: :meth:`WebhookNotifier.enqueue` writes one row per matching webhook in
the transaction that changes the task, so a notification exists if and only if the change does.
A background worker (:meth:`WebhookNotifier.deliver_due`, any replica) sends them with retries
and exponential backoff, claiming each row first so two replicas never send the same attempt.

Every request carries::

    X-Broker-Event: task.pending | task.approved | task.denied | task.expired
    X-Broker-Delivery: <delivery id, stable across retries: receivers deduplicate on it>
    X-Broker-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

Receivers check the signature with :func:`verify_signature` (or its five lines in any language)
and refuse timestamps older than a few minutes. ``format: slack`` sends a Slack-compatible body
(``text`` and ``blocks``); agent-supplied text is escaped so it cannot mention ``@channel`` or
forge links. Payloads carry no secret: ids, scope, requester, purpose, parameters, state, and
``grant``: what the credential will grant, rendered for the exact parameters (policies, role,
session policy and tags, claims, TTL), so nobody approves a placeholder.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterable
from typing import Any

import httpx

from broker.domain.ids import new_id
from broker.domain.records import Approval, Task
from broker.domain.scope import ScopeTemplate
from broker.domain.scrub import scrub_value
from broker.domain.vault_policies import ForbiddenPolicies
from broker.errors import ConfigurationError
from broker.periodic import Periodic
from broker.scopes.grant import grant_summary
from broker.services.common import Clock
from broker.services.grants import preview
from broker.settings import Settings, WebhookSettings
from broker.store import Database, Tx, repo

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Broker-Signature"
MAX_BACKOFF = 600.0
#: While a worker sends a claimed delivery, other workers leave it alone this long.
CLAIM_SECONDS = 60.0
BATCH = 50


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Broker-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    secret: bytes, header: str, body: bytes, now: float, *, tolerance: float = 300
) -> bool:
    """Check a delivery's signature and freshness (constant-time comparison)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance or "v1" not in parts:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts["v1"])


def _slack_escape(text: str) -> str:
    # Slack's control characters: & < > (mentions and links are written <...>).
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_TITLES = {
    "task.pending": "waits for approval",
    "task.approved": "was approved",
    "task.denied": "was denied",
    "task.expired": "expired",
}


def slack_body(payload: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook body for one event payload."""
    task = payload["task"]
    requester = task["requester"]
    who = requester.get("display_name") or requester["subject"]
    title = f"Task {task['id']} for scope {task['scope']} {_TITLES.get(payload['event'], payload['event'])}"
    params = ", ".join(f"{k}={v}" for k, v in sorted(task["params"].items())) or "(none)"
    lines = [
        f"*Requester:* {who} ({requester['issuer']})",
        f"*Purpose:* {task['purpose']}",
        f"*Parameters:* {params}",
        f"*Risk:* {task.get('risk') or 'unknown'}   *TTL:* {task['ttl']} s",
        *([f"*Grants:* {grant_summary(task['grant'])}"] if task.get("grant") else []),
        f"*Approvals:* {task['approvals']['received']} of {task['approvals']['required']}",
    ]
    if task.get("reason"):
        lines.append(f"*Reason:* {task['reason']}")
    text = _slack_escape(title)
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{text}*"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape("\n".join(lines))}},
    ]
    if task.get("url"):
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open task"},
                        "url": task["url"],
                    }
                ],
            }
        )
    return {"text": text, "blocks": blocks}


class WebhookNotifier:
    """Enqueues and delivers webhook notifications for task decisions."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        clock: Clock,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        names = [h.name for h in settings.webhooks]
        if len(set(names)) != len(names):
            raise ConfigurationError("webhook names must be unique")
        self.settings = settings
        self.hooks: dict[str, WebhookSettings] = {h.name: h for h in settings.webhooks}
        self.db = db
        self.clock = clock
        self._transport = transport
        self._client: httpx.Client | None = None
        self._worker: Periodic | None = None

    # --- enqueue (inside the caller's transaction) ------------------------------------------

    def payload(
        self,
        event: str,
        task: Task,
        template: ScopeTemplate | None,
        approvals: Iterable[Approval] = (),
    ) -> dict[str, Any]:
        """The event's JSON body: everything an approver needs to decide, no secret."""
        counted = list(approvals)
        body = {
            "event": event,
            "time": self.clock(),
            "task": {
                "id": task.id,
                "scope": task.scope,
                "state": task.state.value,
                "risk": template.risk.value if template else None,
                "purpose": task.purpose,
                "params": task.params,
                "ttl": task.ttl,
                "grant": self._grant(task, template),
                "requester": {"issuer": task.issuer, "subject": task.subject},
                "template_hash": task.template_hash,
                "approvals": {
                    "required": task.approvals_required,
                    "received": len(counted),
                    "by": [a.subject for a in counted],
                },
                "request_expires_at": task.request_expires_at,
                "approval_expires_at": task.approval_expires_at,
                "reason": task.reason,
                "decided_by_rule": task.decided_by_rule,
                "url": f"{self.settings.public_url.rstrip('/')}/ui/tasks/{task.id}",
            },
        }
        scrubbed: dict[str, Any] = scrub_value(body)
        return scrubbed

    def _grant(self, task: Task, template: ScopeTemplate | None) -> dict[str, Any] | None:
        if template is None:
            return None
        vault = self.settings.vault
        forbidden = ForbiddenPolicies.of(vault.forbidden_policies if vault else ())
        return preview(template, task, self.settings, forbidden)

    def enqueue(
        self,
        conn: Tx,
        event: str,
        task: Task,
        template: ScopeTemplate | None,
        *,
        approvals: Iterable[Approval] = (),
    ) -> int:
        """Queue ``event`` for every webhook that wants it; returns how many were queued."""
        wanted = set(template.approval.notify) if template is not None else set()
        hooks = [
            h for h in self.hooks.values() if event in h.events and (not wanted or h.name in wanted)
        ]
        if wanted and not wanted & set(self.hooks):
            log.warning(
                "scope %s names webhooks %s, none of them configured", task.scope, sorted(wanted)
            )
        if not hooks:
            return 0
        body = self.payload(event, task, template, approvals)
        if task.approvals_required and event == "task.pending":
            session = repo.get_session(conn, task.session_id)
            if session is not None and session.principal.display_name:
                body["task"]["requester"]["display_name"] = session.principal.display_name
        now = self.clock()
        for hook in hooks:
            repo.insert_webhook_delivery(
                conn,
                id=new_id("whd"),
                webhook=hook.name,
                event=event,
                task_id=task.id,
                payload=body,
                state="pending",
                created_at=now,
                attempts=0,
                next_attempt_at=now,
            )
        return len(hooks)

    # --- deliver (a background worker on any replica) ---------------------------------------

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                transport=self._transport, follow_redirects=False, headers={"User-Agent": "broker"}
            )
        return self._client

    def deliver_due(self, limit: int = BATCH) -> int:
        """Send what is due; returns how many were delivered."""
        now = self.clock()
        with self.db.write() as conn:
            due = repo.webhook_deliveries_due(conn, now, limit, skip_locked=not self.db.is_sqlite)
            claimed = []
            for row in due:
                # Claim: push the next attempt out so no other worker sends it meanwhile.
                if repo.update_webhook_delivery(
                    conn,
                    row["id"],
                    expect_attempts=row["attempts"],
                    attempts=row["attempts"] + 1,
                    next_attempt_at=now + CLAIM_SECONDS,
                ):
                    claimed.append(row)
        delivered = 0
        for row in claimed:
            if self._send(row):
                delivered += 1
        return delivered

    def _send(self, row: dict[str, Any]) -> bool:
        hook = self.hooks.get(row["webhook"])
        attempts = int(row["attempts"]) + 1
        error: str | None = None
        if hook is None:
            error = "webhook no longer configured"
        else:
            body_obj = slack_body(row["payload"]) if hook.format == "slack" else row["payload"]
            body_obj = (
                body_obj if hook.format == "slack" else {**body_obj, "delivery_id": row["id"]}
            )
            body = json.dumps(body_obj, separators=(",", ":"), sort_keys=True).encode()
            timestamp = int(self.clock())
            headers = {
                "Content-Type": "application/json",
                "X-Broker-Event": row["event"],
                "X-Broker-Delivery": row["id"],
                SIGNATURE_HEADER: sign(hook.secret.get_secret_value().encode(), body, timestamp),
            }
            try:
                resp = self.client.post(
                    hook.url, content=body, headers=headers, timeout=hook.timeout
                )
                if not 200 <= resp.status_code < 300:
                    error = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                error = type(exc).__name__
        now = self.clock()
        with self.db.write() as conn:
            if error is None:
                repo.update_webhook_delivery(
                    conn, row["id"], state="delivered", delivered_at=now, last_error=None
                )
                return True
            final = hook is None or attempts >= hook.max_attempts
            repo.update_webhook_delivery(
                conn,
                row["id"],
                state="failed" if final else "pending",
                last_error=error,
                next_attempt_at=now + min(MAX_BACKOFF, 2.0**attempts),
            )
        log.warning(
            "webhook %s delivery %s failed (attempt %d): %s",
            row["webhook"],
            row["id"],
            attempts,
            error,
        )
        return False

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, interval: float = 0.5) -> None:
        """Deliver in a background thread until :meth:`stop`."""
        if not self.hooks or self._worker is not None:
            return
        self._worker = Periodic("broker-webhooks", interval, self.deliver_due)
        self._worker.start()

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        if self._client is not None:
            self._client.close()
            self._client = None
