"""Repository functions. Each takes an open connection so callers choose the transaction."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    RowMapping,
    and_,
    delete,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from broker.domain.audit import AuditEvent, chain_hash, sanitize_attributes
from broker.domain.principal import Principal
from broker.domain.records import Approval, Credential, Session, Task
from broker.domain.task import CredentialState, TaskState
from broker.store import schema as t

# --- sessions -------------------------------------------------------------------------------


#: Where a session row keeps the principal's mapped groups, beside (never over) its claims.
_GROUPS_KEY = "broker:groups"


def insert_session(conn: Connection, session: Session, token_hash: str) -> None:
    p = session.principal
    conn.execute(
        insert(t.sessions),
        {
            "id": session.id,
            "token_hash": token_hash,
            "issuer": p.issuer,
            "subject": p.subject,
            "display_name": p.display_name,
            "claims": {**p.claims, _GROUPS_KEY: list(p.groups)},
            "roles": sorted(p.roles),
            "created_at": session.created_at,
            "expires_at": session.expires_at,
            "ended_at": session.ended_at,
            "trace_id": session.trace_id,
            "span_id": session.span_id,
            "via": session.via,
            "run_identity": session.run_identity,
            "persons": _list_or_none(p.persons),
        },
    )


def _list_or_none(values: Sequence[str] | None) -> list[str] | None:
    return None if values is None else list(values)


def _tuple_or_none(values: Any) -> tuple[str, ...] | None:
    return None if values is None else tuple(str(v) for v in values)


def _session(row: RowMapping) -> Session:
    claims = dict(row["claims"])
    groups = tuple(claims.pop(_GROUPS_KEY, ()) or ())
    return Session(
        id=row["id"],
        principal=Principal(
            issuer=row["issuer"],
            subject=row["subject"],
            display_name=row["display_name"],
            groups=groups,
            roles=frozenset(row["roles"]),
            claims=claims,
            persons=_tuple_or_none(row["persons"]),
        ),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        ended_at=row["ended_at"],
        trace_id=row["trace_id"],
        span_id=row["span_id"],
        via=row["via"],
        run_identity=row["run_identity"],
    )


def session_by_token_hash(conn: Connection, token_hash: str) -> Session | None:
    row = (
        conn.execute(select(t.sessions).where(t.sessions.c.token_hash == token_hash))
        .mappings()
        .first()
    )
    return _session(row) if row else None


def get_session(conn: Connection, session_id: str) -> Session | None:
    row = conn.execute(select(t.sessions).where(t.sessions.c.id == session_id)).mappings().first()
    return _session(row) if row else None


def end_session(conn: Connection, session_id: str, now: float) -> bool:
    res = conn.execute(
        update(t.sessions)
        .where(t.sessions.c.id == session_id, t.sessions.c.ended_at.is_(None))
        .values(ended_at=now)
    )
    return res.rowcount == 1


# --- tasks ----------------------------------------------------------------------------------


def insert_task(conn: Connection, task: Task) -> bool:
    """Insert a task; False when its (issuer, subject, idempotency key) is already taken."""
    values = {f: getattr(task, f) for f in Task.__slots__}
    values["state"] = task.state.value
    values["requester_persons"] = _list_or_none(task.requester_persons)
    if task.idempotency_key is None:
        conn.execute(insert(t.tasks), values)
        return True
    try:
        with conn.begin_nested():
            conn.execute(insert(t.tasks), values)
    except IntegrityError:
        return False
    return True


def _task(row: RowMapping) -> Task:
    values = {k: row[k] for k in Task.__slots__}
    values["state"] = TaskState(row["state"])
    values["requester_persons"] = _tuple_or_none(row["requester_persons"])
    return Task(**values)


def get_task(conn: Connection, task_id: str, *, for_update: bool = False) -> Task | None:
    query = select(t.tasks).where(t.tasks.c.id == task_id)
    if for_update:
        query = query.with_for_update()
    row = conn.execute(query).mappings().first()
    return _task(row) if row else None


def task_by_idempotency_key(conn: Connection, issuer: str, subject: str, key: str) -> Task | None:
    row = (
        conn.execute(
            select(t.tasks).where(
                t.tasks.c.issuer == issuer,
                t.tasks.c.subject == subject,
                t.tasks.c.idempotency_key == key,
            )
        )
        .mappings()
        .first()
    )
    return _task(row) if row else None


def update_task(
    conn: Connection, task_id: str, *, expect: TaskState | None = None, **values: Any
) -> bool:
    """Update a task; with ``expect``, only if it is still in that state (compare-and-set)."""
    if isinstance(values.get("state"), TaskState):
        values["state"] = values["state"].value
    query = update(t.tasks).where(t.tasks.c.id == task_id)
    if expect is not None:
        query = query.where(t.tasks.c.state == expect.value)
    # Values as execution parameters (not .values()): the statement is compiled once and cached.
    return conn.execute(query, values).rowcount == 1


def list_tasks(
    conn: Connection,
    *,
    issuer: str | None = None,
    subject: str | None = None,
    states: Iterable[TaskState] | None = None,
    session_id: str | None = None,
    reachable_from: Session | None = None,
    limit: int = 100,
) -> list[Task]:
    """Tasks newest first; ``reachable_from`` keeps those that session may reach
    (:meth:`Task.reachable_from`, as one query)."""
    query = select(t.tasks)
    if reachable_from is not None:
        c = t.tasks.c
        owner = reachable_from.principal
        mine = (c.session_id == reachable_from.id) | (c.share == "principal")
        if reachable_from.run_identity is not None:
            mine = mine | (c.run_identity == reachable_from.run_identity)
        query = query.where(c.issuer == owner.issuer, c.subject == owner.subject, mine)
    if issuer is not None:
        query = query.where(t.tasks.c.issuer == issuer)
    if subject is not None:
        query = query.where(t.tasks.c.subject == subject)
    if states is not None:
        query = query.where(t.tasks.c.state.in_([s.value for s in states]))
    if session_id is not None:
        query = query.where(t.tasks.c.session_id == session_id)
    query = query.order_by(t.tasks.c.created_at.desc()).limit(limit)
    return [_task(r) for r in conn.execute(query).mappings()]


def lock_principal_scope(conn: Connection, issuer: str, subject: str, scope: str) -> None:
    """Serialise, until the transaction ends, whatever counts then adds a principal's tasks for
    one scope (``max_active_tasks``). Under READ COMMITTED two replicas would otherwise both
    count the same open tasks and both add one; a transaction-scoped advisory lock orders them.
    SQLite's writes are serialised already."""
    if conn.dialect.name != "postgresql":
        return
    digest = hashlib.sha256(f"open-tasks\n{issuer}\n{subject}\n{scope}".encode()).digest()
    key = int.from_bytes(digest[:8], "big", signed=True)
    conn.execute(select(func.pg_advisory_xact_lock(key)))


