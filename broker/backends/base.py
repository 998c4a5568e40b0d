"""The interface every credential backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class MintRequest:
    """Everything a backend needs to mint one credential; already validated and rendered."""

    task_id: str
    credential_id: str
    scope: str
    issuer: str
    subject: str
    ttl: int
    spec: Any  # the template's backend model (VaultTokenBackend, AwsStsBackend, ...)
    params: dict[str, Any] = field(default_factory=dict)
    max_uses: int | None = None


@dataclass(frozen=True, slots=True)
class Minted:
    """What a backend returns. ``secret`` leaves the broker once and is never stored or logged."""

    kind: str
    handle: str
    expires_at: float
    secret: dict[str, str] = field(repr=False)
    env: dict[str, str] = field(repr=False)
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A source of short-lived credentials."""

    #: Stable name used in templates and records (``vault``, ``aws_sts``, ``broker_jwt``).
    name: str

    def mint(self, request: MintRequest) -> Minted:
        """Create a credential, or raise ``ServiceUnavailable``/``InvalidRequest``."""
        ...

    def revoke(self, kind: str, handle: str, details: dict[str, Any]) -> None:
        """Revoke a credential; idempotent: revoking what is already gone succeeds."""
        ...

    def health(self) -> None:
        """Raise ``ServiceUnavailable`` unless the backend answers."""
        ...

    def describe(self) -> dict[str, Any]:
        """Non-secret facts for operators (address, capabilities)."""
        ...
