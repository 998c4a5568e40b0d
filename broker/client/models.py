"""What the broker returns, as plain values. Secrets never appear in a ``repr``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from broker.client.errors import InvalidRequest

#: Task states in which nothing more will happen.
TERMINAL_STATES = frozenset({"denied", "completed", "revoked", "expired", "cancelled", "failed"})

#: Environment keys whose values are addresses or names, not secrets (kept out of redaction).
NON_SECRET_ENV = frozenset(
    {
        "VAULT_ADDR",
        "BAO_ADDR",
        "VAULT_NAMESPACE",
        "PGHOST",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGSSLMODE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_STS",
        "GH_HOST",
    }
)


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class Task:
    """One request for one scope, as the broker last reported it."""

    id: str
    scope: str
    state: str
    purpose: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    ttl: int | None = None
    reason: str | None = None
    decided_by_rule: str | None = None
    created_at: float | None = None
    request_expires_at: float | None = None
    approval_expires_at: float | None = None
    ends_at: float | None = None
    trace_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Task:
        ttl = body.get("ttl")
        return cls(
            id=str(body["id"]),
            scope=str(body.get("scope", "")),
            state=str(body.get("state", "")),
            purpose=str(body.get("purpose") or ""),
            params=dict(body.get("params") or {}),
            ttl=ttl if isinstance(ttl, int) else None,
            reason=body.get("reason"),
            decided_by_rule=body.get("decided_by_rule"),
            created_at=_float(body.get("created_at")),
            request_expires_at=_float(body.get("request_expires_at")),
            approval_expires_at=_float(body.get("approval_expires_at")),
            ends_at=_float(body.get("ends_at")),
            trace_id=body.get("trace_id"),
            raw=body,
        )

    @property
    def pending(self) -> bool:
        return self.state == "pending"

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def credentials(self) -> list[dict[str, Any]]:
        """The task's credentials and their states, when the broker sent them (never secrets)."""
        value = self.raw.get("credentials")
        return [c for c in value if isinstance(c, dict)] if isinstance(value, list) else []

    @property
    def revoke_pending(self) -> list[dict[str, Any]]:
        """Credentials the broker could not take back yet (it keeps retrying)."""
        return [c for c in self.credentials if c.get("state") == "revoke_pending"]

    def approvers(self) -> str | None:
        """Who may approve, when the broker says so on the task itself."""
        for key in ("approval", "approval_rule"):
            rule = self.raw.get(key)
            if isinstance(rule, dict):
                text = describe_approval(rule)
                if text:
                    return text
        return describe_approvers(self.raw.get("approvers"))


@dataclass(frozen=True, slots=True)
class Credential:
    """A minted credential. ``env`` and ``secret`` are shown once by the broker; keep them in memory."""

    id: str
    task_id: str
    backend: str
    kind: str
    expires_at: float | None
    issued_at: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict, repr=False)
    secret: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Credential:
        return cls(
            id=str(body["credential_id"]),
            task_id=str(body.get("task_id", "")),
            backend=str(body.get("backend", "")),
            kind=str(body.get("kind", "")),
            expires_at=_float(body.get("expires_at")),
            issued_at=_float(body.get("issued_at")),
            details=dict(body.get("details") or {}),
            env={str(k): str(v) for k, v in (body.get("env") or {}).items()},
            secret={str(k): str(v) for k, v in (body.get("secret") or {}).items()},
        )

    def secret_values(self) -> list[str]:
        """Every value that must never be shown: secret fields and secret-bearing env values."""
        values = set(self.secret.values())
        values.update(v for k, v in self.env.items() if k not in NON_SECRET_ENV)
        # Short values ("1", "true") would redact innocent text and protect nothing.
        return sorted((v for v in values if len(v) >= 6), key=len, reverse=True)

    def aws_credential_process(self) -> dict[str, Any]:
        """The JSON an AWS SDK expects from a ``credential_process`` command (Version 1)."""
        env = self.env
        missing = [
            k
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
            if k not in env
        ]
        if missing:
            raise InvalidRequest(
                f"the credential of task {self.task_id} ({self.kind}) is not an AWS credential",
                next_step="use the credential_process format only with scopes whose backend is aws_sts",
            )
        out: dict[str, Any] = {
            "Version": 1,
            "AccessKeyId": env["AWS_ACCESS_KEY_ID"],
            "SecretAccessKey": env["AWS_SECRET_ACCESS_KEY"],
            "SessionToken": env["AWS_SESSION_TOKEN"],
        }
        if self.expires_at is not None:
            out["Expiration"] = (
                datetime.fromtimestamp(self.expires_at, UTC).isoformat().replace("+00:00", "Z")
            )
        return out