def count_active_tasks(conn: Connection, issuer: str, subject: str, scope: str) -> int:
    live = [TaskState.PENDING.value, TaskState.APPROVED.value, TaskState.ACTIVE.value]
    return int(
        conn.execute(
            select(func.count())
            .select_from(t.tasks)
            .where(
                t.tasks.c.issuer == issuer,
                t.tasks.c.subject == subject,
                t.tasks.c.scope == scope,
                t.tasks.c.state.in_(live),
            )
        ).scalar_one()
    )


# --- approvals ------------------------------------------------------------------------------


def insert_approval(conn: Connection, approval: Approval) -> bool:
    """Record a decision; False when this principal already decided this task."""
    try:
        with conn.begin_nested():
            values = {f: getattr(approval, f) for f in Approval.__slots__}
            values["persons"] = _list_or_none(approval.persons)
            conn.execute(insert(t.approvals).values(values))
    except IntegrityError:
        return False
    return True


def update_approval(conn: Connection, approval_id: str, **values: Any) -> bool:
    """Refresh a decision (a stale approval renewed by the same approver)."""
    if "persons" in values:
        values["persons"] = _list_or_none(values["persons"])
    res = conn.execute(update(t.approvals).where(t.approvals.c.id == approval_id).values(**values))
    return res.rowcount == 1


def approvals_for(conn: Connection, task_id: str) -> list[Approval]:
    rows = conn.execute(
        select(t.approvals)
        .where(t.approvals.c.task_id == task_id)
        .order_by(t.approvals.c.created_at)
    ).mappings()
    return [
        Approval(
            **{**{k: r[k] for k in Approval.__slots__}, "persons": _tuple_or_none(r["persons"])}
        )
        for r in rows
    ]


# --- credentials ----------------------------------------------------------------------------


def insert_credential(conn: Connection, cred: Credential) -> None:
    values = {f: getattr(cred, f) for f in Credential.__slots__}
    values["state"] = cred.state.value
    conn.execute(insert(t.credentials), values)


def _credential(row: RowMapping) -> Credential:
    values = {k: row[k] for k in Credential.__slots__}
    values["state"] = CredentialState(row["state"])
    return Credential(**values)


def get_credential(
    conn: Connection, credential_id: str, *, for_update: bool = False
) -> Credential | None:
    query = select(t.credentials).where(t.credentials.c.id == credential_id)
    if for_update:
        query = query.with_for_update()
    row = conn.execute(query).mappings().first()
    return _credential(row) if row else None


def credentials_for(conn: Connection, task_id: str) -> list[Credential]:
    rows = conn.execute(
        select(t.credentials)
        .where(t.credentials.c.task_id == task_id)
        .order_by(t.credentials.c.created_at)
    ).mappings()
    return [_credential(r) for r in rows]


def credential_by_idempotency_key(conn: Connection, task_id: str, key: str) -> Credential | None:
    row = (
        conn.execute(
            select(t.credentials).where(
                t.credentials.c.task_id == task_id, t.credentials.c.idempotency_key == key
            )
        )
        .mappings()
        .first()
    )
    return _credential(row) if row else None


