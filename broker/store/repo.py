"""Repository functions. Each takes an open connection so callers choose the transaction."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, RowMapping, and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from broker.domain.audit import AuditEvent, chain_hash
from broker.domain.principal import Principal
from broker.domain.records import Approval, Credential, Session, Task
from broker.domain.task import CredentialState, TaskState
from broker.store import schema as t

# --- sessions -------------------------------------------------------------------------------


def insert_session(conn: Connection, session: Session, token_hash: str) -> None:
    p = session.principal
    conn.execute(
        insert(t.sessions).values(
            id=session.id,
            token_hash=token_hash,
            issuer=p.issuer,
            subject=p.subject,
            display_name=p.display_name,
            claims={**p.claims, "groups": list(p.groups)},
            roles=sorted(p.roles),
            created_at=session.created_at,
            expires_at=session.expires_at,
            ended_at=session.ended_at,
            trace_id=session.trace_id,
            span_id=session.span_id,
        )
    )


def _session(row: RowMapping) -> Session:
    claims = dict(row["claims"])
    groups = tuple(claims.pop("groups", ()) or ())
    return Session(
        id=row["id"],
        principal=Principal(
            issuer=row["issuer"],
            subject=row["subject"],
            display_name=row["display_name"],
            groups=groups,
            roles=frozenset(row["roles"]),
            claims=claims,
        ),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        ended_at=row["ended_at"],
        trace_id=row["trace_id"],
        span_id=row["span_id"],
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


def insert_task(conn: Connection, task: Task) -> None:
    values = {f: getattr(task, f) for f in Task.__slots__}
    values["state"] = task.state.value
    conn.execute(insert(t.tasks).values(**values))


def _task(row: RowMapping) -> Task:
    values = {k: row[k] for k in Task.__slots__}
    values["state"] = TaskState(row["state"])
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
    return conn.execute(query.values(**values)).rowcount == 1


def list_tasks(
    conn: Connection,
    *,
    issuer: str | None = None,
    subject: str | None = None,
    states: Iterable[TaskState] | None = None,
    session_id: str | None = None,
    limit: int = 100,
) -> list[Task]:
    query = select(t.tasks)
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
            conn.execute(
                insert(t.approvals).values({f: getattr(approval, f) for f in Approval.__slots__})
            )
    except IntegrityError:
        return False
    return True


def approvals_for(conn: Connection, task_id: str) -> list[Approval]:
    rows = conn.execute(
        select(t.approvals)
        .where(t.approvals.c.task_id == task_id)
        .order_by(t.approvals.c.created_at)
    ).mappings()
    return [Approval(**{k: r[k] for k in Approval.__slots__}) for r in rows]


# --- credentials ----------------------------------------------------------------------------


def insert_credential(conn: Connection, cred: Credential) -> None:
    values = {f: getattr(cred, f) for f in Credential.__slots__}
    values["state"] = cred.state.value
    conn.execute(insert(t.credentials).values(**values))


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
    return conn.execute(query.values(**values)).rowcount == 1


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


def append_audit(conn: Connection, event: AuditEvent) -> str:
    """Append ``event`` to the hash chain inside the caller's transaction; returns its hash.

    The head row is locked (``FOR UPDATE``), so appends from several replicas are ordered.
    """
    event.attributes = _json_safe(event.attributes)
    event.links = _json_safe(event.links)
    if event.end_time is None:
        event.end_time = event.time
    head = conn.execute(select(t.audit_head).where(t.audit_head.c.id == 1).with_for_update()).one()
    body = event.body()
    digest = chain_hash(head.hash, body)
    result = conn.execute(
        insert(t.audit_events).values(**body, prev_hash=head.hash, hash=digest, exported=False)
    )
    seq = result.inserted_primary_key[0] if result.inserted_primary_key else None
    conn.execute(update(t.audit_head).where(t.audit_head.c.id == 1).values(seq=seq, hash=digest))
    return digest


def audit_events(
    conn: Connection,
    *,
    task_id: str | None = None,
    credential_id: str | None = None,
    session_id: str | None = None,
    actor: tuple[str, str] | None = None,
    name: str | None = None,
    since: float | None = None,
    until: float | None = None,
    after_seq: int = 0,
    limit: int = 100,
) -> list[dict[str, Any]]:
    e = t.audit_events
    conds: list[Any] = [e.c.seq > after_seq]
    if task_id is not None:
        conds.append(e.c.task_id == task_id)
    if credential_id is not None:
        conds.append(e.c.credential_id == credential_id)
    if session_id is not None:
        conds.append(e.c.session_id == session_id)
    if actor is not None:
        conds.append(and_(e.c.actor_issuer == actor[0], e.c.actor_subject == actor[1]))
    if name is not None:
        conds.append(e.c.name == name)
    if since is not None:
        conds.append(e.c.time >= since)
    if until is not None:
        conds.append(e.c.time < until)
    rows = conn.execute(select(e).where(*conds).order_by(e.c.seq).limit(limit)).mappings()
    return [dict(r) for r in rows]


def unexported_events(conn: Connection, limit: int, *, skip_locked: bool) -> list[dict[str, Any]]:
    e = t.audit_events
    query = select(e).where(e.c.exported.is_(False)).order_by(e.c.seq).limit(limit)
    if skip_locked:
        query = query.with_for_update(skip_locked=True)
    return [dict(r) for r in conn.execute(query).mappings()]


def mark_exported(conn: Connection, seqs: Sequence[int], now: float) -> None:
    if seqs:
        conn.execute(
            update(t.audit_events)
            .where(t.audit_events.c.seq.in_(list(seqs)))
            .values(exported=True, exported_at=now)
        )


def count_unexported(conn: Connection) -> int:
    return int(
        conn.execute(
            select(func.count())
            .select_from(t.audit_events)
            .where(t.audit_events.c.exported.is_(False))
        ).scalar_one()
    )


# --- one-time JWT ids -----------------------------------------------------------------------


def remember_jti(conn: Connection, issuer: str, jti: str, expires_at: float, now: float) -> bool:
    """Record a one-time token id; False when it was already seen (a replay)."""
    conn.execute(delete(t.seen_jtis).where(t.seen_jtis.c.expires_at < now))
    try:
        with conn.begin_nested():
            conn.execute(insert(t.seen_jtis).values(issuer=issuer, jti=jti, expires_at=expires_at))
    except IntegrityError:
        return False
    return True
