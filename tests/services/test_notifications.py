"""Webhooks: written with the decision, delivered over real HTTP, signed, retried, Slack-shaped."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.domain.records import Task
from broker.domain.task import TaskState
from broker.services.notifications import WebhookNotifier, slack_body, verify_signature
from broker.settings import Settings
from broker.store import Database, repo
from broker.store.migrate import upgrade
from tests.api.flows import WebhookReceiver

SECRET = "a-webhook-secret-of-32-characters"
TASK = Task(
    id="tsk_1",
    session_id="ses_missing",
    issuer="https://idp",
    subject="agent-1",
    scope="aws-deploy",
    template_hash="h",
    params={"environment": "staging"},
    purpose="deploy <!channel> & friends",
    ttl=900,
    state=TaskState.PENDING,
    created_at=0,
    updated_at=0,
    trace_id="0" * 32,
    span_id="0" * 16,
    approvals_required=2,
)


@pytest.fixture
def receiver() -> Any:
    hook = WebhookReceiver().start()
    yield hook
    hook.stop()


def notifier_for(
    tmp_path: Path, hooks: list[dict[str, Any]], clock: Any = time.time
) -> WebhookNotifier:
    settings = Settings(
        dev_mode=True, data_dir=tmp_path, webhooks=hooks, public_url="https://broker.example"
    )
    upgrade(settings.effective_database_url)
    return WebhookNotifier(settings, Database(settings.effective_database_url), clock)


def enqueue(n: WebhookNotifier, event: str = "task.pending", template: Any = None) -> int:
    with n.db.write() as conn:
        return n.enqueue(conn, event, TASK, template)


def test_signed_delivery_over_http(tmp_path: Path, receiver: WebhookReceiver) -> None:
    """The body arrives with event, delivery id and an HMAC signature the receiver can verify;
    a tampered body or a wrong secret fails verification."""
    n = notifier_for(tmp_path, [{"name": "ops", "url": receiver.url, "secret": SECRET}])
    assert enqueue(n) == 1
    assert n.deliver_due() == 1
    headers, body = receiver.received[0]
    assert headers["X-Broker-Event"] == "task.pending"
    sig = headers["X-Broker-Signature"]
    assert verify_signature(SECRET.encode(), sig, body, time.time())
    assert not verify_signature(SECRET.encode(), sig, body + b" ", time.time())
    assert not verify_signature(b"another-secret-entirely!!", sig, body, time.time())
    assert not verify_signature(SECRET.encode(), sig, body, time.time() + 3600)  # too old
    payload = json.loads(body)
    assert payload["delivery_id"] == headers["X-Broker-Delivery"]
    assert payload["task"]["url"] == "https://broker.example/ui/tasks/tsk_1"
    assert payload["task"]["approvals"] == {"required": 2, "received": 0, "by": []}
    assert n.deliver_due() == 0  # delivered once
    with n.db.read() as conn:
        assert [d["state"] for d in repo.webhook_deliveries(conn)] == ["delivered"]


def test_slack_format_escapes_agent_text(tmp_path: Path, receiver: WebhookReceiver) -> None:
    """Slack bodies carry text and blocks; an agent's purpose cannot mention @channel."""
    n = notifier_for(
        tmp_path, [{"name": "chat", "url": receiver.url, "secret": SECRET, "format": "slack"}]
    )
    enqueue(n)
    n.deliver_due()
    body = receiver.bodies()[0]
    assert set(body) == {"text", "blocks"}
    flat = json.dumps(body)
    assert "<!channel>" not in flat and "&lt;!channel&gt; &amp; friends" in flat
    assert body["blocks"][-1]["elements"][0]["url"].endswith("/ui/tasks/tsk_1")