@dataclass(frozen=True, slots=True)
class Session:
    """A broker session: the opaque bearer token and when it ends."""

    token: str = field(repr=False)
    expires_at: float

    def usable(self, now: float, margin: float = 30.0) -> bool:
        return now + margin < self.expires_at


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the broker says the caller is."""

    session_id: str
    issuer: str
    subject: str
    display_name: str | None
    groups: list[str]
    roles: list[str]
    expires_at: float

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Identity:
        return cls(
            session_id=str(body.get("session_id", "")),
            issuer=str(body.get("issuer", "")),
            subject=str(body.get("subject", "")),
            display_name=body.get("display_name"),
            groups=list(body.get("groups") or []),
            roles=list(body.get("roles") or []),
            expires_at=float(body.get("expires_at") or 0),
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """What a ``with client.task(...)`` block holds: the approved task and its live credential."""

    task: Task
    credential: Credential

    @property
    def env(self) -> dict[str, str]:
        """Environment variables carrying the credential (``VAULT_TOKEN``, ``AWS_*``, ``PG*``)."""
        return self.credential.env

    @property
    def secret(self) -> dict[str, str]:
        return self.credential.secret

    @property
    def expires_at(self) -> float | None:
        return self.credential.expires_at


def scope_parameters(scope: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A scope's parameters from ``GET /v1/scopes`` as ``{name: spec}``, each spec with ``type``
    and ``required``; the listing may be a JSON Schema object or a plain mapping of specs."""
    params = scope.get("parameters") or {}
    if not isinstance(params, dict):
        return {}
    if isinstance(params.get("properties"), dict):
        required = set(params.get("required") or [])
        return {
            str(name): {**spec, "required": name in required}
            for name, spec in params["properties"].items()
            if isinstance(spec, dict)
        }
    return {
        str(name): {**spec, "required": bool(spec.get("required", True)) and "default" not in spec}
        for name, spec in params.items()
        if isinstance(spec, dict)
    }


# --- approval rules as text ----------------------------------------------------------------


def describe_condition(cond: Any) -> str:
    """One claim condition as a short phrase: ``groups = "sre"``, ``sub matches "ci-*"``."""
    if not isinstance(cond, dict):
        return str(cond)
    if "cel" in cond and cond["cel"] is not None:
        return f"cel({cond['cel']})"
    claim = cond.get("claim", "?")
    for key, verb in (("equals", "="), ("one_of", "in"), ("glob", "matches"), ("regex", "~")):
        value = cond.get(key)
        if value is not None:
            return f"{claim} {verb} {json.dumps(value)}"
    if "all" in cond or "any" in cond:
        return f"({describe_condition_set(cond)})"
    return json.dumps(cond, sort_keys=True)


def describe_condition_set(rule: Any) -> str:
    """A condition set (``all``/``any``) as text."""
    if isinstance(rule, str):
        return rule
    if not isinstance(rule, dict):
        return str(rule)
    parts = []
    all_of = [c for c in rule.get("all") or [] if c is not None]
    any_of = [c for c in rule.get("any") or [] if c is not None]
    if all_of:
        parts.append(" and ".join(describe_condition(c) for c in all_of))
    if any_of:
        alternatives = " or ".join(describe_condition(c) for c in any_of)
        parts.append(f"({alternatives})" if all_of and len(any_of) > 1 else alternatives)
    none_of = [c for c in rule.get("none") or [] if c is not None]
    if none_of:
        parts.append("not " + " nor ".join(describe_condition(c) for c in none_of))
    return " and ".join(parts) if parts else json.dumps(rule, sort_keys=True)


def describe_approvers(value: Any) -> str | None:
    """``approvers`` in any shape the broker may send (text, condition set, list of names)."""
    if not value:
        return None
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return describe_condition_set(value)


def describe_approval(rule: dict[str, Any]) -> str | None:
    """An approval rule (``mode``, ``approvers``, ``count``) as "2 distinct approvers with ..."."""
    if rule.get("mode") == "auto":
        return None
    who = describe_approvers(rule.get("approvers") or rule.get("description"))
    count = rule.get("count")
    got = rule.get("approvals") if isinstance(rule.get("approvals"), int) else None
    if not isinstance(count, int) or count < 1:
        count = 1
    head = "1 approver" if count == 1 else f"{count} distinct approvers"
    text = f"{head} with {who}" if who else head
    if got:
        text += f" ({got} of {count} so far)"
    return text + ", never the requester"
