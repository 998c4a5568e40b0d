"""The console's pages under ``/ui``: sign-in, approvals, a task and its timeline, the audit search.

Every page is rendered on the server; a little JavaScript (``static/console.js``) only refreshes
lists and shows local times, so approving and denying work without it. Decisions, visibility and
audit reads go through the same services and functions as the API (the approval service decides
who may see and decide a task; the auditor routes record every read), so the console enforces
exactly the API's rules and adds none of its own.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.resources
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from broker.api.console import reveal, views
from broker.api.console.security import (
    SECURITY_HEADERS,
    CookiePolicy,
    CsrfRefused,
    SignIn,
    check_csrf,
    check_same_origin,
    csrf_token,
    read_form,
    safe_next,
)
from broker.domain.audit import canonical_json
from broker.domain.principal import Principal, role_refusal
from broker.domain.records import Session, Task
from broker.errors import (
    AuthenticationFailed,
    BrokerError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
)
from broker.oidc.errors import IssuerUnavailable, TokenRefused
from broker.oidc.relying_party import RelyingParty, SignInFailed, pkce_challenge
from broker.oidc.verifier import VerifiedToken
from broker.scopes.grant import grant_summary
from broker.services.approvals import APPROVER_ROLE, MAX_REASON, ApprovalView
from broker.services.grants import task_grant
from broker.services.sessions import VIA_CONSOLE
from broker.store import repo
from broker.wiring import Broker

log = logging.getLogger(__name__)

router = APIRouter(prefix="/ui", include_in_schema=False)

AUDITOR_ROLE = "auditor"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_STATIC = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
#: Most events one search page shows.
PAGE = 100
EVENT_NAMES = sorted(
    {
        "broker.session.start",
        "broker.session.end",
        "broker.auth.failure",
        "broker.task.request",
        "broker.task.decision",
        "broker.task.approval",
        "broker.approval.refused",
        "broker.task.complete",
        "broker.task.expire",
        "broker.credential.issue",
        "broker.credential.use",
        "broker.credential.revoke",
        "broker.credential.expire",
        "broker.request.denied",
        "broker.use.unmatched",
        "broker.audit.checkpoint",
        "broker.audit.access",
    }
)


@dataclass(frozen=True, slots=True)
class Viewer:
    """The person signed in: their session, and the cookie value (never rendered)."""

    session: Session
    token: str

    @property
    def principal(self) -> Principal:
        return self.session.principal

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)

    @property
    def roles(self) -> list[str]:
        return sorted(self.session.principal.roles)

    def can(self, role: str) -> bool:
        return bool(self.session.principal.has_role(role))

    def __repr__(self) -> str:  # never print the token
        return f"Viewer(session={self.session.id!r})"


class Console:
    """The console's parts: templates, the relying party, the cookie policy, the chain cache."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        settings = broker.settings
        self.settings = settings.console
        self.public_url = settings.public_url.rstrip("/")
        self.cookies = CookiePolicy.of(settings)
        self.relying_party: RelyingParty | None = None
        if self.settings.issuer is not None:
            issuer = next(i for i in settings.issuers if i.name == self.settings.issuer)
            secret = self.settings.client_secret
            self.relying_party = RelyingParty(
                issuer,
                client_id=self.settings.client_id,
                redirect_url=self.settings.redirect_url or f"{self.public_url}/ui/callback",
                http=broker.http,
                client_secret=secret.get_secret_value() if secret else None,
                scopes=self.settings.scopes,
                allow_http_loopback=settings.dev_mode,
            )
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("broker.api.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["reveal"] = reveal.reveal
        self.env.filters["warnings"] = reveal.warnings
        self.env.filters["when"] = views.when
        self.env.filters["iso"] = views.iso
        self.env.filters["duration"] = views.duration
        self.env.filters["short"] = lambda h: (h or "")[:12]
        self.env.filters["canonical"] = lambda v: canonical_json(v).decode()
        self.env.filters["grant_summary"] = grant_summary
        self.env.globals["source_labels"] = views.USE_SOURCES
        self.env.globals["kind_labels"] = views.KIND_LABELS
        self.static = {
            name: importlib.resources.files("broker.api.console")
            .joinpath("static", name)
            .read_bytes()
            for name in _STATIC
        }
        self.chain = views.ChainStatusCache(broker.clock)

    # --- rendering ----------------------------------------------------------------------

    def render(
        self,
        template: str,
        viewer: Viewer | None,
        *,
        status: int = 200,
        nav: str = "",
        **context: Any,
    ) -> HTMLResponse:
        html = self.env.get_template(template).render(
            viewer=viewer, nav=nav, signin_ready=self.relying_party is not None, **context
        )
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    def message(
        self,
        viewer: Viewer | None,
        title: str,
        text: str,
        *,
        status: int,
        link: tuple[str, str] | None = None,
    ) -> HTMLResponse:
        return self.render("message.html", viewer, status=status, title=title, text=text, link=link)

    def forbidden(self, viewer: Viewer, role: str) -> HTMLResponse:
        detail = role_refusal(viewer.principal, role, doing="this page").detail
        return self.message(
            viewer, "Not for your roles", detail[:1].upper() + detail[1:] + ".", status=403
        )

    # --- sessions -----------------------------------------------------------------------

    def viewer(self, request: Request) -> Viewer | None:
        """The signed-in person, or None (no cookie, or an unknown, ended or expired session)."""
        token = request.cookies.get(self.cookies.session_cookie)
        if not token or len(token) > 512:
            return None
        try:
            # An API session's token pasted into the cookie drives nothing here.
            session = self.broker.sessions.resolve(token, via=VIA_CONSOLE)
        except AuthenticationFailed:
            return None  # resolve() audited why
        return Viewer(session, token)

    def to_login(self, request: Request) -> RedirectResponse:
        path = request.url.path
        if request.url.query:
            path += "?" + request.url.query
        response = RedirectResponse(f"/ui/login?{urlencode({'next': path})}", status_code=303)
        if request.cookies.get(self.cookies.session_cookie):
            self.clear(response, self.cookies.session_cookie)
        return response

    def set_cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max(1, max_age),
            path="/",
            secure=self.cookies.secure,
            httponly=True,
            samesite=self.cookies.samesite if name == self.cookies.session_cookie else "lax",
        )

    def clear(self, response: Response, name: str) -> None:
        response.delete_cookie(
            name, path="/", secure=self.cookies.secure, httponly=True, samesite="lax"
        )

    # --- sign-in ------------------------------------------------------------------------

    def login(self, request: Request, next_path: str | None) -> Response:
        rp = self.relying_party
        if rp is None:
            return self.message(
                None,
                "Sign-in is not configured",
                "Set console.issuer (BROKER_CONSOLE__ISSUER) to the configured issuer people "
                "sign in with; see docs/console.md.",
                status=503,
            )
        target = safe_next(next_path)
        if self.viewer(request) is not None:
            return RedirectResponse(target, status_code=303)
        sign_in = SignIn.start(target)
        try:
            url = rp.authorization_url(
                state=sign_in.state,
                nonce=sign_in.nonce,
                code_challenge=pkce_challenge(sign_in.code_verifier),
            )
        except IssuerUnavailable as exc:
            log.warning("console sign-in: identity provider unavailable (%s)", exc.internal)
            return self.message(
                None,
                "The identity provider cannot be reached",
                "Try again in a moment.",
                status=503,
                link=("Try again", f"/ui/login?{urlencode({'next': target})}"),
            )
        response = RedirectResponse(url, status_code=303)
        self.set_cookie(
            response, self.cookies.login_cookie, sign_in.cookie_value(), self.settings.login_ttl
        )
        return response

    def _sign_in_failed(
        self, reason: str, text: str, *, status: int = 400, audit: bool = True
    ) -> HTMLResponse:
        rp = self.relying_party
        if audit:
            self.broker.sessions.audit_failure(
                SignInFailed(text),
                presented=None,
                issuer=rp.issuer.issuer if rp else None,
                what="console_sign_in",
                reason=reason,
            )
        response = self.message(
            None, "Sign-in failed", text, status=status, link=("Sign in again", "/ui/login")
        )
        self.clear(response, self.cookies.login_cookie)
        return response

    def _answer_problem(
        self, params: Any, sign_in: SignIn | None, rp: RelyingParty
    ) -> HTMLResponse | None:
        """Why the identity provider's answer cannot complete this browser's sign-in, if so."""
        if sign_in is None:
            return self._sign_in_failed(
                "no_sign_in",
                "This sign-in was not started in this browser, or it took too long. Sign in again.",
            )
        state = params.get("state") or ""
        if not hmac.compare_digest(state.encode(), sign_in.state.encode()):
            return self._sign_in_failed(
                "state_mismatch", "This answer does not belong to your sign-in. Sign in again."
            )
        iss = params.get("iss")
        if iss is not None and iss != rp.issuer.issuer:  # RFC 9207: a mix-up of providers
            return self._sign_in_failed(
                "issuer_mismatch", "The answer came from another identity provider."
            )
        error = params.get("error")
        if error:
            shown = "".join(c for c in error[:64] if c.isalnum() or c in "_-.")
            return self._sign_in_failed(
                "provider_error", f"The identity provider did not sign you in ({shown})."
            )
        return None

    def callback(self, request: Request) -> Response:
        """The identity provider sent the browser back: redeem the code, open a session."""
        rp = self.relying_party
        if rp is None:
            return self.login(request, None)
        params = request.query_params
        sign_in = SignIn.from_cookie(request.cookies.get(self.cookies.login_cookie))
        problem = self._answer_problem(params, sign_in, rp)
        if problem is not None or sign_in is None:
            return problem or self.login(request, None)
        try:
            id_token = rp.redeem(params.get("code") or "", sign_in.code_verifier)

            def check(verified: VerifiedToken) -> None:
                self._check_sign_in(verified, sign_in)

            issued = self.broker.sessions.exchange(id_token, check=check, via=VIA_CONSOLE)
        except SignInFailed as exc:
            log.info("console sign-in refused by the provider: %s", exc.internal)
            return self._sign_in_failed("code_refused", exc.detail)
        except IssuerUnavailable as exc:
            log.warning("console sign-in: identity provider unavailable (%s)", exc.internal)
            return self._sign_in_failed(
                "provider_unavailable",
                "The identity provider cannot be reached. Try again in a moment.",
                status=503,
                audit=False,
            )
        except BrokerError as exc:  # a refused ID token: audited by the session service
            return self._sign_in_failed(
                "token_refused",
                f"Your identity provider's token was refused: {exc.detail}.",
                status=403 if exc.status < 500 else exc.status,
                audit=False,
            )
        if self.cookies.samesite == "strict":
            # A Strict cookie is not sent on the redirect chain that began at the identity
            # provider: continue from a page of our own, so the next request is same-site.
            response: Response = self.render(
                "continue.html", None, next_path=sign_in.next_path, status=200
            )
        else:
            response = RedirectResponse(sign_in.next_path, status_code=303)
        lifetime = int(issued.session.expires_at - self.broker.clock())
        self.set_cookie(response, self.cookies.session_cookie, issued.token, lifetime)
        self.clear(response, self.cookies.login_cookie)
        return response

    def _check_sign_in(self, verified: VerifiedToken, sign_in: SignIn) -> None:
        """The ID token must come from the console's issuer, for its client, for this sign-in."""
        issuer = verified.issuer.issuer
        subject = verified.principal.subject
        if verified.issuer.name != self.settings.issuer:
            raise TokenRefused("unexpected_issuer", issuer=issuer, subject=subject)
        nonce = verified.claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(
            nonce.encode(), sign_in.nonce.encode()
        ):
            raise TokenRefused("nonce_mismatch", issuer=issuer, subject=subject, claim="nonce")
        aud = verified.claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or self.settings.client_id not in audiences:
            raise TokenRefused("audience_mismatch", issuer=issuer, subject=subject, claim="aud")
        azp = verified.claims.get("azp")
        if azp is not None and azp != self.settings.client_id:
            raise TokenRefused("audience_mismatch", issuer=issuer, subject=subject, claim="azp")

    def logout(self, request: Request, form: dict[str, str]) -> Response:
        viewer = self.viewer(request)
        response: Response = RedirectResponse("/ui/signed-out", status_code=303)
        if viewer is not None:
            try:
                check_same_origin(dict(request.headers), self.public_url)
                check_csrf(viewer.token, form.get("csrf"))
            except CsrfRefused as exc:
                return self.message(viewer, "Not signed out", exc.detail, status=403)
            with contextlib.suppress(Conflict):  # ended meanwhile
                self.broker.sessions.end(viewer.session)
        self.clear(response, self.cookies.session_cookie)
        return response

    # --- pages --------------------------------------------------------------------------

    def home(self, viewer: Viewer) -> Response:
        if viewer.can(APPROVER_ROLE):
            return RedirectResponse("/ui/approvals", status_code=303)
        if viewer.can(AUDITOR_ROLE):
            return RedirectResponse("/ui/audit", status_code=303)
        # A console session requests nothing, so it owns no task: an agent's tasks belong to
        # the session (or run) that asked for them, and `broker tasks` lists them there.
        return self.render("home.html", viewer)

    def approvals(self, viewer: Viewer) -> Response:
        if not viewer.can(APPROVER_ROLE):
            return self.forbidden(viewer, APPROVER_ROLE)
        pending = list(reversed(self.broker.approvals.pending_for(viewer.session, limit=200)))
        items = []
        with self.broker.db.read() as conn:
            for view in pending:
                current = view.template.content_hash if view.template else None
                items.append((view, views.version_view(conn, view.task, current)))
        return self.render("approvals.html", viewer, nav="approvals", items=items)

    def _task_context(self, viewer: Viewer, task_id: str) -> dict[str, Any] | None:
        """Everything the task page shows this viewer, or None when they may see nothing."""
        broker = self.broker
        approval: ApprovalView | None = None
        task: Task | None = None
        if viewer.can(APPROVER_ROLE):
            try:
                approval = broker.approvals.view(viewer.session, task_id)
                task = approval.task
            except NotFound:
                approval = None
        trace: Any = None
        if viewer.can(AUDITOR_ROLE):
            from broker.api.routes.audit import task_trace

            try:
                trace = task_trace(task_id, viewer.session, broker)
            except NotFound:
                trace = None
            if trace is not None and task is None:
                with broker.db.read() as conn:
                    task = repo.get_task(conn, task_id)
        if task is None:
            return None
        try:
            current = broker.catalog.get(task.scope).content_hash
        except NotFound:
            current = None
        with broker.db.read() as conn:
            version = views.version_view(conn, task, current)
            requester = repo.get_session(conn, task.session_id)
            credentials = repo.credentials_for(conn, task.id)
            grant = (
                approval.grant
                if approval is not None and approval.grant is not None
                else task_grant(conn, task, broker.catalog, broker.settings)
            )
        timeline = None
        if trace is not None:
            rows = [e.model_dump() for e in trace.events]
            timeline = views.build_timeline(task, credentials, rows, broker.clock())
        trace_url = self.settings.trace_url
        return {
            "task": task,
            "approval": approval,
            "decisions": broker.tasks.approvals_of(task),
            "version": version,
            "grant": grant.grant,
            "requester_name": requester.principal.display_name if requester else None,
            "is_requester": task.requester == viewer.principal.key,
            "credentials": credentials,
            "revoke_warnings": views.credential_warnings(
                [
                    {
                        "id": c.id,
                        "state": c.state.value,
                        "next_attempt_at": c.next_attempt_at,
                        "expires_at": c.expires_at,
                    }
                    for c in credentials
                ]
            ),
            "timeline": timeline,
            "trace_link": trace_url.replace("{trace_id}", task.trace_id) if trace_url else None,
            "max_reason": MAX_REASON,
        }

    def task_page(
        self,
        viewer: Viewer,
        task_id: str,
        *,
        error: str | None = None,
        status: int = 200,
        decided: str | None = None,
        reason: str = "",
    ) -> Response:
        context = self._task_context(viewer, task_id) if _ID.fullmatch(task_id) else None
        if context is None:
            return self.message(
                viewer,
                "No such task",
                "There is no task with this id that you may see.",
                status=404,
            )
        notice = None
        if decided in ("approve", "deny") and error is None:
            state = context["task"].state.value
            notice = (
                f"Your approval was recorded. The task is {state}."
                if decided == "approve"
                else f"Your denial was recorded. The task is {state}."
            )
        return self.render(
            "task.html",
            viewer,
            status=status,
            error=error,
            notice=notice,
            reason=reason,
            nav="approvals" if context["approval"] else "audit",
            **context,
        )

    def decide(self, request: Request, task_id: str, form: dict[str, str]) -> Response:
        viewer = self.viewer(request)
        if viewer is None:
            return RedirectResponse(
                f"/ui/login?{urlencode({'next': f'/ui/tasks/{task_id}'})}", status_code=303
            )
        reason = form.get("reason", "")[: MAX_REASON + 1]
        try:
            check_same_origin(dict(request.headers), self.public_url)
            check_csrf(viewer.token, form.get("csrf"))
        except CsrfRefused as exc:
            return self.task_page(viewer, task_id, error=exc.detail, status=403, reason=reason)
        decision = form.get("decision")
        if decision not in ("approve", "deny") or not _ID.fullmatch(task_id):
            return self.task_page(
                viewer, task_id, error="Choose approve or deny.", status=400, reason=reason
            )
        try:
            self.broker.approvals.decide(
                viewer.session, task_id, approve=decision == "approve", reason=reason
            )
        except BrokerError as exc:  # refused and audited by the approval service
            return self.task_page(
                viewer, task_id, error=exc.detail, status=exc.status, reason=reason
            )
        return RedirectResponse(
            f"/ui/tasks/{quote(task_id)}?{urlencode({'decided': decision})}", status_code=303
        )

    # --- audit --------------------------------------------------------------------------

    def _chain_status(self, viewer: Viewer, *, force: bool) -> views.ChainStatus:
        from broker.api.routes.audit import verify

        # The verification runs (and is recorded as an audit read) on behalf of the viewer.
        return self.chain.get(
            self.settings.verify_interval, lambda: verify(viewer.session, self.broker), force=force
        )

    def audit_page(self, viewer: Viewer, query: dict[str, str]) -> Response:
        from broker.api.routes.audit import events, require_auditor

        try:
            require_auditor(viewer.session, self.broker)
        except Forbidden:
            return self.forbidden(viewer, AUDITOR_ROLE)
        filters = {
            k: query.get(k, "").strip()[:256]
            for k in (
                "task",
                "credential",
                "principal",
                "issuer",
                "scope",
                "name",
                "outcome",
                "since",
                "until",
            )
        }
        error = None
        page: Any = None
        try:
            since = _epoch(filters["since"], "since")
            until = _epoch(filters["until"], "until")
            before = query.get("before")
            page = events(
                viewer.session,
                self.broker,
                task=filters["task"] or None,
                credential=filters["credential"] or None,
                principal=filters["principal"] or None,
                issuer=filters["issuer"] or None,
                scope=filters["scope"] or None,
                name=filters["name"] or None,
                outcome=filters["outcome"] or None,
                since=since,
                until=until,
                before=int(before) if before and before.isdigit() and int(before) > 0 else None,
                order="desc",
                limit=PAGE,
            )
        except InvalidRequest as exc:
            error = exc.detail
        rows = []
        for event in page.events if page else []:
            row = event.model_dump()
            rows.append({**row, "text": views.describe(row)})
        task_hit = credential_hit = None
        with self.broker.db.read() as conn:
            if filters["task"] and _ID.fullmatch(filters["task"]):
                task_hit = repo.get_task(conn, filters["task"])
            if filters["credential"] and _ID.fullmatch(filters["credential"]):
                credential_hit = repo.get_credential(conn, filters["credential"])
            head_seq, head_hash = repo.audit_head(conn)
        chain = self._chain_status(viewer, force=False)
        more = (
            f"/ui/audit?{urlencode({**{k: v for k, v in filters.items() if v}, 'before': page.next})}"
            if page is not None and page.next
            else None
        )
        return self.render(
            "audit.html",
            viewer,
            nav="audit",
            filters=filters,
            rows=rows,
            error=error,
            more=more,
            task_hit=task_hit,
            credential_hit=credential_hit,
            chain=chain,
            head=(head_seq, head_hash),
            event_names=EVENT_NAMES,
            status=400 if error else 200,
        )

    def verify_now(self, request: Request, form: dict[str, str]) -> Response:
        from broker.api.routes.audit import require_auditor

        viewer = self.viewer(request)
        if viewer is None:
            return RedirectResponse("/ui/login?next=/ui/audit", status_code=303)
        try:
            check_same_origin(dict(request.headers), self.public_url)
            check_csrf(viewer.token, form.get("csrf"))
        except CsrfRefused as exc:
            return self.message(viewer, "Not verified", exc.detail, status=403)
        try:
            require_auditor(viewer.session, self.broker)
        except Forbidden:
            return self.forbidden(viewer, AUDITOR_ROLE)
        self._chain_status(viewer, force=True)
        return RedirectResponse("/ui/audit#chain", status_code=303)


