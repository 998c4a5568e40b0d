"""Tables. Times are UNIX epoch seconds (float) so both SQLite and PostgreSQL compare them alike.

No secret is ever stored: session tokens are kept as SHA-256 hashes, credentials by their external
handle (Vault accessor or lease id, STS access key id, JWT id). The one exception is ciphertext:
``credentials.sealed`` holds what a backend needs to revoke (a GitHub token), sealed under a key
that is never in the database, and only while the credential may be alive.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("issuer", String(2048), nullable=False),
    Column("subject", String(1024), nullable=False),
    Column("display_name", String(512)),
    Column("claims", JSON, nullable=False),
    Column("roles", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("trace_id", String(32), nullable=False),
    Column("span_id", String(16), nullable=False),
    #: ``api`` or ``console``: where the session may be used (its token works nowhere else).
    Column("via", String(16), nullable=False, default="api", server_default="api"),
    #: A digest of the run the ID token was issued to (CI run, pod), when the issuer names one.
    Column("run_identity", String(64)),
    #: The principal's person values (``claims.person``); null when the issuer names none.
    Column("persons", JSON),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("session_id", String(40), ForeignKey("sessions.id"), nullable=False),
    Column("issuer", String(2048), nullable=False),
    Column("subject", String(1024), nullable=False),
    Column("scope", String(128), nullable=False),
    Column("template_hash", String(64), nullable=False),
    Column("params", JSON, nullable=False),
    Column("purpose", Text, nullable=False),
    Column("ttl", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", Text),
    Column("decided_by_rule", String(256)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("decided_at", Float),
    Column("request_expires_at", Float),
    Column("approval_expires_at", Float),
    Column("ends_at", Float),
    Column("idempotency_key", String(256)),
    Column("request_hash", String(64)),
    Column("trace_id", String(32), nullable=False),
    Column("span_id", String(16), nullable=False),
    Column("parent_span_id", String(16)),
    Column("conversation_id", String(256)),
    Column("mints", Integer, nullable=False, default=0),
    Column("decision_hash", String(64)),
    Column("approvals_required", Integer, nullable=False, default=0, server_default="0"),
    #: The requesting session's run identity: later sessions of that run may reach the task.
    Column("run_identity", String(64)),
    #: ``session`` (default) or ``principal`` (the template shares it across sessions).
    Column("share", String(16), nullable=False, default="session", server_default="session"),
    #: The requester's persons when it asked (none of them may approve).
    Column("requester_persons", JSON),
    UniqueConstraint("issuer", "subject", "idempotency_key", name="uq_tasks_idempotency"),
)
Index("ix_tasks_principal", tasks.c.issuer, tasks.c.subject, tasks.c.state)
Index("ix_tasks_state", tasks.c.state)
Index("ix_tasks_session", tasks.c.session_id)

approvals = Table(
    "approvals",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("task_id", String(40), ForeignKey("tasks.id"), nullable=False),
    Column("issuer", String(2048), nullable=False),
    Column("subject", String(1024), nullable=False),
    Column("display_name", String(512)),
    Column("decision", String(16), nullable=False),
    Column("reason", Text),
    Column("template_hash", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("binding_hash", String(64)),
    #: The approver's persons when they decided: one person is one approver.
    Column("persons", JSON),
    UniqueConstraint("task_id", "issuer", "subject", name="uq_approvals_decider"),
)

credentials = Table(
    "credentials",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("task_id", String(40), ForeignKey("tasks.id"), nullable=False),
    Column("backend", String(64), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("handle", String(512)),
    Column("state", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("issued_at", Float),
    Column("expires_at", Float),
    Column("revoked_at", Float),
    Column("revoke_attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float),
    Column("last_error", Text),
    Column("details", JSON, nullable=False),
    Column("idempotency_key", String(256)),
    # A backend's revocation material sealed under a key that is not in the database (GitHub
    # tokens: DELETE /installation/token needs the token); NULL once revoked or expired.
    Column("sealed", Text),
    UniqueConstraint("task_id", "idempotency_key", name="uq_credentials_idempotency"),
)
Index("ix_credentials_task", credentials.c.task_id)
Index("ix_credentials_state", credentials.c.state)
Index("ix_credentials_handle", credentials.c.handle)
#: The credentials of a backend that may still be valid (what a kill-switch policy is rendered from).
Index("ix_credentials_backend_expiry", credentials.c.backend, credentials.c.expires_at)

audit_events = Table(
    "audit_events",
    metadata,
    Column(
        "seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("id", String(40), nullable=False, unique=True),
    Column("name", String(64), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("time", Float, nullable=False),
    Column("end_time", Float, nullable=False),
    Column("session_id", String(40)),
    Column("task_id", String(40)),
    Column("credential_id", String(40)),
    Column("actor_issuer", String(2048)),
    Column("actor_subject", String(1024)),
    Column("trace_id", String(32), nullable=False),
    Column("span_id", String(16), nullable=False),
    Column("parent_span_id", String(16)),
    Column("links", JSON, nullable=False),
    Column("attributes", JSON, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("exported", Boolean, nullable=False, default=False),
    Column("exported_at", Float),
)
Index("ix_audit_events_task", audit_events.c.task_id)
Index("ix_audit_events_credential", audit_events.c.credential_id)
Index("ix_audit_events_unexported", audit_events.c.exported, audit_events.c.seq)
Index("ix_audit_events_time", audit_events.c.time)

#: One row (id = 1): the head of the audit hash chain. Appenders lock it, which orders the chain
#: across replicas.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

#: Signed checkpoints of the audit chain.
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", BigInteger, primary_key=True),
    Column("hash", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("signature", Text, nullable=False),
)

#: Use records (OpenBao audit entries, CloudTrail events, introspections) already turned into an
#: event: the same record arriving again (socket and file device, two replicas, a restart) is a no-op.
audit_ingested = Table(
    "audit_ingested",
    metadata,
    Column("source", String(32), primary_key=True),
    Column("record_id", String(256), primary_key=True),
    Column("seen_at", Float, nullable=False),
)
Index("ix_audit_ingested_seen_at", audit_ingested.c.seen_at)

#: How far each ingest source has been read (a file device's inode and offset, an S3 prefix's
#: last key), so a restarted broker resumes where it stopped.
audit_ingest_cursors = Table(
    "audit_ingest_cursors",
    metadata,
    Column("source", String(512), primary_key=True),
    Column("position", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
)

#: One-time JWT ids (replay protection), kept until the token's exp plus leeway.
seen_jtis = Table(
    "seen_jtis",
    metadata,
    Column("issuer", String(2048), primary_key=True),
    Column("jti", String(256), primary_key=True),
    Column("expires_at", Float, nullable=False),
)

#: Fixed-window counters for rate limits, shared by all replicas.
rate_counters = Table(
    "rate_counters",
    metadata,
    Column("key", String(512), primary_key=True),
    Column("window_start", Float, primary_key=True),
    Column("count", Integer, nullable=False),
)

#: Every scope template version a task was decided under, keyed by its content hash, so auditors
#: (and the console) can see exactly what was approved and what changed since.
template_versions = Table(
    "template_versions",
    metadata,
    Column("hash", String(64), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("body", JSON, nullable=False),
    Column("first_seen_at", Float, nullable=False),
)
Index("ix_template_versions_name", template_versions.c.name, template_versions.c.first_seen_at)

#: Webhook notifications (the outbox of task.pending / task.approved / ...): written in the
#: decision's transaction, delivered with retries by a background worker. Payloads hold no secret;
#: the signature is computed at send time.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("webhook", String(64), nullable=False),
    Column("event", String(64), nullable=False),
    Column("task_id", String(40)),
    Column("payload", JSON, nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("delivered_at", Float),
    Column("last_error", Text),
)
Index("ix_webhook_deliveries_due", webhook_deliveries.c.state, webhook_deliveries.c.next_attempt_at)

#: The broker's own signing keys, public halves only (the private keys stay in files). Every
#: replica publishes its keys here, so any replica's JWKS and checkpoint verification knows all.
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(16), nullable=False),
    Column("jwk", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    #: The key signs nothing after this; it stays published while what it signed may be valid.
    Column("signs_until", Float, nullable=False),
)

#: Kill switches for credentials that cannot be revoked one by one (AWS STS): the desired deny
#: entries of each role's inline kill-switch policy. The reaper reconciles IAM with these rows.
kill_switches = Table(
    "kill_switches",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("backend", String(64), nullable=False),
    Column("target", String(2048), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("value", String(256), nullable=False),
    Column("task_id", String(40)),
    Column("credential_id", String(40)),
    Column("reason", Text, nullable=False),
    Column("created_by", String(1100), nullable=False),
    Column("created_at", Float, nullable=False),
    #: After this, every credential the entry could concern has expired: it may be dropped.
    Column("expires_at", Float, nullable=False),
    Column("lifted_at", Float),
    #: Per-session entries: the bounds of the session's issue time on AWS's clock (null when
    #: unknown: the entry is then denied by SourceIdentity, never by a time segment).
    Column("issued_from", Float),
    Column("issued_until", Float),
)
Index("ix_kill_switches_target", kill_switches.c.target, kill_switches.c.expires_at)

#: Periodic background jobs shared by replicas without a leader: a replica runs a job only after
#: moving its ``next_run_at`` forward in a compare-and-set update.
reaper_jobs = Table(
    "reaper_jobs",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("next_run_at", Float, nullable=False),
    Column("last_run_at", Float),
    Column("last_owner", String(64)),
)
