"""OpenBao / HashiCorp Vault: child tokens with policies, dynamic database credentials.

Every request the broker makes to Vault goes through this module (the only one importing hvac).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import hvac
import hvac.exceptions
import requests

from broker.backends.base import Minted, MintRequest
from broker.domain.scope import VaultDatabaseBackend, VaultTokenBackend
from broker.errors import InvalidRequest, ServiceUnavailable
from broker.settings import VaultSettings

log = logging.getLogger(__name__)

#: Policies no template may hand out.
FORBIDDEN_POLICIES = frozenset({"root"})

_UNAVAILABLE = (
    requests.exceptions.RequestException,
    hvac.exceptions.VaultDown,
    hvac.exceptions.InternalServerError,
)


def _unavailable(exc: Exception) -> ServiceUnavailable:
    return ServiceUnavailable(
        "OpenBao/Vault is unavailable", code="backend_unavailable", internal=repr(exc)
    )


class VaultBackend:
    """Mints from OpenBao/Vault with the broker's own token."""

    name = "vault"

    def __init__(self, settings: VaultSettings) -> None:
        self.settings = settings
        self._local = threading.local()

    @property
    def client(self) -> hvac.Client:
        # requests.Session is not thread-safe to share; keep one client per thread.
        client: hvac.Client | None = getattr(self._local, "client", None)
        if client is None:
            token = self.settings.token.get_secret_value() if self.settings.token else None
            client = hvac.Client(
                url=self.settings.addr,
                token=token,
                namespace=self.settings.namespace,
                timeout=int(self.settings.timeout),
                verify=self.settings.verify_tls,
            )
            self._local.client = client
        return client

    # --- interface ------------------------------------------------------------------------

    def mint(self, request: MintRequest) -> Minted:
        spec = request.spec
        try:
            if isinstance(spec, VaultTokenBackend):
                return self._mint_token(request, spec)
            if isinstance(spec, VaultDatabaseBackend):
                return self._mint_database(request, spec)
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from None
        except hvac.exceptions.VaultError as exc:
            raise ServiceUnavailable(
                "OpenBao/Vault refused to mint the credential",
                code="backend_refused",
                internal=repr(exc),
            ) from None
        raise InvalidRequest(f"the vault backend cannot mint {type(spec).__name__}")

    def revoke(self, kind: str, handle: str, details: dict[str, Any]) -> None:
        try:
            if kind == "vault_token":
                self.client.auth.token.revoke_accessor(handle)
            elif kind == "vault_lease":
                self.client.sys.revoke_lease(handle)  # type: ignore[no-untyped-call]
            else:
                raise InvalidRequest(f"the vault backend cannot revoke {kind!r}")
        except hvac.exceptions.InvalidRequest as exc:
            # An accessor or lease that no longer exists is already revoked.
            if (
                "invalid accessor" in str(exc)
                or "lease not found" in str(exc)
                or "invalid lease" in str(exc)
            ):
                return
            raise ServiceUnavailable(
                "OpenBao/Vault refused the revocation", internal=repr(exc)
            ) from None
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from None
        except hvac.exceptions.VaultError as exc:
            raise ServiceUnavailable(
                "OpenBao/Vault refused the revocation", internal=repr(exc)
            ) from None

    def health(self) -> None:
        try:
            status = self.client.sys.read_health_status(method="GET")
        except Exception as exc:
            raise _unavailable(exc) from None
        body = status.json() if hasattr(status, "json") else status
        if isinstance(body, dict) and body.get("sealed"):
            raise ServiceUnavailable("OpenBao/Vault is sealed", code="backend_unavailable")

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "addr": self.settings.addr,
            "kinds": ["vault_token", "vault_lease"],
        }

    # --- kinds ----------------------------------------------------------------------------

    def _mint_token(self, request: MintRequest, spec: VaultTokenBackend) -> Minted:
        policies = list(spec.policies)
        if FORBIDDEN_POLICIES.intersection(policies):
            raise InvalidRequest("the root policy can never be requested", code="forbidden_policy")
        ttl = f"{request.ttl}s"
        response = self.client.auth.token.create(
            role_name=self.settings.token_role,
            policies=policies,
            no_default_policy=spec.no_default_policy,
            ttl=ttl,
            explicit_max_ttl=ttl,
            num_uses=request.max_uses or 0,
            renewable=False,
            display_name=f"broker-{request.scope}"[:64],
            meta={
                "broker_task": request.task_id,
                "broker_credential": request.credential_id,
                "broker_scope": request.scope,
                "broker_subject": request.subject[:256],
            },
        )
        auth = response["auth"]
        token = auth["client_token"]
        lease = int(auth.get("lease_duration") or request.ttl)
        return Minted(
            kind="vault_token",
            handle=auth["accessor"],
            expires_at=time.time() + lease,
            secret={"token": token},
            env={"VAULT_ADDR": self.settings.addr, "VAULT_TOKEN": token},
            details={
                "policies": auth.get("policies", policies),
                "ttl": lease,
                "num_uses": request.max_uses or 0,
            },
        )

    def _mint_database(self, request: MintRequest, spec: VaultDatabaseBackend) -> Minted:
        response = self.client.secrets.database.generate_credentials(
            name=spec.role,
            mount_point=spec.mount,  # type: ignore[no-untyped-call]
        )
        lease_id = response["lease_id"]
        lease = int(response.get("lease_duration") or request.ttl)
        if lease > request.ttl:
            # The role's default TTL is longer than the task allows: shorten the lease itself.
            with contextlib.suppress(hvac.exceptions.VaultError):
                self.client.sys.renew_lease(lease_id=lease_id, increment=request.ttl)  # type: ignore[no-untyped-call]
            lease = min(lease, request.ttl)
        data = response["data"]
        return Minted(
            kind="vault_lease",
            handle=lease_id,
            expires_at=time.time() + lease,
            secret={"username": data["username"], "password": data["password"]},
            env={"PGUSER": data["username"], "PGPASSWORD": data["password"]},
            details={
                "mount": spec.mount,
                "role": spec.role,
                "username": data["username"],
                "ttl": lease,
            },
        )