def _epoch(value: str, name: str) -> str | None:
    """A form's time (``datetime-local`` is read as UTC, RFC 3339 or epoch seconds as given)."""
    if not value:
        return None
    try:
        return str(float(value))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"{name} must be a date and time (UTC), e.g. 2024-05-01T12:00", code="invalid_time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return str(moment.timestamp())


# --- routes ---------------------------------------------------------------------------------


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def _signed_in(
    page: Callable[[Console, Viewer, Request], Response],
) -> Callable[[Request], Response]:
    """A page for signed-in people: others are sent to sign in and come back."""

    def handler(request: Request) -> Response:
        console = _console(request)
        viewer = console.viewer(request)
        if viewer is None:
            return console.to_login(request)
        try:
            return page(console, viewer, request)
        except BrokerError as exc:
            log.info("console %s: %s (%s)", request.url.path, exc.code, exc.internal)
            return console.message(viewer, exc.title, exc.detail, status=exc.status)

    return handler


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
def home(request: Request) -> Response:
    console = _console(request)
    viewer = console.viewer(request)
    if viewer is None:
        return console.render("signin.html", None, status=200)
    return _signed_in(lambda c, v, r: c.home(v))(request)


@router.get("/login")
def login(request: Request, next: str | None = None) -> Response:
    return _console(request).login(request, next)


