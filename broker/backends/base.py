"""The interface every credential backend implements.

A backend is one small object with four verbs (``mint``, ``revoke``, ``health``, ``describe``)
and one pure check (``plan``) that runs before anything is recorded:

1. ``plan(request)`` validates the rendered request against what the backend will accept and
   returns the non-secret identifiers known *before* the call (an STS SourceIdentity, the Vault
   metadata). The broker stores them with the intent record, so a crash after the backend call
   can still be repaired.
2. ``mint(request)`` creates the credential. An error that proves nothing was created raises
   :class:`~broker.errors.ServiceUnavailable` or :class:`~broker.errors.InvalidRequest`; an
   error after which the backend *may* have created it (a timeout) raises
   :class:`MintOutcomeUnknown`, and the broker treats the intent as something to revoke.
3. ``revoke(ref)`` is idempotent: revoking what is already gone succeeds. ``ref.handle`` may be
   ``None`` for a mint whose outcome is unknown; the backend then finds what it made from the
   metadata in ``ref.details`` (or says it cannot). A backend that can tell the credential
   has expired by itself raises :class:`CredentialExpired`, and the record says ``expired``.
4. ``health()`` raises ``ServiceUnavailable`` unless the backend answers; ``describe()`` returns
   non-secret facts for operators.

Backends that can list what they made implement :class:`Inventory` (the reaper's orphan scan);
backends with a login to keep alive implement :class:`Maintained`; backends that can tell whether
a scope's prerequisites hold (its policies, roles, trust) implement :class:`Checkable`, which
``broker scopes check --live`` calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from broker.errors import ServiceUnavailable

if TYPE_CHECKING:
    from broker.domain.scope import ScopeTemplate
    from broker.scopes.prerequisites import Requirement

#: How a backend takes a credential back: ``revoke`` (the backend deletes it), ``deny_list``
#: (it cannot; the broker installs a deny entry until the credential expires) or ``record``
#: (the broker's record is the truth, e.g. introspection of broker-signed tokens).
Revocation = Literal["revoke", "deny_list", "record"]

#: What each template backend type can enforce, for lint and for the mint-time check.
CAPABILITIES: dict[str, frozenset[str]] = {
    "vault_token": frozenset({"max_uses", "revoke", "inventory"}),
    "vault_database": frozenset({"revoke", "inventory"}),
    "aws_sts": frozenset({"deny_list", "session_policy"}),
    "broker_jwt": frozenset({"introspection"}),
    "github_app": frozenset({"revoke"}),
}


@dataclass(frozen=True, slots=True)
class MintRequest:
    """Everything a backend needs to mint one credential; already validated and rendered."""

    task_id: str
    credential_id: str
    scope: str
    issuer: str
    subject: str
    ttl: int
    spec: Any  # the template's rendered backend model (VaultTokenBackend, AwsStsBackend, ...)
    params: dict[str, Any] = field(default_factory=dict)
    max_uses: int | None = None
    session_id: str | None = None
    #: Names this broker deployment in backend metadata; the orphan scan only touches its own.
    cluster: str = "broker"
    #: The plan's details (filled in by the broker between ``plan`` and ``mint``).
    planned: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Minted:
    """What a backend returns. ``secret`` and ``env`` leave the broker once and are never stored
    or logged (``repr`` hides them)."""

    kind: str
    handle: str
    expires_at: float
    secret: dict[str, str] = field(repr=False)
    env: dict[str, str] = field(repr=False)
    details: dict[str, Any] = field(default_factory=dict)
    #: What the backend needs later to revoke a credential it cannot revoke by a handle alone
    #: (GitHub deletes a token only when shown the token), sealed by the backend under a key
    #: that is never in the store. The broker keeps it with the record until the credential is
    #: revoked or expired, and hands it back in :attr:`RevokeRef.sealed`.
    sealed: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class RevokeRef:
    """A credential to revoke, as the broker remembers it (never its secret)."""

    credential_id: str
    task_id: str
    kind: str
    handle: str | None
    details: dict[str, Any] = field(default_factory=dict)
    #: The latest moment the credential can be valid (its expiry, or the planned maximum).
    expires_at: float | None = None
    #: The backend's sealed revocation material (:attr:`Minted.sealed`), when it gave one.
    sealed: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class BackendObject:
    """Something a backend holds that carries the broker's metadata (for the orphan scan)."""

    kind: str
    handle: str
    credential_id: str
    task_id: str | None = None
    expires_at: float | None = None
    #: ``credential`` (what the agent holds) or ``lease_owner`` (an internal token that owns a lease).
    role: str = "credential"