def test_failures_retry_with_backoff_then_give_up(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    """A 500 is retried after a backoff; after max_attempts the delivery is marked failed."""
    now = [1_000_000.0]
    n = notifier_for(
        tmp_path,
        [{"name": "ops", "url": receiver.url, "secret": SECRET, "max_attempts": 2}],
        clock=lambda: now[0],
    )
    receiver.status = 500
    enqueue(n)
    assert n.deliver_due() == 0
    assert n.deliver_due() == 0 and len(receiver.received) == 1  # not due yet
    now[0] += 3
    assert n.deliver_due() == 0 and len(receiver.received) == 2
    with n.db.read() as conn:
        (row,) = repo.webhook_deliveries(conn)
    assert (row["state"], row["attempts"], row["last_error"]) == ("failed", 2, "HTTP 500")


def test_an_unreachable_hook_is_retried_then_delivered(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    now = [1_000_000.0]
    n = notifier_for(
        tmp_path, [{"name": "ops", "url": receiver.url, "secret": SECRET}], clock=lambda: now[0]
    )
    receiver.status = 503
    enqueue(n)
    n.deliver_due()
    receiver.status = 200
    now[0] += 10
    assert n.deliver_due() == 1


def test_routing_by_event_and_template(tmp_path: Path, receiver: WebhookReceiver) -> None:
    """A hook gets only the events it asked for; a template's approval.notify picks hooks."""
    from broker.scopes.loader import load_folder

    templates, _ = load_folder(Path(__file__).resolve().parents[2] / "scopes")
    deploy = templates["aws-deploy"].template
    n = notifier_for(
        tmp_path,
        [
            {"name": "ops", "url": receiver.url, "secret": SECRET, "events": ["task.approved"]},
            {"name": "sec", "url": receiver.url, "secret": SECRET},
        ],
    )
    assert enqueue(n, "task.pending", deploy) == 1
    assert enqueue(n, "task.approved", deploy) == 2
    narrowed = deploy.model_copy(
        update={"approval": deploy.approval.model_copy(update={"notify": ["ops"]})}
    )
    assert enqueue(n, "task.denied", narrowed) == 0


def test_no_hooks_no_rows(tmp_path: Path) -> None:
    n = notifier_for(tmp_path, [])
    assert enqueue(n) == 0


def test_settings_refuse_weak_or_insecure_hooks(tmp_path: Path) -> None:
    """A short secret is refused; outside dev mode only https (or loopback) hooks are allowed."""
    with pytest.raises(ValueError, match="16 characters"):
        Settings(dev_mode=True, webhooks=[{"name": "x", "url": "https://h", "secret": "short"}])
    with pytest.raises(ValueError, match=r"webhooks\[x\]\.url .* is plain http"):
        Settings(
            dev_mode=False,
            signing_key_file=tmp_path / "k",
            webhooks=[{"name": "x", "url": "http://hooks.example/x", "secret": SECRET}],
        )


def test_slack_body_shape() -> None:
    body = slack_body(
        {
            "event": "task.approved",
            "task": {
                "id": "t",
                "scope": "s",
                "requester": {"issuer": "i", "subject": "u"},
                "purpose": "p",
                "params": {},
                "ttl": 60,
                "approvals": {"required": 1, "received": 1},
                "reason": None,
            },
        }
    )
    assert body["text"] == "Task t for scope s was approved"
    httpx.Request("POST", "https://x", json=body)  # serialisable


def test_the_payload_carries_the_grant_rendered_for_the_exact_parameters(tmp_path: Path) -> None:
    """The webhook body says what the credential will grant (the deploy role, its session tags
    with the requested values), and the Slack body has it on a line of its own; no
    placeholder reaches either."""
    from dataclasses import replace

    from broker.scopes.loader import load_folder

    templates, _ = load_folder(Path(__file__).resolve().parents[2] / "scopes")
    deploy = templates["aws-deploy"].template
    task = replace(TASK, params={"environment": "production", "change": "CHG-2041"})
    n = notifier_for(tmp_path, [])
    payload = n.payload("task.pending", task, deploy)
    grant = payload["task"]["grant"]
    assert grant["role_arn"] == "arn:aws:iam::123456789012:role/broker-deploy"
    assert grant["session_tags"]["change"] == "CHG-2041"
    assert grant["session_tags"]["environment"] == "production"
    assert "{{" not in json.dumps(payload)
    text = json.dumps(slack_body(payload))
    assert "*Grants:* aws_sts: role arn:aws:iam::123456789012:role/broker-deploy" in text