def update_credential(
    conn: Connection,
    credential_id: str,
    *,
    expect: Sequence[CredentialState] | None = None,
    **values: Any,
) -> bool:
    if isinstance(values.get("state"), CredentialState):
        values["state"] = values["state"].value
    query = update(t.credentials).where(t.credentials.c.id == credential_id)
    if expect is not None:
        query = query.where(t.credentials.c.state.in_([s.value for s in expect]))
    return conn.execute(query, values).rowcount == 1


def credentials_due(
    conn: Connection,
    states: Sequence[CredentialState],
    now: float,
    limit: int,
    *,
    skip_locked: bool,
) -> list[Credential]:
    """Credentials in ``states`` whose next attempt is due; locked rows are skipped on PostgreSQL."""
    query = (
        select(t.credentials)
        .where(
            t.credentials.c.state.in_([s.value for s in states]),
            (t.credentials.c.next_attempt_at.is_(None)) | (t.credentials.c.next_attempt_at <= now),
        )
        .order_by(t.credentials.c.created_at)
        .limit(limit)
    )
    if skip_locked:
        query = query.with_for_update(skip_locked=True)
    return [_credential(r) for r in conn.execute(query).mappings()]


def credential_by_handle(conn: Connection, backend: str, handle: str) -> Credential | None:
    row = (
        conn.execute(
            select(t.credentials).where(
                t.credentials.c.backend == backend, t.credentials.c.handle == handle
            )
        )
        .mappings()
        .first()
    )
    return _credential(row) if row else None


# --- audit ----------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _add_task_context(conn: Connection, event: AuditEvent) -> None:
    """Every event of a task carries the task's scope and the agent's conversation id (the
    convention in docs/audit.md), whichever service wrote it."""
    attrs = event.attributes
    if "broker.scope" in attrs and (
        "gen_ai.conversation.id" in attrs or attrs.get("broker.task.id") == event.task_id
    ):
        return
    row = conn.execute(
        select(t.tasks.c.scope, t.tasks.c.conversation_id).where(t.tasks.c.id == event.task_id)
    ).first()
    if row is None:
        return
    attrs.setdefault("broker.task.id", event.task_id)
    attrs.setdefault("broker.scope", row.scope)
    if row.conversation_id:
        attrs.setdefault("gen_ai.conversation.id", row.conversation_id)


def append_audit(conn: Connection, event: AuditEvent) -> str:
    """Append ``event`` to the hash chain inside the caller's transaction; returns its hash.

    Attributes are sanitized (allowlist, secret scrubbing) before they are hashed and stored. The
    head row is locked (``FOR UPDATE``), so appends from several replicas are ordered and the
    sequence numbers follow the chain.
    """
    if event.task_id:
        _add_task_context(conn, event)
    event.attributes = _json_safe(sanitize_attributes(event.attributes))
    event.links = _json_safe(event.links)
    if event.end_time is None:
        event.end_time = event.time
    head = conn.execute(select(t.audit_head).where(t.audit_head.c.id == 1).with_for_update()).one()
    body = event.body()
    digest = chain_hash(head.hash, body)
    # Values as execution parameters, not .values(): building a statement with a bound literal per
    # column cost more CPU than the round trip on the hot path; this one is compiled once.
    result = conn.execute(
        insert(t.audit_events), {**body, "prev_hash": head.hash, "hash": digest, "exported": False}
    )
    seq = result.inserted_primary_key[0] if result.inserted_primary_key else None
    conn.execute(update(t.audit_head).where(t.audit_head.c.id == 1), {"seq": seq, "hash": digest})
    return digest


def audit_head(conn: Connection, *, for_update: bool = False) -> tuple[int, str]:
    """The chain's head: (sequence number of the last event, its hash)."""
    query = select(t.audit_head.c.seq, t.audit_head.c.hash).where(t.audit_head.c.id == 1)
    if for_update:
        query = query.with_for_update()
    row = conn.execute(query).one()
    return int(row.seq), str(row.hash)


def set_audit_head(conn: Connection, seq: int, head_hash: str) -> None:
    """Move the head (only the tests that tamper with the chain need this)."""
    conn.execute(update(t.audit_head).where(t.audit_head.c.id == 1).values(seq=seq, hash=head_hash))