class MintOutcomeUnknown(ServiceUnavailable):
    """The backend may or may not have created the credential (a timeout after sending)."""

    code = "backend_outcome_unknown"
    title = "The backend did not answer in time; nothing was issued"


class CredentialExpired(ServiceUnavailable):
    """Nothing to revoke: the backend's own expiry has passed, so the credential is ``expired``
    (never reported as ``revoked``: nobody took it back)."""

    code = "credential_expired"
    title = "The credential has expired at the backend"


class RevocationUnconfirmed(ServiceUnavailable):
    """The revocation ran, but the backend still holds something that is (or may be) the
    credential: it is not recorded as revoked, and the reaper tries again."""

    code = "revocation_unconfirmed"
    title = "The backend could not confirm that nothing of the credential lives"


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A live lease as the backend lists it (no owner: Vault's lease lookup names none)."""

    lease_id: str
    issued_at: float | None
    expires_at: float | None


@runtime_checkable
class Leases(Protocol):
    """A backend that can list the live leases of a dynamic-secret role (Vault's database
    engine), so a lost mint can be confirmed gone."""

    def leases(self, mount: str, role: str) -> list[LeaseInfo]:
        """Every lease under ``MOUNT/creds/ROLE/`` that still exists, with its issue time."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A source of short-lived credentials."""

    #: Stable name used in records (``vault``, ``aws_sts``, ``broker_jwt``).
    name: str
    #: How this backend takes a credential back.
    revocation: Revocation

    def plan(self, request: MintRequest) -> dict[str, Any]:
        """Check the request without I/O; return non-secret details to record with the intent."""
        ...

    def mint(self, request: MintRequest) -> Minted:
        """Create a credential, or raise ``ServiceUnavailable``/``InvalidRequest``/``MintOutcomeUnknown``."""
        ...

    def revoke(self, ref: RevokeRef) -> None:
        """Revoke a credential; idempotent: revoking what is already gone succeeds."""
        ...

    def health(self) -> None:
        """Raise ``ServiceUnavailable`` unless the backend answers."""
        ...

    def describe(self) -> dict[str, Any]:
        """Non-secret facts for operators (address, capabilities)."""
        ...


@runtime_checkable
class Inventory(Protocol):
    """A backend that can list the objects carrying this broker's metadata."""

    def inventory(self, cluster: str) -> Iterator[BackendObject]:
        """Every live object this broker cluster made (credentials and lease owners)."""
        ...


@runtime_checkable
class Maintained(Protocol):
    """A backend with its own login to keep alive (renew before expiry, log in again)."""

    def maintain(self) -> None:
        """Renew or refresh the broker's own backend identity when due."""
        ...


@runtime_checkable
class Checkable(Protocol):
    """A backend that checks, live, what a scope needs from it (``broker scopes check --live``).

    ``check`` starts from :func:`broker.scopes.prerequisites.requirements` for the template (or
    its own list) and returns each with its status: ``ok``, ``missing`` (with exactly what to
    create in ``fix``) or ``unknown`` (the broker may not look; ``found`` says why). It never
    creates anything, and answers only from the backend (no cache): it is the admin's question
    "would a mint of this scope work now?". A new backend implements this method and registers
    its offline list in ``broker.scopes.prerequisites.REQUIREMENTS``.
    """

    def check(self, template: ScopeTemplate) -> list[Requirement]:
        """Each prerequisite of ``template`` at this backend, with its status."""
        ...