@router.get("/callback")
def callback(request: Request) -> Response:
    return _console(request).callback(request)


@router.post("/logout")
async def logout(request: Request) -> Response:
    console = _console(request)
    form = await _form(request)
    if form is None:
        return console.message(None, "Not signed out", "The form could not be read.", status=400)
    return await run_in_threadpool(console.logout, request, form)


@router.get("/signed-out", response_class=HTMLResponse)
def signed_out(request: Request) -> Response:
    return _console(request).message(
        None,
        "Signed out",
        "Your console session has ended.",
        status=200,
        link=("Sign in again", "/ui/login"),
    )


@router.get("/approvals", response_class=HTMLResponse)
def approvals(request: Request) -> Response:
    return _signed_in(lambda c, v, r: c.approvals(v))(request)


@router.get("/tasks/{task_id}", response_class=HTMLResponse)
def task(request: Request, task_id: str) -> Response:
    decided = request.query_params.get("decided")
    return _signed_in(lambda c, v, r: c.task_page(v, task_id, decided=decided))(request)


@router.post("/tasks/{task_id}/decision")
async def decision(request: Request, task_id: str) -> Response:
    console = _console(request)
    form = await _form(request)
    if form is None:
        return console.message(None, "Not recorded", "The form could not be read.", status=400)
    return await run_in_threadpool(console.decide, request, task_id, form)