def audit_events(
    conn: Connection,
    *,
    task_id: str | None = None,
    credential_id: str | None = None,
    session_id: str | None = None,
    actor: tuple[str, str] | None = None,
    subject: str | None = None,
    issuer: str | None = None,
    scope: str | None = None,
    name: str | None = None,
    names: Sequence[str] | None = None,
    outcome: str | None = None,
    trace_id: str | None = None,
    since: float | None = None,
    until: float | None = None,
    after_seq: int = 0,
    before_seq: int | None = None,
    limit: int = 100,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
    """Events matching every given filter, in chain order (or newest first), at most ``limit``.

    Paginate with ``after_seq`` (oldest first) or ``before_seq`` (newest first).
    """
    e = t.audit_events
    equal = {
        e.c.task_id: task_id,
        e.c.credential_id: credential_id,
        e.c.session_id: session_id,
        e.c.actor_subject: subject,
        e.c.actor_issuer: issuer,
        e.c.name: name,
        e.c.outcome: outcome,
        e.c.trace_id: trace_id,
    }
    conds: list[Any] = [column == value for column, value in equal.items() if value is not None]
    conds.append(e.c.seq > after_seq)
    if before_seq is not None:
        conds.append(e.c.seq < before_seq)
    if actor is not None:
        conds.append(and_(e.c.actor_issuer == actor[0], e.c.actor_subject == actor[1]))
    if scope is not None:
        conds.append(e.c.task_id.in_(select(t.tasks.c.id).where(t.tasks.c.scope == scope)))
    if names is not None:
        conds.append(e.c.name.in_(list(names)))
    if since is not None:
        conds.append(e.c.time >= since)
    if until is not None:
        conds.append(e.c.time < until)
    order = e.c.seq.desc() if newest_first else e.c.seq
    rows = conn.execute(select(e).where(*conds).order_by(order).limit(limit)).mappings()
    return [dict(r) for r in rows]


def audit_seqs_with_hash(conn: Connection, digest: str, limit: int = 5) -> list[int]:
    """Sequence numbers of the events whose hash is ``digest`` (verification's detective work)."""
    e = t.audit_events
    rows = conn.execute(select(e.c.seq).where(e.c.hash == digest).order_by(e.c.seq).limit(limit))
    return [int(r.seq) for r in rows]


def audit_event_at(conn: Connection, seq: int) -> dict[str, Any] | None:
    row = conn.execute(select(t.audit_events).where(t.audit_events.c.seq == seq)).mappings().first()
    return dict(row) if row else None


def count_audit_events(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(t.audit_events)).scalar_one())


def issuance_span(conn: Connection, credential_id: str) -> tuple[str, str] | None:
    """(trace id, span id) of a credential's successful issuance event, the parent of its uses."""
    e = t.audit_events
    row = conn.execute(
        select(e.c.trace_id, e.c.span_id)
        .where(
            e.c.credential_id == credential_id,
            e.c.name == "broker.credential.issue",
            e.c.outcome == "success",
        )
        .order_by(e.c.seq)
        .limit(1)
    ).first()
    return (str(row.trace_id), str(row.span_id)) if row else None


def unexported_events(conn: Connection, limit: int, *, skip_locked: bool) -> list[dict[str, Any]]:
    """The oldest events not yet exported; on PostgreSQL rows another replica holds are skipped."""
    e = t.audit_events
    query = select(e).where(e.c.exported.is_(False)).order_by(e.c.seq).limit(limit)
    if skip_locked:
        query = query.with_for_update(skip_locked=True)
    return [dict(r) for r in conn.execute(query).mappings()]


def mark_exported(conn: Connection, seqs: Sequence[int], now: float) -> int:
    """Mark events exported; returns how many were still unexported (0 means another did it)."""
    if not seqs:
        return 0
    e = t.audit_events
    result = conn.execute(
        update(e)
        .where(e.c.seq.in_(list(seqs)), e.c.exported.is_(False))
        .values(exported=True, exported_at=now)
    )
    return int(result.rowcount)


def count_unexported(conn: Connection) -> int:
    return int(
        conn.execute(
            select(func.count())
            .select_from(t.audit_events)
            .where(t.audit_events.c.exported.is_(False))
        ).scalar_one()
    )


def oldest_unexported_time(conn: Connection) -> float | None:
    e = t.audit_events
    value = conn.execute(select(func.min(e.c.time)).where(e.c.exported.is_(False))).scalar()
    return float(value) if value is not None else None


# --- audit checkpoints ----------------------------------------------------------------------


def insert_checkpoint(
    conn: Connection, seq: int, head_hash: str, created_at: float, key_id: str, signature: str
) -> bool:
    """Record a signed checkpoint; False when one for ``seq`` exists (another replica's)."""
    try:
        with conn.begin_nested():
            conn.execute(
                insert(t.audit_checkpoints).values(
                    seq=seq,
                    hash=head_hash,
                    created_at=created_at,
                    key_id=key_id,
                    signature=signature,
                )
            )
    except IntegrityError:
        return False
    return True


