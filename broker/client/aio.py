"""The asynchronous client: ``async with client.task("scope", purpose=...) as grant: ...``.

It mirrors :class:`broker.client.sync.BrokerClient` method for method; see there for details.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
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
    RequestDenied,
    ServiceUnavailable,
    TaskEnded,
    TaskExpired,
)
from broker.client.models import Credential, Grant, Identity, Session, Task
from broker.client.signals import AsyncSignalGuard
from broker.client.sync import _id
from broker.client.tokens import IdTokenSource, discover, unverified_identity

log = logging.getLogger("broker.client")

OnWait = Callable[[proto.WaitStatus], Awaitable[None] | None]
_RETRIES = 2
#: An ID token fetched to look up the session cache is reused for an exchange only this fresh.
PENDING_TOKEN_AGE = 60.0


class AsyncBrokerClient:
    """An asynchronous broker client for one agent identity (asyncio or trio)."""

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        id_token_source: IdTokenSource | None = None,
        session_cache: SessionCache | None = None,
        http: httpx.AsyncClient | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config or ClientConfig.from_env(environ)
        self._environ = environ
        self._id_source = id_token_source
        self._cache = session_cache
        self._session: Session | None = None
        if self.config.session_token:
            self._session = Session(self.config.session_token, expires_at=float("inf"))
        self._http = http or httpx.AsyncClient(
            base_url=self.config.broker_url,
            timeout=httpx.Timeout(self.config.timeout, connect=10.0),
            follow_redirects=False,
        )
        self._own_http = http is None
        self._headers = proto.base_headers(self.config.traceparent, self.config.conversation_id)
        self._scopes: list[dict[str, Any]] | None = None
        self._login_lock = anyio.Lock()
        #: An ID token fetched (to find the cached session) but not yet exchanged, and when.
        self._pending_token: str | None = None
        self._pending_at = 0.0

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- sessions -----------------------------------------------------------------------------

    def id_token_source(self) -> IdTokenSource:
        if self._id_source is None:
            self._id_source = discover(self._environ, audience=self.config.audience)
        return self._id_source

    async def login(self, *, force: bool = False) -> Session:
        async with self._login_lock:  # concurrent calls share one exchange
            if not force:
                held = await self._held_session()
                if held is not None:
                    return held
            id_token = await self._id_token()
            self._pending_token = None
            resp = await self._raw(
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
            key = await self._cache_key(id_token)
            if self._cache is not None and key is not None:
                self._cache.save(key, session, unverified_identity(id_token))
            return session

    async def _id_token(self) -> str:
        if self._pending_token is None or time.monotonic() - self._pending_at > PENDING_TOKEN_AGE:
            source = self.id_token_source()

            def fetch() -> str:
                with httpx.Client(timeout=self.config.timeout, follow_redirects=False) as http:
                    return source.fetch(http)

            self._pending_token = await anyio.to_thread.run_sync(fetch)
            self._pending_at = time.monotonic()
        return self._pending_token

    async def _cache_key(self, id_token: str | None = None) -> str | None:
        """As :meth:`BrokerClient._cache_key`."""
        if self._cache is None:
            return None
        try:
            source = self.id_token_source()
            key = session_cache_key(self.config.broker_url, source, id_token)
            if key is None and id_token is None:
                key = session_cache_key(self.config.broker_url, source, await self._id_token())
        except IdTokenUnavailable:
            return None
        return key

    async def _held_session(self) -> Session | None:
        now = time.time()
        if self._session is not None and self._session.usable(now):
            return self._session
        key = await self._cache_key()
        if self._cache is not None and key is not None:
            cached = self._cache.load(key, now)
            if cached is not None:
                self._session = cached
                return cached
        return None

    async def _drop_session(self) -> None:
        self._session = None
        key = await self._cache_key()
        if self._cache is not None and key is not None:
            self._cache.forget(key)

    async def whoami(self) -> Identity:
        resp = await self._call("GET", "/v1/sessions/current", idempotent=True)
        return Identity.from_json(resp.json())

    async def logout(self) -> None:
        if await self._held_session() is None:
            return
        with contextlib.suppress(AuthenticationError):
            await self._call("DELETE", "/v1/sessions/current", refresh=False)
        await self._drop_session()

    # --- HTTP ---------------------------------------------------------------------------------

    async def _raw(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = await self._http.request(
                    method, path, headers={**self._headers, **(headers or {})}, **kwargs
                )
            except httpx.HTTPError as exc:
                if idempotent and attempt < _RETRIES:
                    attempt += 1
                    await anyio.sleep(0.5 * 2**attempt)
                    continue
                raise BrokerUnreachable(
                    f"cannot reach the broker at {self.config.broker_url} ({type(exc).__name__})",
                    next_step="check BROKER_URL and the network, then retry",
                ) from None
            if resp.status_code in (502, 503, 504) and idempotent and attempt < _RETRIES:
                attempt += 1
                wait = proto.retry_after(resp, proto.read_problem(resp))
                await anyio.sleep(min(wait if wait is not None else 0.5 * 2**attempt, 5.0))
                continue
            return resp

    async def _call(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool = False,
        refresh: bool = True,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        session = await self.login()
        resp = await self._raw(
            method,
            path,
            idempotent=idempotent,
            headers={**(headers or {}), "Authorization": f"Bearer {session.token}"},
            **kwargs,
        )
        if resp.status_code == 401 and refresh:
            await self._drop_session()
            try:
                session = await self.login(force=True)
            except IdTokenUnavailable:
                raise proto.error_for(resp, audience=self.config.audience) from None
            resp = await self._raw(
                method,
                path,
                idempotent=idempotent,
                headers={**(headers or {}), "Authorization": f"Bearer {session.token}"},
                **kwargs,
            )
        if not resp.is_success:
            raise proto.error_for(resp, audience=self.config.audience)
        return resp

    # --- tasks --------------------------------------------------------------------------------

    async def scopes(self, *, refresh: bool = False) -> list[dict[str, Any]]:
        if self._scopes is None or refresh:
            body = (await self._call("GET", "/v1/scopes", idempotent=True)).json()
            self._scopes = body if isinstance(body, list) else []
        return self._scopes

    async def request_task(
        self,
        scope: str,
        *,
        purpose: str,
        params: Mapping[str, Any] | None = None,
        ttl: int | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        body = proto.task_body(scope, dict(params or {}), purpose, ttl)
        key = idempotency_key or uuid.uuid4().hex
        resp = await self._call(
            "POST", "/v1/tasks", json=body, idempotent=True, headers={"Idempotency-Key": key}
        )
        return Task.from_json(resp.json())

    async def get_task(self, task_id: str, *, wait: float | None = None) -> Task:
        params = {"wait": str(round(wait))} if wait else None
        extra: dict[str, Any] = {}
        if wait:
            extra["timeout"] = httpx.Timeout(self.config.timeout + wait, connect=10.0)
        resp = await self._call(
            "GET", f"/v1/tasks/{_id(task_id)}", idempotent=True, params=params, **extra
        )
        return Task.from_json(resp.json())

    async def tasks(self, *, states: list[str] | None = None) -> list[Task]:
        params = {"state": list(states)} if states else None
        body = (await self._call("GET", "/v1/tasks", idempotent=True, params=params)).json()
        tasks = [Task.from_json(t) for t in body] if isinstance(body, list) else []
        return [t for t in tasks if not states or t.state in states]

    async def approvers(self, task: Task) -> str | None:
        """Who may approve ``task``, from the task or else from its scope's approval rule."""
        try:
            scopes = await self.scopes()
        except BrokerClientError:
            scopes = None
        return proto.approvers_text(task, scopes)

    async def wait(
        self, task: Task, *, timeout: float | None = None, on_wait: OnWait | None = None
    ) -> Task:
        started = time.monotonic()
        if timeout is None and task.request_expires_at is not None:
            timeout = max(0.0, task.request_expires_at - time.time()) + 5.0
        poller = proto.Poller(None if timeout is None else started + timeout)
        approvers: str | None = None
        while task.pending:
            if approvers is None:
                approvers = await self.approvers(task) or ""
            if poller.expired():
                raise ApprovalPending(task, approvers or None)
            if on_wait is not None:
                result = on_wait(
                    proto.WaitStatus(task, approvers or None, time.monotonic() - started)
                )
                if result is not None:
                    await result
            asked = poller.long_poll()
            t0 = time.monotonic()
            task = await self.get_task(task.id, wait=asked)
            if task.pending:
                pause = poller.pause(asked, time.monotonic() - t0)
                if pause:
                    await anyio.sleep(pause)
        return proto.settle(task)

    async def mint(self, task_id: str, *, idempotency_key: str | None = None) -> Credential:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        resp = await self._call(
            "POST", f"/v1/tasks/{_id(task_id)}/credentials", idempotent=False, headers=headers
        )
        return Credential.from_json(resp.json())

    async def complete(self, task_id: str) -> Task:
        resp = await self._call("POST", f"/v1/tasks/{_id(task_id)}/complete", idempotent=True)
        return Task.from_json(resp.json())

    async def cancel(self, task_id: str) -> Task:
        resp = await self._call("POST", f"/v1/tasks/{_id(task_id)}/cancel", idempotent=True)
        return Task.from_json(resp.json())

    async def report_run(
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
        resp = await self._call(
            "POST", f"/v1/tasks/{_id(task_id)}/exec", json=body, idempotent=True
        )
        out: dict[str, Any] = resp.json()
        return out

    # --- the one-liners -----------------------------------------------------------------------

    async def acquire(
        self,
        scope: str,
        *,
        purpose: str,
        params: Mapping[str, Any] | None = None,
        ttl: int | None = None,
        wait_timeout: float | None = None,
        on_wait: OnWait | None = None,
    ) -> Grant:
        task = await self.request_task(scope, purpose=purpose, params=params, ttl=ttl)
        task = await self.wait(task, timeout=wait_timeout, on_wait=on_wait)
        return Grant(task, await self.mint(task.id))

    @contextlib.asynccontextmanager
    async def task(
        self,
        scope: str,
        *,
        purpose: str,
        params: Mapping[str, Any] | None = None,
        ttl: int | None = None,
        wait_timeout: float | None = None,
        on_wait: OnWait | None = None,
    ) -> AsyncIterator[Grant]:
        """Hold a scope's credential for the length of an ``async with`` block.

        Completed on normal exit, exception, cancellation, and (under asyncio) SIGTERM/SIGHUP,
        after which the process exits with status 128+signal.
        """

        async def open_task() -> Task:
            return await self.request_task(scope, purpose=purpose, params=params, ttl=ttl)

        async with self._hold(open_task, wait_timeout, on_wait) as grant:
            yield grant

    @contextlib.asynccontextmanager
    async def resume(
        self, task_id: str, *, wait_timeout: float | None = None, on_wait: OnWait | None = None
    ) -> AsyncIterator[Grant]:
        """Like :meth:`task`, for a task requested earlier."""

        async def open_task() -> Task:
            return await self.get_task(task_id)

        async with self._hold(open_task, wait_timeout, on_wait) as grant:
            yield grant

    @contextlib.asynccontextmanager
    async def _hold(
        self,
        open_task: Callable[[], Awaitable[Task]],
        wait_timeout: float | None,
        on_wait: OnWait | None,
    ) -> AsyncIterator[Grant]:
        signals = AsyncSignalGuard()
        signals.install()
        task: Task | None = None
        try:
            task = await open_task()
            task = await self.wait(task, timeout=wait_timeout, on_wait=on_wait)
            credential = await self.mint(task.id)
            yield Grant(task, credential)
        except BaseException as exc:
            ended = isinstance(exc, (RequestDenied, TaskExpired, TaskEnded))
            if task is not None and not task.terminal and not ended:
                with anyio.CancelScope(shield=True):
                    await self._complete_after_error(task, exc)
            if signals.received is not None:
                raise SystemExit(128 + signals.received) from None
            raise
        else:
            if task is not None:
                with anyio.CancelScope(shield=True):
                    await self._complete_or_raise(task)
        finally:
            signals.uninstall()

    async def _complete_after_error(self, task: Task, exc: BaseException) -> None:
        try:
            await self.complete(task.id)
            if isinstance(exc, ApprovalPending):
                exc.mark_cancelled()
        except Conflict:
            pass
        except BrokerClientError as cexc:
            log.warning("could not complete task %s: %s", task.id, cexc.detail)
            exc.add_note(
                f"task {task.id} could not be completed ({cexc.detail}); its credential "
                f"expires on its own; end it now with `broker complete {task.id}`"
            )

    async def _complete_or_raise(self, task: Task) -> None:
        try:
            await self.complete(task.id)
        except Conflict as exc:
            log.info("task %s was already ended: %s", task.id, exc.detail)
        except (BrokerUnreachable, ServiceUnavailable, AuthenticationError) as exc:
            raise CompletionFailed(
                f"task {task.id} could not be completed: {exc.detail}",
                next_step=f"run `broker complete {task.id}`; otherwise its credential "
                "expires at the end of its TTL",
            ) from None
