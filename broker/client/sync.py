"""The synchronous client: ``with client.task("scope", purpose=...) as grant: ...``."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx

from broker.client import _protocol as proto
from broker.client.config import ClientConfig, SessionCache, session_cache_key
from broker.client.errors import (
    ApprovalPending,
    AuthenticationError,
    BrokerClientError,
    BrokerUnreachable,
    CompletionFailed,
    Conflict,
    IdTokenUnavailable,
    InvalidRequest,
    RequestDenied,
    ServiceUnavailable,
    TaskEnded,
    TaskExpired,
)
from broker.client.models import Credential, Grant, Identity, Session, Task
from broker.client.signals import guard
from broker.client.tokens import IdTokenSource, discover, unverified_identity

log = logging.getLogger("broker.client")

OnWait = Callable[[proto.WaitStatus], None]
_RETRIES = 2
#: An ID token fetched to look up the session cache is reused for an exchange only this fresh.
PENDING_TOKEN_AGE = 60.0


class BrokerClient:
    """A broker client for one agent identity.

    The session is opened lazily with the agent's ID token (found as :mod:`broker.client.tokens`
    describes) and renewed when the broker says it ended. Requests that are safe to repeat are
    retried on network errors and 502/503/504; minting never is (a secret is shown once).
    """

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        id_token_source: IdTokenSource | None = None,
        session_cache: SessionCache | None = None,
        http: httpx.Client | None = None,
        environ: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config or ClientConfig.from_env(environ)
        self._environ = environ
        self._id_source = id_token_source
        self._cache = session_cache
        self._sleep = sleep
        self._session: Session | None = None
        if self.config.session_token:
            # Handed over by a parent process; its expiry is unknown until the broker says so.
            self._session = Session(self.config.session_token, expires_at=float("inf"))
        self._http = http or httpx.Client(
            base_url=self.config.broker_url,
            timeout=httpx.Timeout(self.config.timeout, connect=10.0),
            follow_redirects=False,
        )
        self._own_http = http is None
        self._token_http: httpx.Client | None = None
        #: An ID token fetched (to find the cached session) but not yet exchanged, and when.
        self._pending_token: str | None = None
        self._pending_at = 0.0
        self._headers = proto.base_headers(self.config.traceparent, self.config.conversation_id)
        self._scopes: list[dict[str, Any]] | None = None

    @classmethod
    def from_env(cls, **kwargs: Any) -> BrokerClient:
        """A client configured from ``BROKER_*`` variables (see :class:`ClientConfig`)."""
        return cls(**kwargs)

    def close(self) -> None:
        if self._own_http:
            self._http.close()
        if self._token_http is not None:
            self._token_http.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- sessions -----------------------------------------------------------------------------

    def id_token_source(self) -> IdTokenSource:
        if self._id_source is None:
            self._id_source = discover(self._environ, audience=self.config.audience)
        return self._id_source

    def login(self, *, force: bool = False) -> Session:
        """Exchange the agent's ID token for a session (RFC 8693), unless a usable one is held."""
        if not force:
            held = self._held_session()
            if held is not None:
                return held
        id_token = self._id_token()
        self._pending_token = None  # a token is exchanged once; the next login fetches afresh
        resp = self._raw(
            "POST", "/oauth2/token", data=proto.exchange_form(id_token), idempotent=False
        )
        if not resp.is_success:
            raise proto.error_for(resp, audience=self.config.audience)
        body = resp.json()
        session = Session(
            token=str(body["access_token"]),
            expires_at=time.time() + float(body.get("expires_in") or 60),
        )
        self._session = session
        key = self._cache_key(id_token)
        if self._cache is not None and key is not None:
            self._cache.save(key, session, unverified_identity(id_token))
        return session

    def _id_token(self) -> str:
        """The current ID token (fetched once per login; kept only until it is exchanged)."""
        if self._pending_token is None or time.monotonic() - self._pending_at > PENDING_TOKEN_AGE:
            source = self.id_token_source()
            if not getattr(source, "uses_http", True):
                # A file, a variable or a command: no HTTP client needed (building one costs a
                # TLS context, noticeable on every CLI command).
                self._pending_token = source.fetch(self._http)
                self._pending_at = time.monotonic()
                return self._pending_token
            if self._token_http is None:
                # A separate client: the broker's trace and conversation headers stay off the
                # token endpoint (GitHub's, for example).
                self._token_http = httpx.Client(timeout=self.config.timeout, follow_redirects=False)
            self._pending_token = source.fetch(self._token_http)
            self._pending_at = time.monotonic()
        return self._pending_token

    def _cache_key(self, id_token: str | None = None) -> str | None:
        """Where this client's session lives in the cache; fetches an ID token only for sources
        whose sessions are named by the token's identity (a variable or a file: cheap)."""
        if self._cache is None:
            return None
        try:
            source = self.id_token_source()
            key = session_cache_key(self.config.broker_url, source, id_token)
            if key is None and id_token is None:
                key = session_cache_key(self.config.broker_url, source, self._id_token())
        except IdTokenUnavailable:
            return None
        return key

    def _held_session(self) -> Session | None:
        now = time.time()
        if self._session is not None and self._session.usable(now):
            return self._session
        key = self._cache_key()
        if self._cache is not None and key is not None:
            cached = self._cache.load(key, now)
            if cached is not None:
                self._session = cached
                return cached
        return None

    def _drop_session(self) -> None:
        self._session = None
        key = self._cache_key()
        if self._cache is not None and key is not None:
            self._cache.forget(key)

    def whoami(self) -> Identity:
        """The caller's identity as the broker sees it."""
        return Identity.from_json(self._call("GET", "/v1/sessions/current", idempotent=True).json())

    def logout(self) -> None:
        """End the session: the broker completes its open tasks and revokes their credentials."""
        if self._held_session() is None:
            return
        with contextlib.suppress(AuthenticationError):
            self._call("DELETE", "/v1/sessions/current", refresh=False)
        self._drop_session()

    # --- HTTP ---------------------------------------------------------------------------------

    def _raw(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send, retrying network errors and 502/503/504 when the request is safe to repeat."""
        attempt = 0
        while True:
            try:
                resp = self._http.request(
                    method, path, headers={**self._headers, **(headers or {})}, **kwargs
                )
            except httpx.HTTPError as exc:
                if idempotent and attempt < _RETRIES:
                    attempt += 1
                    self._sleep(0.5 * 2**attempt)
                    continue
                raise BrokerUnreachable(
                    f"cannot reach the broker at {self.config.broker_url} ({type(exc).__name__})",
                    next_step="check BROKER_URL and the network; nothing was changed on the broker"
                    if method == "GET"
                    else "check BROKER_URL and the network, then retry",
                ) from None
            if resp.status_code in (502, 503, 504) and idempotent and attempt < _RETRIES:
                attempt += 1
                wait = proto.retry_after(resp, proto.read_problem(resp))
                self._sleep(min(wait if wait is not None else 0.5 * 2**attempt, 5.0))
                continue
            return resp

    def _call(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool = False,
        refresh: bool = True,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """An authenticated call; a refused session is renewed once with a fresh exchange."""
        session = self.login()
        resp = self._raw(
            method,
            path,
            idempotent=idempotent,
            headers={**(headers or {}), "Authorization": f"Bearer {session.token}"},
            **kwargs,
        )
        if resp.status_code == 401 and refresh:
            self._drop_session()
            try:
                session = self.login(force=True)
            except IdTokenUnavailable:
                raise proto.error_for(resp, audience=self.config.audience) from None
            resp = self._raw(
                method,
                path,
                idempotent=idempotent,
                headers={**(headers or {}), "Authorization": f"Bearer {session.token}"},
                **kwargs,
            )
        if not resp.is_success:
            raise proto.error_for(resp, audience=self.config.audience)
        return resp

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
    ) -> Any:
        """Any authenticated call on this client's session (the approver, auditor and admin
        commands use it): the decoded JSON answer. A refusal raises the typed error carrying the
        broker's problem detail and ``code``; reads are retried like every safe request."""
        extra: dict[str, Any] = {}
        if params:
            extra["params"] = {k: v for k, v in params.items() if v is not None}
        if body is not None:
            extra["json"] = body
        resp = self._call(method, path, idempotent=method in ("GET", "HEAD"), **extra)
        return resp.json() if resp.content else None

    # --- tasks --------------------------------------------------------------------------------

    def scopes(self, *, refresh: bool = False) -> list[dict[str, Any]]:
        """The scopes this identity may request, with parameters, limits and approval rule."""
        if self._scopes is None or refresh:
            body = self._call("GET", "/v1/scopes", idempotent=True).json()
            self._scopes = body if isinstance(body, list) else []
        return self._scopes

    def request_task(
        self,
        scope: str,
        *,
        purpose: str,
        params: Mapping[str, Any] | None = None,
        ttl: int | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """Open a task. It comes back approved or pending; a denial raises :class:`RequestDenied`."""
        body = proto.task_body(scope, dict(params or {}), purpose, ttl)
        key = idempotency_key or uuid.uuid4().hex  # so a retried request is the same task
        resp = self._call(
            "POST", "/v1/tasks", json=body, idempotent=True, headers={"Idempotency-Key": key}
        )
        return Task.from_json(resp.json())

    def get_task(self, task_id: str, *, wait: float | None = None) -> Task:
        """A task's state; with ``wait``, the broker may hold the answer until the state changes."""
        params = {"wait": str(round(wait))} if wait else None
        extra: dict[str, Any] = {}
        if wait:  # the broker may hold the answer up to `wait` seconds
            extra["timeout"] = httpx.Timeout(self.config.timeout + wait, connect=10.0)
        resp = self._call(
            "GET", f"/v1/tasks/{_id(task_id)}", idempotent=True, params=params, **extra
        )
        return Task.from_json(resp.json())

    def tasks(self, *, states: list[str] | None = None) -> list[Task]:
        """The caller's tasks, newest first; optionally only in ``states``."""
        params = {"state": list(states)} if states else None
        body = self._call("GET", "/v1/tasks", idempotent=True, params=params).json()
        tasks = [Task.from_json(t) for t in body] if isinstance(body, list) else []
        return [t for t in tasks if not states or t.state in states]

    def approvers(self, task: Task) -> str | None:
        """Who may approve ``task``, from the task or else from its scope's approval rule."""
        try:
            scopes = self.scopes()
        except BrokerClientError:
            scopes = None
        return proto.approvers_text(task, scopes)

    def wait(
        self,
        task: Task,
        *,
        timeout: float | None = None,
        on_wait: OnWait | None = None,
    ) -> Task:
        """Wait for a pending task's decision; return it approved or raise why not.

        ``timeout=None`` waits until the request itself expires; ``timeout=0`` does not wait.
        On timeout :class:`ApprovalPending` says who may approve; the task stays open.
        """
        started = time.monotonic()
        if timeout is None and task.request_expires_at is not None:
            timeout = max(0.0, task.request_expires_at - time.time()) + 5.0
        poller = proto.Poller(None if timeout is None else started + timeout)
        approvers: str | None = None
        while task.pending:
            if approvers is None:
                approvers = self.approvers(task) or ""
            if poller.expired():
                raise ApprovalPending(task, approvers or None)
            if on_wait is not None:
                on_wait(proto.WaitStatus(task, approvers or None, time.monotonic() - started))
            asked = poller.long_poll()
            t0 = time.monotonic()
            task = self.get_task(task.id, wait=asked)
            if task.pending:
                pause = poller.pause(asked, time.monotonic() - t0)
                if pause:
                    self._sleep(pause)
        return proto.settle(task)

    def mint(self, task_id: str, *, idempotency_key: str | None = None) -> Credential:
        """Mint the task's credential. The secret is in the answer only: it is never retried."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        resp = self._call(
            "POST", f"/v1/tasks/{_id(task_id)}/credentials", idempotent=False, headers=headers
        )
        return Credential.from_json(resp.json())

    def complete(self, task_id: str) -> Task:
        """End the task; the broker revokes everything it holds (a pending task is cancelled)."""
        resp = self._call("POST", f"/v1/tasks/{_id(task_id)}/complete", idempotent=True)
        return Task.from_json(resp.json())

    def cancel(self, task_id: str) -> Task:
        resp = self._call("POST", f"/v1/tasks/{_id(task_id)}/cancel", idempotent=True)
        return Task.from_json(resp.json())

    def report_run(
        self,
        task_id: str,
        *,
        command: list[str],
        exit_code: int | None,
        signal: int | None = None,
        started_at: float,
        ended_at: float,
        credential_id: str | None = None,
        span_id: str | None = None,
        via: str = "sdk",
        uses: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Record that a process ran with the task's credential (the broker audits it as a span)."""
        body: dict[str, Any] = {
            "command": command,
            "exit_code": exit_code,
            "signal": signal,
            "started_at": started_at,
            "ended_at": ended_at,
            "via": via,
            "span_id": span_id or secrets.token_hex(8),
        }
        if credential_id:
            body["credential_id"] = credential_id
        if uses:
            body["uses"] = uses[:100]  # e.g. the git credential helper's requests
        resp = self._call("POST", f"/v1/tasks/{_id(task_id)}/exec", json=body, idempotent=True)
        out: dict[str, Any] = resp.json()
        return out

    # --- the one-liners -----------------------------------------------------------------------

    def acquire(
        self,
        scope: str,
        *,
        purpose: str,
        params: Mapping[str, Any] | None = None,
        ttl: int | None = None,
        wait_timeout: float | None = None,
        on_wait: OnWait | None = None,
    ) -> Grant:
        """Request, wait for approval and mint; the caller completes the task when done."""
        task = self.request_task(scope, purpose=purpose, params=params, ttl=ttl)
        task = self.wait(task, timeout=wait_timeout, on_wait=on_wait)
        return Grant(task, self.mint(task.id))

    @contextlib.contextmanager
    def task(
        self,
        scope: str,
        *,
        purpose: str,
        params: Mapping[str, Any] | None = None,
        ttl: int | None = None,
        wait_timeout: float | None = None,
        on_wait: OnWait | None = None,
    ) -> Iterator[Grant]:
        """Hold a scope's credential for the length of a ``with`` block.

        The task is completed (its credentials revoked) when the block ends: normally, on an
        exception, on Ctrl-C, or on SIGTERM/SIGHUP (which then exit with status 128+signal).
        A task still pending when the wait ends is cancelled.
        """

        def open_task() -> Task:
            return self.request_task(scope, purpose=purpose, params=params, ttl=ttl)

        with self._hold(open_task, wait_timeout, on_wait) as grant:
            yield grant

    @contextlib.contextmanager
    def resume(
        self,
        task_id: str,
        *,
        wait_timeout: float | None = None,
        on_wait: OnWait | None = None,
    ) -> Iterator[Grant]:
        """Like :meth:`task`, for a task requested earlier (``broker request --no-wait``)."""
        with self._hold(lambda: self.get_task(task_id), wait_timeout, on_wait) as grant:
            yield grant

    @contextlib.contextmanager
    def _hold(
        self, open_task: Callable[[], Task], wait_timeout: float | None, on_wait: OnWait | None
    ) -> Iterator[Grant]:
        with guard() as signals:
            task: Task | None = None
            try:
                task = open_task()
                task = self.wait(task, timeout=wait_timeout, on_wait=on_wait)
                credential = self.mint(task.id)
                yield Grant(task, credential)
            except BaseException as exc:
                # A task the broker already ended (denied, expired) needs no completion.
                ended = isinstance(exc, (RequestDenied, TaskExpired, TaskEnded))
                if task is not None and not task.terminal and not ended:
                    with signals.deferred():
                        self._complete_after_error(task, exc)
                raise
            else:
                if task is not None:
                    with signals.deferred():
                        self._complete_or_raise(task)

    def _complete_after_error(self, task: Task, exc: BaseException) -> None:
        try:
            self.complete(task.id)
            if isinstance(exc, ApprovalPending):
                exc.mark_cancelled()
        except Conflict:
            pass  # the broker already ended it (revoked, expired): nothing is left to revoke
        except BrokerClientError as cexc:
            log.warning("could not complete task %s: %s", task.id, cexc.detail)
            exc.add_note(
                f"task {task.id} could not be completed ({cexc.detail}); its credential "
                f"expires on its own; end it now with `broker complete {task.id}`"
            )

    def _complete_or_raise(self, task: Task) -> None:
        try:
            self.complete(task.id)
        except Conflict as exc:
            # Ended meanwhile (an operator revoked it, or it expired): its credential is gone.
            log.info("task %s was already ended: %s", task.id, exc.detail)
        except (BrokerUnreachable, ServiceUnavailable, AuthenticationError) as exc:
            raise CompletionFailed(
                f"task {task.id} could not be completed: {exc.detail}",
                next_step=f"run `broker complete {task.id}`; otherwise its credential "
                "expires at the end of its TTL",
            ) from None


def _id(value: str) -> str:
    """A task id as a single path segment (ids are opaque; never let one change the path)."""
    if not value or "/" in value or "?" in value or "#" in value or value in (".", ".."):
        raise InvalidRequest(
            f"{value!r} is not a task id", next_step="use an id from `broker tasks`"
        )
    return value
