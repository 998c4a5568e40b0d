"""Agent and human sessions: exchange a verified ID token for an opaque session token."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from broker.domain.audit import AuditEvent, EventName, Outcome, new_span_id, new_trace_id
from broker.domain.ids import new_id, new_session_token, token_hash
from broker.domain.records import Session
from broker.errors import AuthenticationFailed, BrokerError, Conflict
from broker.oidc.verifier import TokenVerifier, VerifiedToken
from broker.services.common import Clock, TraceContext, record
from broker.settings import Settings
from broker.store import Database, repo

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IssuedSession:
    session: Session
    token: str  # shown once to the caller, never stored


class SessionService:
    """Opens, resolves and ends sessions."""

    def __init__(
        self, settings: Settings, db: Database, verifier: TokenVerifier, clock: Clock
    ) -> None:
        self.settings = settings
        self.db = db
        self.verifier = verifier
        self.clock = clock

    def audit_failure(
        self,
        error: BrokerError,
        *,
        presented: str | None,
        issuer: str | None = None,
        subject: str | None = None,
        what: str = "token",
    ) -> None:
        """Record a refused authentication: reason and a hash of what was presented, never itself."""
        now = self.clock()
        event = AuditEvent(
            name=EventName.AUTH_FAILURE,
            outcome=Outcome.DENIED,
            time=now,
            trace_id=new_trace_id(),
            actor_issuer=issuer,
            actor_subject=subject,
            attributes={
                "broker.auth.reason": str(error.extra.get("reason", error.code)),
                "broker.auth.code": error.code,
                "broker.auth.credential_type": what,
                "broker.auth.token_sha256": token_hash(presented) if presented else None,
            },
        )
        try:
            with self.db.write() as conn:
                record(conn, event)
        except BrokerError:
            log.exception("could not audit an authentication failure")

    def exchange(self, id_token: str, trace: TraceContext | None = None) -> IssuedSession:
        """Verify an ID token and open a session bounded by its expiry and the configured cap."""
        try:
            verified = self.verifier.verify(id_token)
        except AuthenticationFailed as exc:
            self.audit_failure(exc, presented=id_token)
            raise
        now = self.clock()
        principal = verified.principal
        expires_at = min(verified.expires_at, now + self.settings.session_max_ttl)
        token = new_session_token()
        session = Session(
            id=new_id("ses"),
            principal=principal,
            created_at=now,
            expires_at=expires_at,
            ended_at=None,
            trace_id=trace.trace_id if trace else new_trace_id(),
            span_id=new_span_id(),
        )
        try:
            self._open(session, token, verified, id_token, trace, now)
        except AuthenticationFailed as exc:
            self.audit_failure(
                exc, presented=id_token, issuer=principal.issuer, subject=principal.subject
            )
            raise
        return IssuedSession(session, token)

    def _open(
        self,
        session: Session,
        token: str,
        verified: VerifiedToken,
        id_token: str,
        trace: TraceContext | None,
        now: float,
    ) -> None:
        principal = session.principal
        expires_at = session.expires_at
        with self.db.write() as conn:
            if (
                verified.jti is not None
                and verified.issuer.require_jti
                and not repo.remember_jti(
                    conn,
                    principal.issuer,
                    verified.jti,
                    verified.expires_at + verified.issuer.leeway,
                    now,
                )
            ):
                raise AuthenticationFailed(
                    "this token was already used",
                    code="invalid_token",
                    extra={"reason": "replayed_jti"},
                )
            repo.insert_session(conn, session, token_hash(token))
            record(
                conn,
                AuditEvent(
                    name=EventName.SESSION_START,
                    outcome=Outcome.SUCCESS,
                    time=now,
                    trace_id=session.trace_id,
                    span_id=session.span_id,
                    parent_span_id=trace.span_id if trace else None,
                    session_id=session.id,
                    actor_issuer=principal.issuer,
                    actor_subject=principal.subject,
                    attributes={
                        "broker.principal.sub": principal.subject,
                        "broker.issuer": principal.issuer,
                        "broker.session.id": session.id,
                        "broker.session.expires_at": expires_at,
                        "broker.id_token.sha256": token_hash(id_token),
                    },
                ),
            )

    def resolve(self, bearer: str) -> Session:
        """The live session behind a bearer token, or ``AuthenticationFailed``."""
        with self.db.read() as conn:
            session = repo.session_by_token_hash(conn, token_hash(bearer))
        if session is None or not session.live(self.clock()):
            error = AuthenticationFailed(
                "the session token is unknown, expired or ended",
                code="invalid_session",
                extra={"reason": "unknown_session" if session is None else "session_over"},
            )
            self.audit_failure(
                error,
                presented=bearer,
                what="session",
                issuer=session.principal.issuer if session else None,
                subject=session.principal.subject if session else None,
            )
            raise error
        return session

    def end(self, session: Session) -> None:
        now = self.clock()
        with self.db.write() as conn:
            if not repo.end_session(conn, session.id, now):
                raise Conflict("the session has already ended", code="session_ended")
            record(
                conn,
                AuditEvent(
                    name=EventName.SESSION_END,
                    outcome=Outcome.SUCCESS,
                    time=now,
                    trace_id=session.trace_id,
                    parent_span_id=session.span_id,
                    session_id=session.id,
                    actor_issuer=session.principal.issuer,
                    actor_subject=session.principal.subject,
                    attributes={"broker.session.id": session.id},
                ),
            )
