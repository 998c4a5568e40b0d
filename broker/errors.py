"""One error root for the whole broker.

Every error the broker raises on purpose is a :class:`BrokerError`. Each class carries a stable
machine-readable ``code``, an HTTP status and a public ``detail`` written for the caller. Anything
that only an operator should see (a backend's message, the pattern a value failed) goes into
``internal`` and is logged, never returned.

    BrokerError
    ├── InvalidRequest            400  bad input of any kind
    │   └── ValidationFailed      422  a body or parameter that does not fit its schema
    ├── AuthenticationFailed      401  no, bad or expired credentials of the caller
    ├── Forbidden                 403  authenticated, but not allowed
    ├── NotFound                  404
    ├── Conflict                  409  state does not allow this (already decided, replay, ...)
    ├── PreconditionFailed        412  the template changed under an approval, ...
    ├── RateLimited               429  with ``retry_after`` seconds
    ├── ConfigurationError        500  refused configuration (raised at start-up, not per request)
    ├── ScopeMisconfigured        500  a scope's backend setup is incomplete (a missing policy, role, trust)
    └── ServiceUnavailable        503  a backend, the store or the audit log cannot be reached
        └── AuditUnavailable      503  the audit record cannot be written: fail closed
"""

from __future__ import annotations

from typing import Any, ClassVar


class BrokerError(Exception):
    """Root of every error the broker raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        internal: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.detail = detail or self.title
        self.internal = internal
        self.extra = extra or {}
        if code is not None:
            self.code = code  # type: ignore[misc]  # an instance may refine the class code
        super().__init__(self.detail)

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


class InvalidRequest(BrokerError):
    code = "invalid_request"
    status = 400
    title = "Invalid request"


class ValidationFailed(InvalidRequest):
    code = "validation_failed"
    status = 422
    title = "The request does not match its schema"


class AuthenticationFailed(BrokerError):
    code = "unauthenticated"
    status = 401
    title = "Authentication failed"


class Forbidden(BrokerError):
    code = "forbidden"
    status = 403
    title = "Not allowed"


class NotFound(BrokerError):
    code = "not_found"
    status = 404
    title = "Not found"


class Conflict(BrokerError):
    code = "conflict"
    status = 409
    title = "Conflict with the current state"


class PreconditionFailed(BrokerError):
    code = "precondition_failed"
    status = 412
    title = "Precondition failed"


class RateLimited(BrokerError):
    code = "rate_limited"
    status = 429
    title = "Too many requests"

    def __init__(self, detail: str | None = None, *, retry_after: int, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.retry_after = max(1, int(retry_after))
        self.extra.setdefault("retry_after", self.retry_after)


class ConfigurationError(BrokerError):
    code = "configuration_error"
    status = 500
    title = "Invalid configuration"


class ScopeMisconfigured(BrokerError):
    """A scope names something its backend does not have or does not allow (an OpenBao policy
    that does not exist, a token role that does not allow it, a database role or IAM role that is
    missing or does not trust the broker).

    Neither the caller's fault (no 4xx: changing the request cannot help) nor transient (no 503:
    retrying cannot help until an admin fixes the scope). The public detail names the scope only;
    the cause goes to ``internal`` (the log, ``/readyz`` and ``broker scopes check --live``).
    """

    code = "scope_misconfigured"
    status = 500
    title = "The scope is misconfigured at its backend"


class ServiceUnavailable(BrokerError):
    code = "service_unavailable"
    status = 503
    title = "A service the broker depends on is unavailable"


class AuditUnavailable(ServiceUnavailable):
    code = "audit_unavailable"
    title = "The audit record could not be written; nothing was issued"