def latest_checkpoint(conn: Connection) -> dict[str, Any] | None:
    c = t.audit_checkpoints
    row = conn.execute(select(c).order_by(c.c.seq.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def audit_checkpoints(
    conn: Connection, *, after_seq: int = -1, limit: int = 1000
) -> list[dict[str, Any]]:
    c = t.audit_checkpoints
    rows = conn.execute(
        select(c).where(c.c.seq > after_seq).order_by(c.c.seq).limit(limit)
    ).mappings()
    return [dict(r) for r in rows]


def count_events_after(conn: Connection, seq: int, *, except_name: str | None = None) -> int:
    """How many events follow ``seq`` (optionally not counting one event name)."""
    e = t.audit_events
    query = select(func.count()).select_from(e).where(e.c.seq > seq)
    if except_name is not None:
        query = query.where(e.c.name != except_name)
    return int(conn.execute(query).scalar_one())


# --- audit use ingestion --------------------------------------------------------------------


def remember_ingested(conn: Connection, source: str, record_id: str, now: float) -> bool:
    """Record that a use record was ingested; False when it already was (a duplicate)."""
    try:
        with conn.begin_nested():
            conn.execute(
                insert(t.audit_ingested).values(source=source, record_id=record_id, seen_at=now)
            )
    except IntegrityError:
        return False
    return True


def forget_ingested_before(conn: Connection, before: float) -> int:
    """Drop dedup entries older than ``before`` (sources never replay that far back)."""
    result = conn.execute(delete(t.audit_ingested).where(t.audit_ingested.c.seen_at < before))
    return int(result.rowcount)


def ingest_cursor(
    conn: Connection, source: str, *, for_update: bool = False
) -> dict[str, Any] | None:
    c = t.audit_ingest_cursors
    query = select(c.c.position).where(c.c.source == source)
    if for_update:
        query = query.with_for_update()
    row = conn.execute(query).first()
    return dict(row.position) if row else None


def set_ingest_cursor(conn: Connection, source: str, position: dict[str, Any], now: float) -> None:
    c = t.audit_ingest_cursors
    done = conn.execute(
        update(c).where(c.c.source == source).values(position=position, updated_at=now)
    ).rowcount
    if not done:
        try:
            with conn.begin_nested():
                conn.execute(insert(c).values(source=source, position=position, updated_at=now))
        except IntegrityError:
            conn.execute(
                update(c).where(c.c.source == source).values(position=position, updated_at=now)
            )


def credential_by_detail(conn: Connection, backend: str, key: str, value: str) -> Credential | None:
    """The newest credential of ``backend`` whose ``details[key]`` equals ``value``."""
    c = t.credentials
    row = (
        conn.execute(
            select(c)
            .where(c.c.backend == backend, c.c.details[key].as_string() == value)
            .order_by(c.c.created_at.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    return _credential(row) if row else None


# --- one-time JWT ids -----------------------------------------------------------------------


def remember_jti(conn: Connection, issuer: str, jti: str, expires_at: float, now: float) -> bool:
    """Record a one-time token id; False when it was already seen (a replay).

    The unique insert decides, also between replicas: on PostgreSQL a concurrent insert of the
    same id waits for the first transaction and then fails. Expired ids are purged on the way,
    skipping rows another transaction holds, so two exchanges never wait on each other's purge.
    """
    expired = (
        select(t.seen_jtis.c.issuer, t.seen_jtis.c.jti)
        .where(t.seen_jtis.c.expires_at < now)
        .limit(500)
        .with_for_update(skip_locked=True)
    )
    conn.execute(
        delete(t.seen_jtis).where(tuple_(t.seen_jtis.c.issuer, t.seen_jtis.c.jti).in_(expired))
    )
    try:
        with conn.begin_nested():
            conn.execute(insert(t.seen_jtis).values(issuer=issuer, jti=jti, expires_at=expires_at))
    except IntegrityError:
        return False
    return True


# --- rate limits ----------------------------------------------------------------------------


def _upsert(conn: Connection) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    else:
        from sqlalchemy.dialects.sqlite import insert as upsert  # type: ignore[assignment]
    return upsert


def hit_rate_counter(conn: Connection, key: str, window_start: float, by: int = 1) -> int:
    """Add ``by`` to a fixed window's counter, atomically across replicas; the new count."""
    table = t.rate_counters
    stmt = (
        _upsert(conn)(table)
        .values(key=key, window_start=window_start, count=by)
        .on_conflict_do_update(
            index_elements=[table.c.key, table.c.window_start], set_={"count": table.c.count + by}
        )
        .returning(table.c.count)
    )
    return int(conn.execute(stmt).scalar_one())


def open_rate_counter(conn: Connection, key: str, window_start: float) -> bool:
    """Create a window's counter at zero; True only for the one caller (of any replica) that
    created it, so exactly one learns it came first."""
    table = t.rate_counters
    stmt = (
        _upsert(conn)(table)
        .values(key=key, window_start=window_start, count=0)
        .on_conflict_do_nothing(index_elements=[table.c.key, table.c.window_start])
        .returning(table.c.count)
    )
    return conn.execute(stmt).first() is not None


def take_rate_counters(conn: Connection, prefix: str, ended_before: float) -> list[RowMapping]:
    """Remove and return the counters under ``prefix`` whose window started before
    ``ended_before`` (each returned to exactly one caller across replicas)."""
    table = t.rate_counters
    stmt = (
        delete(table)
        .where(table.c.key.startswith(prefix, autoescape=True))
        .where(table.c.window_start < ended_before)
        .returning(table.c.key, table.c.window_start, table.c.count)
    )
    return list(conn.execute(stmt).mappings())


def prune_rate_counters(conn: Connection, before: float) -> int:
    """Forget windows that started before ``before``."""
    res = conn.execute(delete(t.rate_counters).where(t.rate_counters.c.window_start < before))
    return int(res.rowcount or 0)


# --- template versions ----------------------------------------------------------------------


def remember_template_version(
    conn: Connection, content_hash: str, name: str, body: dict[str, Any], now: float
) -> None:
    """Keep the template version a task is decided under (once per hash)."""
    exists = conn.execute(
        select(t.template_versions.c.hash).where(t.template_versions.c.hash == content_hash)
    ).first()
    if exists is None:
        try:
            with conn.begin_nested():
                conn.execute(
                    insert(t.template_versions).values(
                        hash=content_hash, name=name, body=body, first_seen_at=now
                    )
                )
        except IntegrityError:
            pass  # another replica recorded it first


def get_template_version(conn: Connection, content_hash: str) -> dict[str, Any] | None:
    row = (
        conn.execute(select(t.template_versions).where(t.template_versions.c.hash == content_hash))
        .mappings()
        .first()
    )
    return dict(row) if row else None


def last_approved_version(
    conn: Connection, scope: str, *, exclude_task: str | None = None
) -> dict[str, Any] | None:
    """The most recently approved task of ``scope`` (id, template hash, decision time), if any.

    The console compares a pending task's template version with this one, to show approvers
    what changed since a request for the scope was last approved.
    """
    c = t.tasks.c
    query = select(c.id, c.template_hash, c.decided_at).where(
        c.scope == scope, c.decision_hash.is_not(None), c.decided_at.is_not(None)
    )
    if exclude_task is not None:
        query = query.where(c.id != exclude_task)
    row = conn.execute(query.order_by(c.decided_at.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


# --- task expiry ----------------------------------------------------------------------------


def tasks_due_for_expiry(
    conn: Connection, now: float, limit: int, *, skip_locked: bool
) -> list[Task]:
    """Pending tasks past their request expiry and approved, unminted tasks past their approval's."""
    c = t.tasks.c
    query = (
        select(t.tasks)
        .where(
            ((c.state == TaskState.PENDING.value) & (c.request_expires_at <= now))
            | (
                (c.state == TaskState.APPROVED.value)
                & (c.approval_expires_at <= now)
                & (c.mints == 0)
            )
        )
        .order_by(c.created_at)
        .limit(limit)
    )
    if skip_locked:
        query = query.with_for_update(skip_locked=True)
    return [_task(r) for r in conn.execute(query).mappings()]


# --- webhook deliveries ---------------------------------------------------------------------


def insert_webhook_delivery(conn: Connection, **values: Any) -> None:
    conn.execute(insert(t.webhook_deliveries).values(**values))


def webhook_deliveries_due(
    conn: Connection, now: float, limit: int, *, skip_locked: bool
) -> list[dict[str, Any]]:
    w = t.webhook_deliveries
    query = (
        select(w)
        .where(w.c.state == "pending", w.c.next_attempt_at <= now)
        .order_by(w.c.next_attempt_at)
        .limit(limit)
    )
    if skip_locked:
        query = query.with_for_update(skip_locked=True)
    return [dict(r) for r in conn.execute(query).mappings()]


def update_webhook_delivery(
    conn: Connection, delivery_id: str, *, expect_attempts: int | None = None, **values: Any
) -> bool:
    """Update a delivery; with ``expect_attempts``, only if no other worker has tried it since."""
    w = t.webhook_deliveries
    query = update(w).where(w.c.id == delivery_id)
    if expect_attempts is not None:
        query = query.where(w.c.attempts == expect_attempts, w.c.state == "pending")
    return conn.execute(query.values(**values)).rowcount == 1


def webhook_deliveries(
    conn: Connection, *, task_id: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    w = t.webhook_deliveries
    query = select(w).order_by(w.c.created_at)
    if task_id is not None:
        query = query.where(w.c.task_id == task_id)
    return [dict(r) for r in conn.execute(query.limit(limit)).mappings()]


# --- minting lifecycle: reaper claims, kill switches, signing keys, shared jobs --------------


def claim_credentials(
    conn: Connection,
    *,
    now: float,
    stale_before: float,
    lease: float,
    limit: int,
    skip_locked: bool,
) -> list[Credential]:
    """Claim credentials the reaper must act on, and hide them from other replicas for ``lease``.

    Due are: ``revoke_pending`` whose next attempt is due, ``minting`` intents older than
    ``stale_before`` (a crashed or stuck mint), and ``active`` credentials whose task has ended
    (a revocation that never ran). Rows another replica holds are skipped (``SKIP LOCKED``).
    """
    c = t.credentials.c
    ended = [s.value for s in TaskState if s.terminal]
    due_time = c.next_attempt_at.is_(None) | (c.next_attempt_at <= now)
    query = (
        select(t.credentials)
        .where(
            due_time,
            (c.state == CredentialState.REVOKE_PENDING.value)
            | ((c.state == CredentialState.MINTING.value) & (c.created_at <= stale_before))
            | (
                (c.state == CredentialState.ACTIVE.value)
                & c.task_id.in_(select(t.tasks.c.id).where(t.tasks.c.state.in_(ended)))
            ),
        )
        .order_by(c.created_at)
        .limit(limit)
    )
    if skip_locked:
        query = query.with_for_update(skip_locked=True, of=t.credentials)
    claimed = [_credential(r) for r in conn.execute(query).mappings()]
    if claimed:
        conn.execute(
            update(t.credentials)
            .where(c.id.in_([x.id for x in claimed]))
            .values(next_attempt_at=now + lease)
        )
    return claimed


def expire_lapsed_credentials(
    conn: Connection, now: float, limit: int, *, skip_locked: bool = False
) -> list[Credential]:
    """Active credentials past their expiry (the backend expired them itself), marked expired.

    Only the ones this call moved are returned: when replicas run this at once, each credential
    is reported by exactly one of them (rows another replica holds are skipped on PostgreSQL,
    and the compare-and-set update decides the rest).
    """
    c = t.credentials.c
    query = (
        select(t.credentials)
        .where(c.state == CredentialState.ACTIVE.value, c.expires_at <= now)
        .order_by(c.expires_at)
        .limit(limit)
    )
    if skip_locked:
        query = query.with_for_update(skip_locked=True)
    lapsed = []
    for cred in [_credential(r) for r in conn.execute(query).mappings()]:
        moved = conn.execute(
            update(t.credentials)
            .where(c.id == cred.id, c.state == CredentialState.ACTIVE.value)
            .values(state=CredentialState.EXPIRED.value, next_attempt_at=None, sealed=None)
        ).rowcount
        if moved == 1:
            lapsed.append(cred)
    return lapsed


def active_tasks_past_end(
    conn: Connection, now: float, limit: int, *, skip_locked: bool
) -> list[Task]:
    """Active tasks whose end (the credential's expiry or the session's) has passed."""
    c = t.tasks.c
    query = (
        select(t.tasks)
        .where(c.state == TaskState.ACTIVE.value, c.ends_at <= now)
        .order_by(c.ends_at)
        .limit(limit)
    )
    if skip_locked:
        query = query.with_for_update(skip_locked=True)
    return [_task(r) for r in conn.execute(query).mappings()]


def tasks_of_ended_sessions(
    conn: Connection, now: float, limit: int, *, skip_locked: bool
) -> list[Task]:
    """Open tasks whose session has ended or expired: they end with it."""
    c = t.tasks.c
    s = t.sessions.c
    live = [TaskState.PENDING.value, TaskState.APPROVED.value, TaskState.ACTIVE.value]
    query = (
        select(t.tasks)
        .where(
            c.state.in_(live),
            c.session_id.in_(select(s.id).where(s.ended_at.is_not(None) | (s.expires_at <= now))),
        )
        .order_by(c.created_at)
        .limit(limit)
    )
    if skip_locked:
        query = query.with_for_update(skip_locked=True, of=t.tasks)
    return [_task(r) for r in conn.execute(query).mappings()]


def credentials_by_handles(
    conn: Connection, backend: str, handles: Sequence[str]
) -> dict[str, Credential]:
    """Handle -> credential, for those of ``handles`` a record of ``backend`` holds."""
    if not handles:
        return {}
    c = t.credentials.c
    rows = conn.execute(
        select(t.credentials).where(c.backend == backend, c.handle.in_(list(handles)))
    ).mappings()
    return {str(r["handle"]): _credential(r) for r in rows}


def count_unconfirmed_revocations(conn: Connection) -> int:
    """Credentials left ``revoke_pending`` because something of them may still live."""
    c = t.credentials.c
    return int(
        conn.execute(
            select(func.count()).where(
                c.state == CredentialState.REVOKE_PENDING.value,
                c.last_error.like("revocation_unconfirmed:%"),
            )
        ).scalar_one()
    )


def credentials_by_ids(conn: Connection, ids: Sequence[str]) -> dict[str, Credential]:
    if not ids:
        return {}
    rows = conn.execute(select(t.credentials).where(t.credentials.c.id.in_(list(ids)))).mappings()
    return {r["id"]: _credential(r) for r in rows}


def list_credentials(
    conn: Connection,
    *,
    states: Sequence[CredentialState] | None = None,
    backend: str | None = None,
    limit: int = 100,
) -> list[Credential]:
    """Credentials for operators, newest first (never a secret: there is none in the store)."""
    c = t.credentials.c
    query = select(t.credentials)
    if states is not None:
        query = query.where(c.state.in_([s.value for s in states]))
    if backend is not None:
        query = query.where(c.backend == backend)
    rows = conn.execute(query.order_by(c.created_at.desc()).limit(limit)).mappings()
    return [_credential(r) for r in rows]


def count_credentials_by_state(conn: Connection) -> dict[str, int]:
    c = t.credentials.c
    rows = conn.execute(select(c.state, func.count()).group_by(c.state)).all()
    return {str(state): int(n) for state, n in rows}


def insert_kill_switch(conn: Connection, **values: Any) -> None:
    conn.execute(insert(t.kill_switches).values(**values))


def kill_switches(
    conn: Connection,
    *,
    target: str | None = None,
    value: str | None = None,
    live_at: float | None = None,
    unexpired_at: float | None = None,
    limit: int | None = 1000,
) -> list[dict[str, Any]]:
    """Kill switch entries; with ``live_at``, only those neither lifted nor expired then; with
    ``unexpired_at``, lifted ones too as long as they have not expired. ``limit=None``: all
    (what the policy is rendered from: a cut list would drop denies)."""
    k = t.kill_switches.c
    query = select(t.kill_switches)
    if target is not None:
        query = query.where(k.target == target)
    if value is not None:
        query = query.where(k.value == value)
    if live_at is not None:
        query = query.where(k.lifted_at.is_(None), k.expires_at > live_at)
    if unexpired_at is not None:
        query = query.where(k.expires_at > unexpired_at)
    query = query.order_by(k.created_at)
    if limit is not None:
        query = query.limit(limit)
    return [dict(r) for r in conn.execute(query).mappings()]


def unexpired_credentials(
    conn: Connection,
    backend: str,
    since: float,
    *,
    states: Sequence[CredentialState],
    or_ids: Sequence[str] = (),
) -> list[Credential]:
    """Credentials of ``backend`` that may still be valid after ``since``, in ``states`` (or
    among ``or_ids``, whatever their state)."""
    c = t.credentials.c
    wanted: ColumnElement[bool] = c.state.in_([s.value for s in states])
    if or_ids:
        wanted = wanted | c.id.in_(list(or_ids))
    rows = conn.execute(
        select(t.credentials).where(
            c.backend == backend, c.expires_at.is_(None) | (c.expires_at > since), wanted
        )
    ).mappings()
    return [_credential(r) for r in rows]


def kill_switch_targets(conn: Connection, since: float) -> list[tuple[str, str]]:
    """(backend, target) of every entry that was live at some point after ``since``."""
    k = t.kill_switches.c
    rows = conn.execute(
        select(k.backend, k.target)
        .where((k.expires_at > since) & (k.lifted_at.is_(None) | (k.lifted_at > since)))
        .distinct()
    ).all()
    return [(str(b), str(tg)) for b, tg in rows]


def lift_kill_switch(conn: Connection, switch_id: str, now: float) -> dict[str, Any] | None:
    k = t.kill_switches.c
    res = conn.execute(
        update(t.kill_switches)
        .where(k.id == switch_id, k.lifted_at.is_(None))
        .values(lifted_at=now)
    )
    if res.rowcount != 1:
        return None
    row = conn.execute(select(t.kill_switches).where(k.id == switch_id)).mappings().first()
    return dict(row) if row else None


def publish_signing_key(
    conn: Connection,
    *,
    kid: str,
    alg: str,
    jwk: dict[str, Any],
    created_at: float,
    signs_until: float,
) -> None:
    """Publish a public key (idempotent); a later ``signs_until`` replaces an earlier one."""
    k = t.signing_keys.c
    existing = conn.execute(select(k.signs_until).where(k.kid == kid)).first()
    if existing is None:
        try:
            with conn.begin_nested():
                conn.execute(
                    insert(t.signing_keys).values(
                        kid=kid, alg=alg, jwk=jwk, created_at=created_at, signs_until=signs_until
                    )
                )
            return
        except IntegrityError:
            pass  # another replica published it first
    conn.execute(update(t.signing_keys).where(k.kid == kid).values(signs_until=signs_until))


def signing_key(conn: Connection, kid: str) -> dict[str, Any] | None:
    row = conn.execute(select(t.signing_keys).where(t.signing_keys.c.kid == kid)).mappings().first()
    return dict(row) if row else None


def signing_keys_since(conn: Connection, since: float) -> list[dict[str, Any]]:
    k = t.signing_keys.c
    rows = conn.execute(
        select(t.signing_keys).where(k.signs_until >= since).order_by(k.created_at.desc())
    ).mappings()
    return [dict(r) for r in rows]


def claim_job(conn: Connection, name: str, now: float, interval: float, owner: str) -> bool:
    """Claim a periodic job for this run: True for exactly one replica per interval."""
    j = t.reaper_jobs.c
    exists = conn.execute(select(j.name).where(j.name == name)).first()
    if exists is None:
        try:
            with conn.begin_nested():
                conn.execute(
                    insert(t.reaper_jobs).values(
                        name=name, next_run_at=now + interval, last_run_at=now, last_owner=owner
                    )
                )
            return True
        except IntegrityError:
            pass
    res = conn.execute(
        update(t.reaper_jobs)
        .where(j.name == name, j.next_run_at <= now)
        .values(next_run_at=now + interval, last_run_at=now, last_owner=owner)
    )
    return res.rowcount == 1


def reaper_job(conn: Connection, name: str) -> dict[str, Any] | None:
    row = conn.execute(select(t.reaper_jobs).where(t.reaper_jobs.c.name == name)).mappings().first()
    return dict(row) if row else None
