"""OpenBao / HashiCorp Vault: child tokens with policies, dynamic database credentials.

Every request the broker makes to Vault goes through this module (the only one importing hvac).

The broker's own identity is a token (renewed before it expires), an AppRole login or a JWT
login (re-done before the token expires; the JWT file is re-read each time). What it mints:

- ``vault_token``: a service token created through the configured token role (which should be
  ``orphan=true``, so the tokens do not die with the broker's own token), carrying the template's
  policies, ``ttl`` = ``explicit_max_ttl`` = the task's TTL, ``num_uses`` = the template's use
  count, non-renewable, and metadata naming the cluster, task and credential. A policy Vault
  would read as ``root`` or as one of ``forbidden_policies`` (names compared after Vault's own
  normalisation, :mod:`broker.domain.vault_policies`), or whose text grants ``sudo``, is refused
  before anything is created.
- ``vault_database``: dynamic database credentials. A broker-internal *lease owner* token (made
  through ``lease_token_role``, carrying the same metadata) reads ``MOUNT/creds/ROLE``; the lease
  is shortened to the task's TTL. Revoking the lease (by lease id) drops the database user;
  revoking the owner token does too, which is how the orphan scan cleans up after a crash.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import hvac
import hvac.exceptions
import requests

from broker.backends.base import (
    BackendObject,
    LeaseInfo,
    Minted,
    MintOutcomeUnknown,
    MintRequest,
    Revocation,
    RevocationUnconfirmed,
    RevokeRef,
)
from broker.domain.scope import ScopeTemplate, VaultDatabaseBackend, VaultTokenBackend
from broker.domain.vault_policies import ForbiddenPolicies, vault_policy_name
from broker.errors import InvalidRequest, ScopeMisconfigured, ServiceUnavailable
from broker.scopes.prerequisites import Names, Requirement, requirements, vault_policies
from broker.settings import VaultSettings

log = logging.getLogger(__name__)

#: A policy granting ``sudo`` on any path is refused (HCL and JSON both quote capabilities).
_SUDO = re.compile(r"""["']sudo["']""", re.IGNORECASE)
_POLICY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
#: How long a policy's vetting result is reused (only a policy that exists is remembered: an admin
#: who creates a missing policy sees the next mint use it).
POLICY_CACHE_SECONDS = 60.0
#: Vault's refusals that mean the scope names something Vault does not have or does not allow.
_MISCONFIGURED = (
    "allowed policies",
    "disallowed by this role",
    "unknown role",
    "role not found",
    "no handler for route",
)
#: Metadata keys on every token the broker creates.
META_CLUSTER = "broker_cluster"
META_TASK = "broker_task"
META_CREDENTIAL = "broker_credential"
META_ROLE = "broker_role"

_DEFINITELY_NOT_SENT = (requests.exceptions.ConnectTimeout, requests.exceptions.SSLError)


def _unavailable(exc: Exception, what: str = "OpenBao/Vault is unavailable") -> ServiceUnavailable:
    return ServiceUnavailable(what, code="backend_unavailable", internal=repr(exc)[:500])


def _connection_error(exc: requests.exceptions.RequestException) -> ServiceUnavailable:
    """A transport error: was the request possibly processed?"""
    if isinstance(exc, _DEFINITELY_NOT_SENT) or "NewConnectionError" in repr(exc):
        return _unavailable(exc)
    return MintOutcomeUnknown(
        "OpenBao/Vault did not answer in time; nothing was issued",
        internal=repr(exc)[:500],
    )


def _refused(exc: Exception) -> ServiceUnavailable:
    return ServiceUnavailable(
        "OpenBao/Vault refused to mint the credential",
        code="backend_refused",
        internal=repr(exc)[:500],
    )


def _misconfigured(cause: str) -> ScopeMisconfigured:
    """The scope names something Vault lacks; ``cause`` says what, for the admin only."""
    return ScopeMisconfigured("the scope is misconfigured at OpenBao/Vault", internal=cause[:500])


def _misconfiguration(exc: hvac.exceptions.VaultError, what: str) -> ScopeMisconfigured | None:
    """A refusal that proves the scope's setup is incomplete (not the request, not an outage)."""
    text = str(exc).split(", on ")[0]
    if isinstance(exc, hvac.exceptions.InvalidPath) or any(
        m in text.lower() for m in _MISCONFIGURED
    ):
        return _misconfigured(f"{what}: {text}")
    return None


def _vault_time(value: Any) -> float | None:
    if not value or not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class DatabaseTarget:
    """Where agents reach the database a role belongs to (from the engine's connection URL)."""

    plugin: str
    host: str | None
    port: int | None
    dbname: str | None
    sslmode: str | None


class VaultAuth:
    """The broker's own Vault identity, renewed (or logged in again) before it expires."""

    def __init__(self, settings: VaultSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._token: str | None = (
            settings.token.get_secret_value() if settings.token is not None else None
        )
        self._renew_at: float | None = None if self._token is None else 0.0
        self._expires_at: float | None = None
        self.generation = 0
        self.last_error: str | None = None

    def _bare_client(self) -> hvac.Client:
        return hvac.Client(
            url=self.settings.addr,
            namespace=self.settings.namespace,
            timeout=int(self.settings.timeout),
            verify=self.settings.verify_tls,
        )

    def token(self) -> str:
        """The broker's current token, logging in or renewing first when due."""
        now = self.clock()
        if self._token is not None and (self._renew_at is None or now < self._renew_at):
            return self._token
        with self._lock:
            if self._token is None or (
                self._renew_at is not None and self.clock() >= self._renew_at
            ):
                self._refresh()
            assert self._token is not None
            return self._token

    def maintain(self) -> None:
        """Renew or log in again when two thirds of the token's lifetime have passed."""
        self.token()

    def _schedule(self, lease: int) -> None:
        now = self.clock()
        if lease <= 0:  # a token without expiry (dev root, a non-expiring periodic token)
            self._renew_at = None
            self._expires_at = None
        else:
            self._renew_at = now + lease * 2 / 3
            self._expires_at = now + lease

    def _refresh(self) -> None:
        method = self.settings.auth_method
        try:
            if method == "token":
                self._renew_token()
            else:
                self._login()
            self.last_error = None
        except (requests.exceptions.RequestException, hvac.exceptions.VaultError) as exc:
            self.last_error = type(exc).__name__
            if (
                self._token is not None
                and self._expires_at is not None
                and self.clock() < self._expires_at
            ):
                # Keep the still-valid token; try again in a little while.
                self._renew_at = self.clock() + min(30.0, self._expires_at - self.clock())
                log.warning("renewing the broker's Vault token failed; retrying soon")
                return
            raise _unavailable(exc, "the broker cannot log in to OpenBao/Vault") from None

    def _renew_token(self) -> None:
        if self._token is None:
            raise ServiceUnavailable(
                "the broker has no OpenBao/Vault token configured", code="backend_unavailable"
            )
        client = self._bare_client()
        client.token = self._token
        info = client.adapter.get("/v1/auth/token/lookup-self")["data"]
        ttl = int(info.get("ttl") or 0)
        if ttl > 0 and info.get("renewable"):
            if self._renew_at is not None and self._renew_at > 0:
                # Due: renew (a periodic token gets its full period back).
                renewed = client.adapter.post("/v1/auth/token/renew-self", json={})
                ttl = int(renewed["auth"]["lease_duration"])
                log.info("renewed the broker's Vault token for %ss", ttl)
        elif ttl > 0:
            log.warning("the broker's Vault token is not renewable and expires in %ss", ttl)
        self._schedule(ttl)
        if self._renew_at is None and ttl <= 0:
            self._renew_at = None

    def _login(self) -> None:
        s = self.settings
        client = self._bare_client()
        if s.auth_method == "approle":
            mount = s.auth_mount or "approle"
            assert s.role_id is not None
            assert s.secret_id is not None
            body: dict[str, Any] = {
                "role_id": s.role_id,
                "secret_id": s.secret_id.get_secret_value(),
            }
        else:
            mount = s.auth_mount or "jwt"
            assert s.jwt_file is not None
            try:
                jwt_text = s.jwt_file.read_text().strip()
            except OSError as exc:
                raise ServiceUnavailable(
                    "the broker cannot read its JWT for OpenBao/Vault login",
                    code="backend_unavailable",
                    internal=repr(exc),
                ) from None
            body = {"role": s.jwt_role, "jwt": jwt_text}
        response = client.adapter.post(f"/v1/auth/{mount}/login", json=body)
        auth = response["auth"]
        self._token = auth["client_token"]
        self.generation += 1
        self._schedule(int(auth.get("lease_duration") or 0))
        log.info(
            "logged in to Vault with %s (token lease %ss)",
            s.auth_method,
            auth.get("lease_duration"),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "auth_method": self.settings.auth_method,
            "token_expires_at": self._expires_at,
            "renew_at": self._renew_at,
            "last_error": self.last_error,
        }


class VaultBackend:
    """Mints from OpenBao/Vault with the broker's own identity."""

    name = "vault"
    revocation: Revocation = "revoke"

    def __init__(
        self,
        settings: VaultSettings,
        *,
        cluster: str = "broker",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.cluster = cluster
        self.clock = clock
        self.auth = VaultAuth(settings, clock)
        self._local = threading.local()
        #: Policies no template may hand out, whatever Vault's token role would allow.
        self.forbidden = ForbiddenPolicies.of(settings.forbidden_policies)
        self._policy_cache: dict[str, tuple[float, str | None]] = {}
        self._targets: dict[tuple[str, str], tuple[float, DatabaseTarget]] = {}

    @property
    def client(self) -> hvac.Client:
        """This thread's client, carrying the broker's current token."""
        token = self.auth.token()
        # requests.Session is not thread-safe to share; keep one client per thread.
        client: hvac.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = hvac.Client(
                url=self.settings.addr,
                token=token,
                namespace=self.settings.namespace,
                timeout=int(self.settings.timeout),
                verify=self.settings.verify_tls,
            )
            self._local.client = client
        elif client.token != token:
            client.token = token
        return client

    def _as(self, token: str) -> hvac.Client:
        """A client acting as another token (a lease owner); not cached."""
        return hvac.Client(
            url=self.settings.addr,
            token=token,
            namespace=self.settings.namespace,
            timeout=int(self.settings.timeout),
            verify=self.settings.verify_tls,
        )

    # --- interface ------------------------------------------------------------------------

    def plan(self, request: MintRequest) -> dict[str, Any]:
        """Check the rendered spec; the token metadata is what identifies the credential later."""
        spec = request.spec
        if isinstance(spec, VaultTokenBackend):
            for policy in spec.policies:
                if not _POLICY_NAME.fullmatch(policy):
                    raise InvalidRequest(
                        "a rendered policy name is not a plain Vault name", code="invalid_policy"
                    )
                if policy in self.forbidden:
                    raise InvalidRequest(
                        "this policy can never be requested (root, or forbidden by the "
                        "administrator)",
                        code="forbidden_policy",
                    )
        elif isinstance(spec, VaultDatabaseBackend):
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", spec.role):
                raise InvalidRequest(
                    "a rendered database role is not a plain Vault name", code="invalid_role"
                )
            # Where a lease of this mint would live, should its answer be lost.
            return {"meta": self._meta(request), "mount": spec.mount, "role": spec.role}
        else:
            raise InvalidRequest(f"the vault backend cannot mint {type(spec).__name__}")
        return {"meta": self._meta(request)}

    def mint(self, request: MintRequest) -> Minted:
        spec = request.spec
        try:
            if isinstance(spec, VaultTokenBackend):
                return self._mint_token(request, spec)
            if isinstance(spec, VaultDatabaseBackend):
                return self._mint_database(request, spec)
        except requests.exceptions.RequestException as exc:
            raise _connection_error(exc) from None
        except (hvac.exceptions.VaultDown, hvac.exceptions.InternalServerError) as exc:
            raise _unavailable(exc) from None
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath) as exc:
            raise (_misconfiguration(exc, self._what(spec)) or _refused(exc)) from None
        except hvac.exceptions.VaultError as exc:
            raise _refused(exc) from None
        raise InvalidRequest(f"the vault backend cannot mint {type(spec).__name__}")

    def _what(self, spec: VaultTokenBackend | VaultDatabaseBackend) -> str:
        if isinstance(spec, VaultTokenBackend):
            return (
                f"creating a token with policies {list(spec.policies)} through token role "
                f"{self.settings.token_role!r}"
            )
        return f"reading {spec.mount}/creds/{spec.role}"

    def revoke(self, ref: RevokeRef) -> None:
        """Revoke, then confirm: a token by accessor; a database lease by lease id and its
        owner token, then the lease looked up (``RevocationUnconfirmed`` while it exists);
        without a handle, every token carrying the credential's metadata, each confirmed gone.
        A lease whose id was never seen is confirmed by the caller (:meth:`leases`)."""
        try:
            if ref.handle is None:
                remaining = [
                    a
                    for a in self._revoke_by_metadata(ref.credential_id)
                    if not self._accessor_gone(a)
                ]
                if remaining:
                    raise RevocationUnconfirmed(
                        internal=f"{len(remaining)} token(s) of {ref.credential_id} still exist"
                    )
                return
            # The intent records the template's type; the issuance record the minted kind.
            if ref.kind == "vault_token":
                self._revoke_accessor(ref.handle)
            elif ref.kind in ("vault_lease", "vault_database"):
                self._revoke_lease(ref.handle)
                owner = ref.details.get("lease_owner_accessor")
                if owner:
                    self._revoke_accessor(str(owner))
                if self._lease_info(ref.handle) is not None:
                    raise RevocationUnconfirmed(internal=f"lease {ref.handle} still exists")
            else:
                raise InvalidRequest(f"the vault backend cannot revoke {ref.kind!r}")
        except hvac.exceptions.InvalidRequest as exc:
            raise ServiceUnavailable(
                "OpenBao/Vault refused the revocation", internal=repr(exc)[:500]
            ) from None
        except requests.exceptions.RequestException as exc:
            raise _unavailable(exc) from None
        except hvac.exceptions.VaultError as exc:
            raise ServiceUnavailable(
                "OpenBao/Vault refused the revocation", internal=repr(exc)[:500]
            ) from None

    def _revoke_lease(self, lease_id: str) -> None:
        try:
            self.client.adapter.put("/v1/sys/leases/revoke", json={"lease_id": lease_id})
        except hvac.exceptions.InvalidRequest as exc:
            # A lease that no longer exists is already revoked.
            text = str(exc).lower()
            if not any(s in text for s in ("lease not found", "invalid lease")):
                raise

    def _lease_info(self, lease_id: str) -> LeaseInfo | None:
        """The lease if it still exists (``sys/leases/lookup``), else None."""
        try:
            data = self.client.adapter.put("/v1/sys/leases/lookup", json={"lease_id": lease_id})[
                "data"
            ]
        except hvac.exceptions.InvalidRequest as exc:
            if "invalid lease" in str(exc).lower():
                return None
            raise
        return LeaseInfo(
            lease_id=str(data.get("id") or lease_id),
            issued_at=_vault_time(data.get("issue_time")),
            expires_at=_vault_time(data.get("expire_time")),
        )

    def leases(self, mount: str, role: str) -> list[LeaseInfo]:
        """Every lease that exists under ``MOUNT/creds/ROLE/`` (needs ``list`` + ``sudo`` on
        ``sys/leases/lookup/MOUNT/creds/*`` and ``update`` on ``sys/leases/lookup``). A lease
        being revoked (its owner token already gone) is still listed until it is."""
        prefix = f"{mount}/creds/{role}/"
        try:
            try:
                listing = self.client.adapter.list(f"/v1/sys/leases/lookup/{prefix}")
            except hvac.exceptions.InvalidPath:
                listing = None  # no lease under the prefix
            keys = ((listing or {}).get("data") or {}).get("keys") or []
            found = [
                self._lease_info(prefix + str(key)) for key in keys if not str(key).endswith("/")
            ]
        except requests.exceptions.RequestException as exc:
            raise _unavailable(exc, "OpenBao/Vault did not list its leases") from None
        except hvac.exceptions.VaultError as exc:
            raise ServiceUnavailable(
                "OpenBao/Vault refused to list the role's leases",
                code="backend_refused",
                internal=repr(exc)[:500],
            ) from None
        return [lease for lease in found if lease is not None]

    def health(self) -> None:
        try:
            status = self._bare_health()
        except Exception as exc:
            raise _unavailable(exc) from None
        if status.get("sealed"):
            raise ServiceUnavailable("OpenBao/Vault is sealed", code="backend_unavailable")
        self.auth.token()  # raises when the broker cannot log in

    def _bare_health(self) -> dict[str, Any]:
        response = requests.get(
            f"{self.settings.addr.rstrip('/')}/v1/sys/health",
            params={"standbyok": "true", "perfstandbyok": "true"},
            timeout=self.settings.timeout,
            verify=self.settings.verify_tls,
        )
        body: dict[str, Any] = response.json()
        return body

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "addr": self.settings.addr,
            "kinds": ["vault_token", "vault_lease"],
            "token_role": self.settings.token_role,
            "lease_token_role": self.settings.lease_token_role,
            "revocation": "by accessor (tokens) and lease id (database credentials)",
            "auth": self.auth.describe(),
        }

    def maintain(self) -> None:
        self.auth.maintain()

    def read_kv(self, mount: str, path: str, field: str, *, version: int = 2) -> str:
        """One field of a KV secret, read with the broker's own identity (another backend's key,
        such as the GitHub App's private key). Errors never carry the value."""
        where = f"{quote(mount, safe='')}/{'data/' if version == 2 else ''}{quote(path, safe='/')}"
        try:
            body = self.client.adapter.get(f"/v1/{where}")
        except (requests.exceptions.RequestException, hvac.exceptions.VaultError) as exc:
            raise _unavailable(exc, "OpenBao/Vault did not return the secret") from None
        data = (body or {}).get("data") or {}
        if version == 2:
            data = data.get("data") or {}
        value = data.get(field)
        if not isinstance(value, str) or not value:
            raise ServiceUnavailable(
                "the secret in OpenBao/Vault has no such field",
                code="backend_unavailable",
                internal=f"{mount}/{path} has no string field {field!r}",
            )
        return value

    def inventory(self, cluster: str, *, strict: bool = False) -> Iterator[BackendObject]:
        """Every token carrying this cluster's metadata (needs ``list`` + ``sudo`` on
        ``auth/token/accessors``); one lookup per token, so it runs at the orphan interval.

        A token that cannot be looked up is skipped when it is gone (expired or revoked since
        the listing); with ``strict`` (confirming a revocation), any other lookup error raises
        rather than let a token go unseen."""
        try:
            listing = self.client.adapter.list("/v1/auth/token/accessors")
        except (requests.exceptions.RequestException, hvac.exceptions.VaultError) as exc:
            raise _unavailable(exc, "OpenBao/Vault did not list its tokens") from None
        accessors = ((listing or {}).get("data") or {}).get("keys") or []
        for accessor in accessors:
            try:
                data = self.client.adapter.post(
                    "/v1/auth/token/lookup-accessor", json={"accessor": accessor}
                )["data"]
            except hvac.exceptions.InvalidRequest as exc:
                if strict and "invalid accessor" not in str(exc).lower():
                    raise _unavailable(exc, "OpenBao/Vault did not look a token up") from None
                continue  # expired or revoked since the listing
            except hvac.exceptions.VaultError as exc:
                if strict:
                    raise _unavailable(exc, "OpenBao/Vault did not look a token up") from None
                continue
            except requests.exceptions.RequestException as exc:
                raise _unavailable(exc) from None
            meta = data.get("meta") or {}
            if meta.get(META_CLUSTER) != cluster or not meta.get(META_CREDENTIAL):
                continue
            yield BackendObject(
                kind="vault_token",
                handle=str(accessor),
                credential_id=str(meta[META_CREDENTIAL]),
                task_id=meta.get(META_TASK),
                expires_at=_vault_time(data.get("expire_time")),
                role=str(meta.get(META_ROLE) or "credential"),
            )

    # --- helpers --------------------------------------------------------------------------

    def _meta(self, request: MintRequest, role: str = "credential") -> dict[str, str]:
        return {
            META_CLUSTER: request.cluster,
            META_TASK: request.task_id,
            META_CREDENTIAL: request.credential_id,
            META_ROLE: role,
            "broker_scope": request.scope,
            "broker_subject": request.subject[:256],
        }

    def _revoke_accessor(self, accessor: str) -> None:
        try:
            self.client.adapter.post("/v1/auth/token/revoke-accessor", json={"accessor": accessor})
        except hvac.exceptions.VaultError:
            # Two replicas revoking one token at once: the loser may get an error other than
            # "invalid accessor" while the winner's revocation completes. Gone is revoked.
            if self._accessor_gone(accessor):
                return
            raise

    def _accessor_gone(self, accessor: str) -> bool:
        try:
            self.client.adapter.post("/v1/auth/token/lookup-accessor", json={"accessor": accessor})
        except hvac.exceptions.InvalidRequest as exc:
            return "invalid accessor" in str(exc).lower()
        except hvac.exceptions.VaultError:
            return False
        return False

    def _revoke_by_metadata(self, credential_id: str) -> list[str]:
        """Revoke whatever carries this credential id (a mint whose outcome was unknown);
        returns the accessors revoked."""
        revoked = []
        for obj in self.inventory(self.cluster, strict=True):
            if obj.credential_id == credential_id:
                self._revoke_accessor(obj.handle)
                revoked.append(obj.handle)
        return revoked

    def policy_text(self, name: str) -> str | None:
        """The ACL policy's text, or None when Vault has no such policy (never cached)."""
        now = time.monotonic()
        cached = self._policy_cache.get(name)
        if cached is not None and now - cached[0] <= POLICY_CACHE_SECONDS:
            return cached[1]
        try:
            body = self.client.adapter.get(f"/v1/sys/policies/acl/{quote(name, safe='')}")
        except hvac.exceptions.InvalidPath:
            self._policy_cache.pop(name, None)
            return None
        text = str(body["data"]["policy"])
        self._policy_cache[name] = (now, text)
        return text

    def vet_policy(self, name: str) -> None:
        """Refuse ``root`` and the forbidden policies (compared as Vault normalises names), a
        policy Vault does not have, and any policy whose text grants ``sudo`` (an existing
        policy's text is cached for a minute)."""
        if name in self.forbidden:
            raise InvalidRequest(
                "this policy can never be requested (root, or forbidden by the administrator)",
                code="forbidden_policy",
            )
        name = vault_policy_name(name)
        text = self.policy_text(name)
        if text is None:
            raise _misconfigured(f"OpenBao/Vault has no policy named {name!r}")
        if _SUDO.search(text):
            raise _misconfigured(
                f"OpenBao/Vault policy {name!r} grants sudo; the broker never hands those out"
            )

    # --- prerequisites (``broker scopes check --live``) -------------------------------------

    def check(self, template: ScopeTemplate) -> list[Requirement]:
        """Each prerequisite of ``template`` at OpenBao/Vault, asked now (nothing cached)."""
        names = Names(self.settings.token_role, self.settings.lease_token_role)
        spec = template.backend
        try:
            if isinstance(spec, VaultTokenBackend):
                return self._check_token(template, spec, names)
            if isinstance(spec, VaultDatabaseBackend):
                return self._check_database(template, spec, names)
        except requests.exceptions.RequestException as exc:
            return [
                r.checked("unknown", f"OpenBao/Vault did not answer ({type(exc).__name__})")
                for r in requirements(template, names)
            ]
        return []

    def _read(self, path: str) -> tuple[str, dict[str, Any] | None]:
        """``("ok", data)``, ``("missing", None)`` or ``("forbidden", None)`` for a GET."""
        try:
            body = self.client.adapter.get(path)
        except hvac.exceptions.InvalidPath:
            return "missing", None
        except hvac.exceptions.Forbidden:
            return "forbidden", None
        return "ok", dict((body or {}).get("data") or {})

    def _capability(self, path: str, wanted: str) -> bool | None:
        """Whether the broker's own token has ``wanted`` on ``path`` (None: cannot tell)."""
        try:
            body = self.client.adapter.post("/v1/sys/capabilities-self", json={"paths": [path]})
        except hvac.exceptions.VaultError:
            return None
        caps = (body or {}).get("capabilities") or (body or {}).get(path) or []
        return wanted in caps or "root" in caps

    def _check_token(
        self, template: ScopeTemplate, spec: VaultTokenBackend, names: Names
    ) -> list[Requirement]:
        listed = {r.key: r for r in requirements(template, names)}
        out: list[Requirement] = []
        role = self.settings.token_role
        role_state, role_data = (
            self._read(f"/v1/auth/token/roles/{quote(role, safe='')}") if role else ("none", None)
        )
        known, open_ended = vault_policies(template, spec)
        for policy in known:
            exists = listed[("policy", policy)]
            state, data = self._read(f"/v1/sys/policies/acl/{quote(policy, safe='')}")
            if state == "missing":
                out.append(exists.checked("missing", f"OpenBao/Vault has no policy {policy!r}"))
            elif state == "forbidden":
                out.append(
                    exists.checked(
                        "unknown",
                        "the broker's token may not read sys/policies/acl/* (it needs read "
                        "there to refuse policies granting sudo)",
                    )
                )
            elif _SUDO.search(str((data or {}).get("policy") or "")):
                out.append(
                    exists.checked(
                        "missing",
                        f"the policy {policy!r} grants sudo; the broker never hands it out",
                        fix=f"remove sudo from the policy {policy!r} (bao policy write {policy} ...)",
                    )
                )
            else:
                out.append(exists.checked("ok", "exists"))
            allows = listed[("role_allows", policy)]
            out.append(self._role_allows(allows, role, role_state, role_data, policy))
        out.extend(
            listed[("open_policy", policy)].checked(
                "unknown", "a free parameter names the policy: each value is checked at mint time"
            )
            for policy in open_ended
        )
        if role:
            may = self._capability(f"auth/token/create/{role}", "update")
            out.append(
                Requirement(
                    template.name,
                    f"the broker's token may create tokens through the role {role!r}",
                    f'add path "auth/token/create/{role}" {{ capabilities = ["update"] }} to the '
                    "broker's policy",
                    status="ok" if may else ("missing" if may is False else "unknown"),
                    found=None
                    if may
                    else "sys/capabilities-self said no"
                    if may is False
                    else None,
                )
            )
        return out

    @staticmethod
    def _role_allows(  # noqa: PLR0911  # one answer per way a role can stand
        requirement: Requirement,
        role: str | None,
        state: str,
        data: dict[str, Any] | None,
        policy: str,
    ) -> Requirement:
        if role is None:
            return requirement.checked(
                "unknown",
                "no token role is configured (vault.token_role): OpenBao then lets the broker "
                "grant only the policies its own token holds",
                fix="create a token role with allowed_policies and set BROKER_VAULT__TOKEN_ROLE",
            )
        if state == "missing":
            return requirement.checked(
                "missing",
                f"there is no token role {role!r}",
                fix=f"bao write auth/token/roles/{role} allowed_policies={policy} orphan=true "
                "renewable=false token_type=service",
            )
        if state == "forbidden" or data is None:
            return requirement.checked(
                "unknown",
                f"the broker's token may not read auth/token/roles/{role} (grant it read there "
                "so `broker scopes check --live` can tell)",
            )
        allowed = list(data.get("allowed_policies") or [])
        allowed_glob = list(data.get("allowed_policies_glob") or [])
        disallowed = list(data.get("disallowed_policies") or [])
        disallowed_glob = list(data.get("disallowed_policies_glob") or [])
        if policy in disallowed or any(fnmatch.fnmatchcase(policy, g) for g in disallowed_glob):
            return requirement.checked(
                "missing",
                f"the role disallows it (disallowed_policies {', '.join(disallowed) or '-'}; "
                f"globs {', '.join(disallowed_glob) or '-'})",
                fix=f"remove {policy!r} from the role's disallowed policies, or name another policy",
            )
        if not allowed and not allowed_glob:
            return requirement.checked(
                "unknown",
                "the role has no allowed_policies: OpenBao then allows only the policies the "
                "broker's own token holds",
                fix=f"bao write auth/token/roles/{role} allowed_policies={policy}",
            )
        if policy in allowed or any(fnmatch.fnmatchcase(policy, g) for g in allowed_glob):
            return requirement.checked("ok", "allowed")
        return requirement.checked(
            "missing",
            f"the role allows only {', '.join(allowed) or '-'}"
            + (f" (globs {', '.join(allowed_glob)})" if allowed_glob else ""),
            fix=f"bao write auth/token/roles/{role} allowed_policies={','.join([*allowed, policy])}",
        )

    def _check_database(
        self, template: ScopeTemplate, spec: VaultDatabaseBackend, names: Names
    ) -> list[Requirement]:
        out: list[Requirement] = []
        for requirement in requirements(template, names):
            if requirement.key[:1] == ("database_role",):
                role = requirement.key[1]
                state, data = self._read(
                    f"/v1/{quote(spec.mount, safe='')}/roles/{quote(role, safe='')}"
                )
                if state == "ok":
                    found = f"exists (connection {(data or {}).get('db_name')})"
                    out.append(requirement.checked("ok", found))
                elif state == "missing":
                    out.append(
                        requirement.checked(
                            "missing", f"no role {role!r} under the mount {spec.mount!r}"
                        )
                    )
                else:
                    out.append(
                        requirement.checked(
                            "unknown",
                            f"the broker's token may not read {spec.mount}/roles/* (grant it read)",
                        )
                    )
            elif names.lease_token_role:
                out.append(
                    requirement.checked(
                        "unknown",
                        "the lease owner's policy is checked at mint time (it belongs to the "
                        f"lease token role {names.lease_token_role!r})",
                    )
                )
            else:
                may = self._capability(f"{spec.mount}/creds/{spec.role}", "read")
                out.append(
                    requirement.checked(
                        "ok" if may else ("missing" if may is False else "unknown"),
                        None if may else "sys/capabilities-self said no",
                    )
                )
        return out

    def _create_token(
        self,
        role: str | None,
        *,
        policies: list[str],
        ttl: int,
        num_uses: int,
        no_default_policy: bool,
        meta: dict[str, str],
        display_name: str,
    ) -> dict[str, Any]:
        # Every flag is fixed here: nothing a parameter renders can reach renewable, period,
        # orphan, type or the TTLs.
        body = {
            "policies": policies,
            "no_default_policy": no_default_policy,
            "ttl": f"{ttl}s",
            "explicit_max_ttl": f"{ttl}s",
            "num_uses": num_uses,
            "renewable": False,
            "display_name": display_name[:64],
            "meta": meta,
            "type": "service",
        }
        path = f"/v1/auth/token/create/{quote(role, safe='')}" if role else "/v1/auth/token/create"
        auth: dict[str, Any] = self.client.adapter.post(path, json=body)["auth"]
        return auth

    def _mint_token(self, request: MintRequest, spec: VaultTokenBackend) -> Minted:
        # Sent as Vault will store them, so what was vetted is what is granted.
        policies = list(dict.fromkeys(vault_policy_name(p) for p in spec.policies))
        for policy in policies:
            self.vet_policy(policy)
        auth = self._create_token(
            self.settings.token_role,
            policies=policies,
            ttl=request.ttl,
            num_uses=request.max_uses or 0,
            no_default_policy=spec.no_default_policy,
            meta=self._meta(request),
            display_name=f"broker-{request.scope}",
        )
        token = str(auth["client_token"])
        accessor = str(auth["accessor"])
        lease = int(auth.get("lease_duration") or 0)
        granted = list(auth.get("token_policies") or auth.get("policies") or [])
        if lease <= 0 or lease > request.ttl or self.forbidden.first_in(granted) is not None:
            # Vault gave more than asked (a misconfigured role): take it back, fail closed.
            with contextlib.suppress(Exception):
                self._revoke_accessor(accessor)
            raise ServiceUnavailable(
                "OpenBao/Vault issued a token wider than the scope allows; it was revoked",
                code="backend_refused",
                internal=f"lease={lease} ttl={request.ttl} policies={granted}",
            )
        env = {"VAULT_ADDR": self.settings.addr, "VAULT_TOKEN": token}
        if self.settings.namespace:
            env["VAULT_NAMESPACE"] = self.settings.namespace
        return Minted(
            kind="vault_token",
            handle=accessor,
            expires_at=self.clock() + lease,
            secret={"token": token},
            env=env,
            details={
                "accessor": accessor,
                "policies": granted or policies,
                "ttl": lease,
                "num_uses": request.max_uses or 0,
            },
        )

    def database_target(self, mount: str, role: str) -> DatabaseTarget:
        """Host, port and database of a role's connection (cached for five minutes)."""
        key = (mount, role)
        now = time.monotonic()
        cached = self._targets.get(key)
        if cached is not None and now - cached[0] < 300:
            return cached[1]
        m = quote(mount, safe="")
        role_data = self.client.adapter.get(f"/v1/{m}/roles/{quote(role, safe='')}")["data"]
        config = self.client.adapter.get(
            f"/v1/{m}/config/{quote(str(role_data['db_name']), safe='')}"
        )["data"]
        url = str((config.get("connection_details") or {}).get("connection_url") or "")
        parts = urlsplit(url.replace("{{username}}", "u").replace("{{password}}", "p"))
        query = parse_qs(parts.query)
        target = DatabaseTarget(
            plugin=str(config.get("plugin_name") or ""),
            host=parts.hostname,
            port=parts.port,
            dbname=parts.path.lstrip("/") or None,
            sslmode=query["sslmode"][0] if query.get("sslmode") else None,
        )
        self._targets[key] = (now, target)
        return target

    def _mint_database(self, request: MintRequest, spec: VaultDatabaseBackend) -> Minted:
        creds_path = f"/v1/{quote(spec.mount, safe='')}/creds/{quote(spec.role, safe='')}"
        owner_accessor: str | None = None
        lease_id: str | None = None
        reader = self.client
        try:
            if self.settings.lease_token_role:
                # The lease belongs to an internal token carrying the broker's metadata: the
                # orphan scan can find it, and revoking it drops the database user. Its policies
                # are the lease token role's allowed policies.
                owner = self._create_token(
                    self.settings.lease_token_role,
                    policies=[],
                    ttl=request.ttl,
                    num_uses=0,  # a use count would revoke the owner, and its lease, after a read
                    no_default_policy=False,
                    meta=self._meta(request, role="lease_owner"),
                    display_name=f"broker-{spec.role}",
                )
                owner_accessor = str(owner["accessor"])
                reader = self._as(str(owner["client_token"]))
            response = reader.adapter.get(creds_path)
            lease_id = str(response["lease_id"])
            lease = int(response.get("lease_duration") or 0)
            data = response["data"]
            if lease <= 0 or lease > request.ttl:
                # The role's default TTL is longer than the task allows: shorten the lease (and
                # the user's VALID UNTIL) before anything leaves the broker.
                renewed = self.client.adapter.put(
                    "/v1/sys/leases/renew", json={"lease_id": lease_id, "increment": request.ttl}
                )
                lease = int(renewed.get("lease_duration") or 0)
                if lease <= 0 or lease > request.ttl:
                    raise ServiceUnavailable(
                        "OpenBao/Vault would not shorten the database lease to the task's TTL",
                        code="backend_refused",
                        internal=f"lease={lease} ttl={request.ttl}",
                    )
            target = self.database_target(spec.mount, spec.role)
        except BaseException:
            # Nothing half-made may outlive a failed mint.
            with contextlib.suppress(Exception):
                if lease_id is not None:
                    self.client.adapter.put("/v1/sys/leases/revoke", json={"lease_id": lease_id})
            with contextlib.suppress(Exception):
                if owner_accessor is not None:
                    self._revoke_accessor(owner_accessor)
            raise
        username = str(data["username"])
        password = str(data["password"])
        env = {"PGUSER": username, "PGPASSWORD": password}
        if target.plugin.startswith("postgresql") and target.host:
            env.update(
                {
                    "PGHOST": target.host,
                    "PGPORT": str(target.port or 5432),
                    "PGDATABASE": target.dbname or "postgres",
                }
            )
            query = f"?sslmode={target.sslmode}" if target.sslmode else ""
            env["DATABASE_URL"] = (
                f"postgresql://{quote(username, safe='')}:{quote(password, safe='')}"
                f"@{target.host}:{target.port or 5432}/{target.dbname or 'postgres'}{query}"
            )
            if target.sslmode:
                env["PGSSLMODE"] = target.sslmode
        return Minted(
            kind="vault_lease",
            handle=lease_id,
            expires_at=self.clock() + lease,
            secret={"username": username, "password": password},
            env=env,
            details={
                "mount": spec.mount,
                "role": spec.role,
                "username": username,
                "ttl": lease,
                "lease_owner_accessor": owner_accessor,
                "host": target.host,
                "port": target.port,
                "database": target.dbname,
            },
        )