@router.get("/audit", response_class=HTMLResponse)
def audit(request: Request) -> Response:
    query = dict(request.query_params.items())
    return _signed_in(lambda c, v, r: c.audit_page(v, query))(request)


@router.post("/audit/verify")
async def verify_now(request: Request) -> Response:
    console = _console(request)
    form = await _form(request)
    if form is None:
        return console.message(None, "Not verified", "The form could not be read.", status=400)
    return await run_in_threadpool(console.verify_now, request, form)


@router.get("/static/{name}")
def static(request: Request, name: str) -> Response:
    console = _console(request)
    if name not in _STATIC:
        return Response(status_code=404)
    return Response(
        console.static[name],
        media_type=_STATIC[name],
        headers={"Cache-Control": "no-cache"},
    )


@router.get("/{rest:path}", response_class=HTMLResponse)
def not_found(request: Request, rest: str) -> Response:
    """Any other path under /ui: an HTML 404 page (the API's answers are problem+json)."""
    console = _console(request)
    return console.message(
        console.viewer(request), "Not found", "There is no such page.", status=404
    )


async def _form(request: Request) -> dict[str, str] | None:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return None
    try:
        return await read_form(request.stream())
    except (InvalidRequest, ValueError):
        return None


# --- installation ----------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class SecurityHeaders:
    """Adds the console's security headers to every response under /ui (pure ASGI)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.headers = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/ui" or path.startswith("/ui/")):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *[(k, v) for k, v in self.headers if k not in present],
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: FastAPI) -> None:
    """Serve the console under /ui on ``app`` (whose ``state.broker`` is set)."""
    app.state.console = Console(app.state.broker)
    app.include_router(router)
    app.add_middleware(SecurityHeaders)
