"""A test double of a revoking backend; ``test_contract.py`` proves it behaves like the real ones."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from broker.backends.base import (
    BackendObject,
    Minted,
    MintOutcomeUnknown,
    MintRequest,
    Revocation,
    RevokeRef,
)
from broker.errors import InvalidRequest, ServiceUnavailable


@dataclass
class FakeObject:
    handle: str
    credential_id: str
    task_id: str
    cluster: str
    expires_at: float
    secret: str


@dataclass
class FakeBackend:
    """Keeps its credentials in memory. Failures are switched on per call kind.

    ``fail_mint``: ``"down"`` (refused before anything exists), ``"unknown"`` (made, then the
    answer lost), or None. ``fail_revoke``: how many revocations fail before they work again.
    ``during_mint``: a hook run inside mint (to observe the intent record, or race a completion).
    """

    name: str = "vault"
    revocation: Revocation = "revoke"
    kind: str = "vault_token"
    objects: dict[str, FakeObject] = field(default_factory=dict)
    fail_mint: str | None = None
    fail_revoke: int = 0
    down: bool = False
    during_mint: Callable[[MintRequest], None] | None = None
    calls: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def plan(self, request: MintRequest) -> dict[str, Any]:
        if getattr(request.spec, "type", None) not in ("vault_token", "vault_database"):
            raise InvalidRequest("the fake backend mints Vault-like credentials")
        return {"meta": {"broker_credential": request.credential_id}}

    def mint(self, request: MintRequest) -> Minted:
        self.calls.append("mint")
        if self.during_mint is not None:
            self.during_mint(request)
        if self.down or self.fail_mint == "down":
            raise ServiceUnavailable("the fake backend is down", code="backend_unavailable")
        handle = "acc_" + secrets.token_hex(8)
        secret = "fake_" + secrets.token_urlsafe(16)
        with self._lock:
            self.objects[handle] = FakeObject(
                handle,
                request.credential_id,
                request.task_id,
                request.cluster,
                time.time() + request.ttl,
                secret,
            )
        if self.fail_mint == "unknown":
            raise MintOutcomeUnknown("the fake backend lost its answer")
        return Minted(
            kind=self.kind,
            handle=handle,
            expires_at=time.time() + request.ttl,
            secret={"token": secret},
            env={"FAKE_TOKEN": secret},
            details={"ttl": request.ttl},
        )

    def revoke(self, ref: RevokeRef) -> None:
        self.calls.append("revoke")
        if self.down:
            raise ServiceUnavailable("the fake backend is down", code="backend_unavailable")
        if self.fail_revoke > 0:
            self.fail_revoke -= 1
            raise ServiceUnavailable("the fake backend refused", code="backend_refused")
        with self._lock:
            if ref.handle is None:
                for handle in [
                    h for h, o in self.objects.items() if o.credential_id == ref.credential_id
                ]:
                    del self.objects[handle]
            else:
                self.objects.pop(ref.handle, None)

    def health(self) -> None:
        if self.down:
            raise ServiceUnavailable("the fake backend is down", code="backend_unavailable")

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "kinds": [self.kind], "fake": True}

    def inventory(self, cluster: str) -> Iterator[BackendObject]:
        with self._lock:
            objects = list(self.objects.values())
        for o in objects:
            if o.cluster == cluster:
                yield BackendObject(self.kind, o.handle, o.credential_id, o.task_id, o.expires_at)

    def alive(self, secret: str) -> bool:
        with self._lock:
            return any(o.secret == secret for o in self.objects.values())
