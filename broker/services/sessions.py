"""Agent and human sessions: exchange a verified ID token for an opaque session token.

A session token is ``brk_sess_`` plus 256 random bits; only its SHA-256 is stored. A session
lives no longer than the ID token it came from, the global ``session_max_ttl`` and the issuer's
own cap. Every refusal - a bad token, an unreachable issuer, a replayed ``jti``, an unknown or
ended session - is audited as ``broker.auth.failure`` with the reason and the token's SHA-256,
never the token. When the caller's address is known (every HTTP request), refusals also go
through the :class:`~broker.services.auth_guard.AuthGuard`: throttled per address and issuer,
and a flood of them audited as summaries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.domain.audit import AuditEvent, EventName, Outcome, new_span_id, new_trace_id
from broker.domain.ids import new_id, new_session_token, token_hash
from broker.domain.principal import role_refusal
from broker.domain.records import Session
from broker.errors import AuthenticationFailed, BrokerError, Conflict
from broker.oidc.errors import TokenRefused
from broker.oidc.trust import run_identity_of
from broker.oidc.verifier import TokenKind, TokenVerifier, VerifiedToken
from broker.services.auth_guard import AuthGuard
from broker.services.common import Clock, TraceContext, record
from broker.settings import Settings
from broker.store import Database, repo

log = logging.getLogger(__name__)

#: Where a session was opened, and where alone it may be used (``Session.via``).
VIA_API = "api"
VIA_CONSOLE = "console"


@dataclass(frozen=True, slots=True)
class IssuedSession:
    """A new session and its token (shown once to the caller, never stored)."""

    session: Session
    token: str


class SessionService:
    """Opens, resolves and ends sessions."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        verifier: TokenVerifier,
        clock: Clock,
        guard: AuthGuard | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.verifier = verifier
        self.clock = clock
        self.guard = guard

    def admit(self, address: str | None, *, what: str, trace: TraceContext | None = None) -> None:
        """Refuse (429) a client address over its failure budget before any work on its token."""
        if self.guard is not None:
            self.guard.admit(
                address,
                lambda error: self._failure_event(
                    error, presented=None, what=what, reason="rate_limited", trace=trace
                ),
            )

    # --- refusals -------------------------------------------------------------------------

    def audit_failure(
        self,
        error: BrokerError,
        *,
        presented: str | None,
        issuer: str | None = None,
        subject: str | None = None,
        what: str = "token",
        reason: str | None = None,
        trace: TraceContext | None = None,
        address: str | None = None,
    ) -> None:
        """Record a refused authentication: reason and a hash of what was presented, never itself.

        ``issuer`` and ``subject`` default to what a :class:`TokenRefused` knows: the configured
        issuer the token named and, once its signature was verified, the subject. Unverified
        values go to ``broker.auth.claimed_*`` attributes, never into the actor fields. With the
        client's ``address`` the refusal is counted and, in a flood, summarised (AuthGuard).
        """
        event = self._failure_event(
            error,
            presented=presented,
            issuer=issuer,
            subject=subject,
            what=what,
            reason=reason,
            trace=trace,
        )
        attributes = event.attributes
        if self.guard is not None and address is not None:
            audited = self.guard.refused(
                address,
                attributes["broker.auth.reason"],
                event.actor_issuer,
                event,
                counts=error.status < 500,  # an outage on our side is not the client's doing
            )
        else:
            audited = True
            try:
                with self.db.write() as conn:
                    record(conn, event)
            except BrokerError:
                # The refusal stands either way; failing to record it must not make it a 5xx.
                log.exception("could not audit an authentication failure")
        if audited:  # a flood is logged as its summary, like it is audited
            log.info(
                "authentication refused: %s (%s, issuer=%s, token sha256=%s)",
                attributes["broker.auth.reason"],
                what,
                event.actor_issuer,
                attributes["broker.auth.token_sha256"],
            )

    def _failure_event(
        self,
        error: BrokerError,
        *,
        presented: str | None,
        issuer: str | None = None,
        subject: str | None = None,
        what: str = "token",
        reason: str | None = None,
        trace: TraceContext | None = None,
    ) -> AuditEvent:
        issuer = issuer or getattr(error, "issuer", None)
        subject = subject or getattr(error, "subject", None)
        attributes: dict[str, Any] = {
            "broker.auth.reason": reason or str(getattr(error, "reason", None) or error.code),
            "broker.auth.code": error.code,
            "broker.auth.status": error.status,
            "broker.auth.credential_type": what,
            "broker.auth.token_sha256": token_hash(presented) if presented else None,
        }
        if issuer:
            attributes["broker.issuer"] = issuer
        if subject:
            attributes["broker.principal.sub"] = subject
        if error.internal:
            attributes["broker.auth.detail"] = error.internal[:500]
        if isinstance(error, TokenRefused):
            for key, value in error.claimed.items():
                attributes[f"broker.auth.claimed_{key}"] = value
            if error.extra.get("claim"):
                attributes["broker.auth.claim"] = error.extra["claim"]
        return AuditEvent(
            name=EventName.AUTH_FAILURE,
            outcome=Outcome.DENIED,
            time=self.clock(),
            trace_id=trace.trace_id if trace else new_trace_id(),
            parent_span_id=trace.span_id if trace else None,
            actor_issuer=issuer,
            actor_subject=subject,
            attributes=attributes,
        )

    def require_role(
        self, session: Session, role: str, *, doing: str, trace: TraceContext | None = None
    ) -> None:
        """Refuse (403, audited as ``broker.request.denied``) a session without ``role``."""
        if session.principal.has_role(role):
            return
        error = role_refusal(session.principal, role, doing=doing)
        with self.db.write() as conn:
            record(
                conn,
                AuditEvent(
                    name=EventName.REQUEST_DENIED,
                    outcome=Outcome.DENIED,
                    time=self.clock(),
                    trace_id=trace.trace_id if trace else new_trace_id(),
                    parent_span_id=trace.span_id if trace else None,
                    session_id=session.id,
                    actor_issuer=session.principal.issuer,
                    actor_subject=session.principal.subject,
                    links=[
                        {
                            "trace_id": session.trace_id,
                            "span_id": session.span_id,
                            "type": "session",
                        }
                    ],
                    attributes={
                        "broker.principal.sub": session.principal.subject,
                        "broker.issuer": session.principal.issuer,
                        "broker.request.kind": doing,
                        "broker.role.required": role,
                        "broker.principal.roles": sorted(session.principal.roles),
                        "broker.refusal.code": error.code,
                        "broker.refusal.detail": error.detail,
                    },
                ),
            )
        raise error

    # --- exchange -------------------------------------------------------------------------

    def exchange(
        self,
        id_token: str,
        trace: TraceContext | None = None,
        *,
        check: Callable[[VerifiedToken], None] | None = None,
        via: str = VIA_API,
        kind: TokenKind = "id_token",
        address: str | None = None,
    ) -> IssuedSession:
        """Verify an ID token (or, where the issuer accepts them, an access token: ``kind``)
        and open a session bounded by its expiry and the configured caps.

        ``check`` may refuse a verified token for the caller's own reasons (the console checks
        the sign-in's nonce and issuer) by raising a ``BrokerError``, audited like any refusal;
        ``via`` names where the session was opened and where alone it works (``api``: a bearer
        token; ``console``: the console's cookie), recorded as ``broker.session.via``;
        ``address`` is the client's, for throttling (see :meth:`admit`).
        """
        self.admit(address, what="token", trace=trace)
        try:
            verified = self.verifier.verify(id_token, kind)
            if check is not None:
                check(verified)
        except BrokerError as exc:  # TokenRefused, IssuerUnavailable
            self.audit_failure(exc, presented=id_token, trace=trace, address=address)
            raise
        now = self.clock()
        principal = verified.principal
        cap = self.settings.session_max_ttl
        if verified.issuer.session_max_ttl is not None:
            cap = min(cap, verified.issuer.session_max_ttl)
        session = Session(
            id=new_id("ses"),
            principal=principal,
            created_at=now,
            expires_at=min(verified.expires_at, now + cap),
            ended_at=None,
            trace_id=trace.trace_id if trace else new_trace_id(),
            span_id=new_span_id(),
            via=via,
            run_identity=run_identity_of(verified.issuer, verified.claims),
        )
        token = new_session_token()
        try:
            self._open(session, token, verified, id_token, trace, via)
        except AuthenticationFailed as exc:
            self.audit_failure(
                exc,
                presented=id_token,
                issuer=principal.issuer,
                subject=principal.subject,
                trace=trace,
                address=address,
            )
            raise
        if verified.trust.audit_only_denial:
            log.warning(
                "issuer %s is in trust audit mode: session %s would have been denied (%s)",
                verified.issuer.name,
                session.id,
                verified.trust.verdict.reason,
            )
        return IssuedSession(session, token)

    def _open(
        self,
        session: Session,
        token: str,
        verified: VerifiedToken,
        id_token: str,
        trace: TraceContext | None,
        via: str,
    ) -> None:
        principal = session.principal
        issuer = verified.issuer
        attributes: dict[str, Any] = {
            "broker.principal.sub": principal.subject,
            "broker.principal.roles": sorted(principal.roles),
            "broker.issuer": principal.issuer,
            "broker.issuer.name": issuer.name,
            "broker.session.id": session.id,
            "broker.session.expires_at": session.expires_at,
            "broker.id_token.sha256": token_hash(id_token),
            "broker.subject_token.kind": verified.kind,
        }
        if verified.jti is not None:
            attributes["broker.id_token.jti"] = verified.jti[:256]
        attributes["broker.session.via"] = via
        if session.run_identity is not None:
            attributes["broker.session.run"] = session.run_identity
        if principal.persons is not None:
            attributes["broker.principal.persons"] = list(principal.persons)
        if verified.trust.audit_only_denial:
            attributes["broker.trust.mode"] = "audit"
            attributes["broker.trust.would_deny"] = True
            attributes["broker.trust.reason"] = verified.trust.verdict.reason[:500]
        with self.db.write() as conn:
            # The jti is remembered in the same transaction as the session: if anything below
            # fails, the token was not used and may be presented again.
            if (
                issuer.require_jti
                and verified.jti is not None
                and not repo.remember_jti(
                    conn,
                    principal.issuer,
                    verified.jti,
                    verified.expires_at + issuer.leeway,
                    session.created_at,
                )
            ):
                raise TokenRefused(
                    "token_replayed", issuer=principal.issuer, subject=principal.subject
                )
            repo.insert_session(conn, session, token_hash(token))
            record(
                conn,
                AuditEvent(
                    name=EventName.SESSION_START,
                    outcome=Outcome.SUCCESS,
                    time=session.created_at,
                    trace_id=session.trace_id,
                    span_id=session.span_id,
                    parent_span_id=trace.span_id if trace else None,
                    session_id=session.id,
                    actor_issuer=principal.issuer,
                    actor_subject=principal.subject,
                    attributes=attributes,
                ),
            )

    # --- use ------------------------------------------------------------------------------

    def resolve(
        self,
        bearer: str,
        trace: TraceContext | None = None,
        *,
        via: str = VIA_API,
        address: str | None = None,
    ) -> Session:
        """The live session behind a token, or ``AuthenticationFailed`` (audited).

        ``via`` is where the token was presented: a console session's cookie is no API bearer
        token, and an API session cannot drive the console. ``address`` is the client's, for
        throttling (see :meth:`admit`).
        """
        self.admit(address, what="session", trace=trace)
        with self.db.read() as conn:
            session = repo.session_by_token_hash(conn, token_hash(bearer))
        if session is not None and session.live(self.clock()) and session.via != via:
            error = AuthenticationFailed(
                f"this session was opened for the {session.via} and works only there; "
                + (
                    "API calls need a session from POST /oauth2/token"
                    if via == VIA_API
                    else "sign in to the console"
                ),
                code="wrong_session_kind",
            )
            self.audit_failure(
                error,
                presented=bearer,
                what="session",
                reason=f"{session.via}_session_used_via_{via}",
                issuer=session.principal.issuer,
                subject=session.principal.subject,
                trace=trace,
                address=address,
            )
            raise error
        if session is None or not session.live(self.clock()):
            if session is None:
                reason = "unknown_session"
            elif session.ended_at is not None:
                reason = "session_ended"
            else:
                reason = "session_expired"
            error = AuthenticationFailed(
                "the session token is unknown, expired or ended", code="invalid_session"
            )
            self.audit_failure(
                error,
                presented=bearer,
                what="session",
                reason=reason,
                issuer=session.principal.issuer if session else None,
                subject=session.principal.subject if session else None,
                trace=trace,
                address=address,
            )
            raise error
        return session

    def end(self, session: Session) -> None:
        """End a session now; its token stops working at once."""
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
