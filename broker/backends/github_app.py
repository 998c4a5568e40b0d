"""GitHub App installation tokens, one per task, narrowed to repositories and permissions.

Every request the broker makes to GitHub goes through this module (the only one talking to the
GitHub API). The broker authenticates as a GitHub App with an RS256 JWT (:func:`app_jwt_claims`:
``iat`` 60 s in the past for clock drift, ``exp`` 9 minutes ahead, ``iss`` the App's client id or
id), finds the installation for the template's owner, and creates an installation token with
exactly the rendered ``repositories`` (or ``repository_ids``) and ``permissions``.

GitHub's rules are checked before any call (:mod:`broker.domain.github`): names and levels as
GitHub's published schema has them, at most 500 repositories, permissions within what the
installation holds, repositories the installation can reach. GitHub's answer is checked too:
a token wider than asked (permissions or repositories), longer-lived than an hour or already
expired is deleted at once and nothing is issued.

Revocation is ``DELETE /installation/token`` authenticated *with the token itself*: GitHub has
no accessor. So the minted token is sealed (AES-256-GCM, :class:`TokenSealer`) under a key read
from ``github.token_key_file``, which is never in the database; the store keeps only the
ciphertext, bound to the credential id, until the credential is revoked or expired. Any replica
holding the key can revoke after a restart. See docs/backends.md for why, and what it costs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from broker.backends.base import (
    CredentialExpired,
    Minted,
    MintOutcomeUnknown,
    MintRequest,
    Revocation,
    RevokeRef,
)
from broker.domain import github
from broker.domain.scope import GitHubAppBackend as GitHubAppSpec
from broker.domain.scope import ScopeTemplate
from broker.errors import ConfigurationError, InvalidRequest, ServiceUnavailable
from broker.scopes.prerequisites import Requirement, requirements
from broker.settings import GitHubAppSettings

log = logging.getLogger(__name__)

#: ``iat`` this far in the past: GitHub recommends 60 s against clock drift.
JWT_SKEW = 60
#: ``exp`` this far ahead of now: GitHub refuses more than 10 minutes; ``exp - iat`` is 600 s.
JWT_AHEAD = 540
#: A cached app JWT is replaced this long before its ``exp``.
JWT_REFRESH_MARGIN = 120
#: How long the private key read from its file or OpenBao is reused (a rotation shows up then).
KEY_CACHE_SECONDS = 300.0
HEALTH_CACHE_SECONDS = 30.0
#: GitHub's answers are read up to this size (a page of 100 repositories is far smaller).
MAX_BODY = 4 * 1024 * 1024
#: Repository listings past this many pages are not pre-checked (GitHub still refuses).
MAX_LISTING_PAGES = 50
#: Slack on GitHub's one-hour token lifetime (its clock against ours).
EXPIRY_SLACK = 300.0
API_VERSION = "2022-11-28"
#: GitHub's media type first; ``application/json`` for servers that list only that one.
ACCEPT = "application/vnd.github+json, application/json;q=0.9"
#: Git over HTTPS takes an installation token as the password of this user.
GIT_USERNAME = "x-access-token"
KIND = "github_app_token"


# --- the app JWT --------------------------------------------------------------------------------


def app_jwt_claims(issuer: str, now: float) -> dict[str, Any]:
    """The claims GitHub documents for an app JWT, issued at ``now``."""
    issued = int(now)
    return {"iat": issued - JWT_SKEW, "exp": issued + JWT_AHEAD, "iss": issuer}


def app_jwt(private_key: RSAPrivateKey, issuer: str, now: float) -> str:
    """An RS256 app JWT (``typ: JWT``)."""
    return jwt.encode(app_jwt_claims(issuer, now), private_key, algorithm="RS256")


def load_private_key(pem: str) -> RSAPrivateKey:
    """The App's RSA key from PEM text; errors never repeat the text."""
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ServiceUnavailable(
            "the GitHub App's private key cannot be loaded",
            code="backend_unavailable",
            internal=type(exc).__name__,
        ) from None
    if not isinstance(key, RSAPrivateKey):
        raise ServiceUnavailable(
            "the GitHub App's private key is not an RSA key", code="backend_unavailable"
        )
    return key


def read_key_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ServiceUnavailable(
            "the GitHub App's private key file cannot be read",
            code="backend_unavailable",
            internal=f"{path}: {type(exc).__name__}",
        ) from None


# --- sealing tokens at rest -------------------------------------------------------------------


class TokenSealer:
    """AES-256-GCM under a key that lives in a file, never in the database.

    A sealed value is ``v1.<key id>.<base64 nonce+ciphertext>``; the credential id is the
    associated data, so a sealed token copied onto another record does not open.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigurationError("github.token_key_file must hold a 32-byte key (base64)")
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(key).hexdigest()[:12]

    @classmethod
    def from_file(cls, path: Path) -> TokenSealer:
        try:
            raw = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigurationError(
                f"github.token_key_file {path} cannot be read ({exc.strerror})"
            ) from None
        try:
            key = base64.b64decode(raw, validate=True)
        except ValueError:
            raise ConfigurationError(
                "github.token_key_file must hold 32 bytes in base64 (scripts: openssl rand -base64 32)"
            ) from None
        return cls(key)

    @staticmethod
    def create_file(path: Path) -> None:
        """A fresh key file readable by its owner only (dev mode)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(base64.b64encode(secrets.token_bytes(32)) + b"\n")

    def seal(self, secret: str, bound_to: str) -> str:
        nonce = secrets.token_bytes(12)
        box = self._aead.encrypt(nonce, secret.encode(), bound_to.encode())
        return f"v1.{self.key_id}.{base64.b64encode(nonce + box).decode()}"

    def unseal(self, sealed: str, bound_to: str) -> str:
        """The secret, or ``ServiceUnavailable`` when another key sealed it or it was altered."""
        version, _, rest = sealed.partition(".")
        key_id, _, body = rest.partition(".")
        if version != "v1" or key_id != self.key_id:
            raise ServiceUnavailable(
                "the token was sealed under another key; it cannot be revoked before it expires",
                code="github_token_unavailable",
                internal=f"sealed under key {key_id!r}, have {self.key_id!r}",
            )
        try:
            raw = base64.b64decode(body, validate=True)
            return self._aead.decrypt(raw[:12], raw[12:], bound_to.encode()).decode()
        except (ValueError, InvalidTag):
            raise ServiceUnavailable(
                "the sealed token does not open; it cannot be revoked before it expires",
                code="github_token_unavailable",
            ) from None


# --- GitHub's answers -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Installation:
    """What GitHub says about the App's installation on one account."""

    id: int
    account: str
    permissions: Mapping[str, str]
    repository_selection: str
    suspended: bool


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: Any


def _github_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _message(answer: Answer) -> str:
    body = answer.body if isinstance(answer.body, dict) else {}
    return f"HTTP {answer.status}: {str(body.get('message') or '')[:200]}"


def _refused(
    detail: str, answer: Answer | None = None, code: str = "backend_refused"
) -> ServiceUnavailable:
    return ServiceUnavailable(detail, code=code, internal=_message(answer) if answer else None)


class GitHubAppBackend:
    """Mints GitHub App installation tokens."""

    name = "github"
    revocation: Revocation = "revoke"

    def __init__(
        self,
        settings: GitHubAppSettings,
        *,
        private_key: Callable[[], str],
        sealer: TokenSealer,
        clock: Callable[[], float] = time.time,
        http: httpx.Client | None = None,
    ) -> None:
        self.settings = settings
        self.sealer = sealer
        self.clock = clock
        self._read_key = private_key
        self._lock = threading.Lock()
        self._key: tuple[float, RSAPrivateKey] | None = None
        self._jwt: tuple[float, str] | None = None
        self._installations: dict[tuple[str, str], tuple[float, Installation]] = {}
        self._listings: dict[int, tuple[float, dict[str, int] | None]] = {}
        self._healthy_at: float | None = None
        self.git_url = settings.effective_git_url or ""
        self.http = http or httpx.Client(
            base_url=settings.api_url,
            timeout=httpx.Timeout(settings.timeout),
            verify=settings.verify_tls,
            follow_redirects=False,
        )
        # The client id (GitHub's recommendation) or the App id, as a string: GitHub accepts
        # either form, and PyJWT (rightly) encodes only string issuers.
        self.issuer = settings.client_id if settings.client_id is not None else str(settings.app_id)

    # --- authentication as the App ---------------------------------------------------------------

    def _private_key(self) -> RSAPrivateKey:
        cached = self._key
        if cached is not None and time.monotonic() - cached[0] < KEY_CACHE_SECONDS:
            return cached[1]
        key = load_private_key(self._read_key())
        self._key = (time.monotonic(), key)
        return key

    def app_token(self) -> str:
        """The current app JWT (a new one shortly before the last expires)."""
        now = self.clock()
        cached = self._jwt
        if cached is not None and now < cached[0] - JWT_REFRESH_MARGIN:
            return cached[1]
        with self._lock:
            token = app_jwt(self._private_key(), self.issuer, now)
            self._jwt = (app_jwt_claims(self.issuer, now)["exp"], token)
            return token

    # --- HTTP ------------------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Answer:
        """One request as the App (or with an installation ``token``); transport errors raise."""
        headers = {
            "Accept": ACCEPT,
            "X-GitHub-Api-Version": API_VERSION,
            "User-Agent": "broker-github-app",
            "Authorization": f"token {token}" if token else f"Bearer {self.app_token()}",
        }
        with self.http.stream(method, path, headers=headers, json=body, params=params) as resp:
            data = bytearray()
            for chunk in resp.iter_bytes():
                data.extend(chunk)
                if len(data) > MAX_BODY:
                    raise ServiceUnavailable(
                        "GitHub's answer is larger than the broker reads", code="backend_refused"
                    )
        parsed: Any = None
        if data:
            with contextlib.suppress(ValueError):
                parsed = json.loads(data)
        return Answer(resp.status_code, parsed)

    def _read(self, method: str, path: str, **kw: Any) -> Answer:
        """A call whose repetition is harmless: any transport error means unavailable."""
        try:
            return self._call(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                "GitHub is unavailable", code="backend_unavailable", internal=repr(exc)[:300]
            ) from None

    # --- interface -------------------------------------------------------------------------------

    def plan(self, request: MintRequest) -> dict[str, Any]:
        """GitHub's rules on the rendered request, before any call."""
        spec = self._spec(request)
        problems = github.permission_catalog().problems(spec.permissions)
        if problems:
            raise InvalidRequest(
                "GitHub does not accept these permissions: " + "; ".join(problems[:5]),
                code="github_permission_invalid",
            )
        count = len(spec.repositories) + len(spec.repository_ids)
        if count > github.MAX_REPOSITORIES:
            raise InvalidRequest(
                f"a GitHub token names at most {github.MAX_REPOSITORIES} repositories",
                code="github_too_many_repositories",
            )
        if not github.owner_ok(spec.owner) or not all(
            github.repository_ok(r) for r in spec.repositories
        ):
            raise InvalidRequest("a rendered owner or repository is not a GitHub name")
        return {
            "owner": spec.owner,
            "owner_type": spec.owner_type,
            "api_url": self.settings.api_url,
            # GitHub's token lives an hour whatever the task's TTL: the latest it can be valid.
            "max_expires_at": self.clock() + github.TOKEN_LIFETIME + EXPIRY_SLACK,
        }

    @staticmethod
    def _spec(request: MintRequest) -> GitHubAppSpec:
        if not isinstance(request.spec, GitHubAppSpec):
            raise InvalidRequest(f"the github backend cannot mint {type(request.spec).__name__}")
        return request.spec

    def mint(self, request: MintRequest) -> Minted:
        spec = self._spec(request)
        self.plan(request)
        installation = self.installation(spec.owner_type, spec.owner)
        self._check_installation(installation, spec)
        body: dict[str, Any] = {"permissions": dict(spec.permissions)}
        if spec.repositories:
            body["repositories"] = list(spec.repositories)
        elif spec.repository_ids:
            body["repository_ids"] = list(spec.repository_ids)
        answer = self._create_token(installation.id, body)
        token = answer.body.get("token") if isinstance(answer.body, dict) else None
        if answer.status != 201 or not isinstance(token, str) or not token:
            raise _refused("GitHub refused to create the installation token", answer)
        try:
            return self._issued(request, spec, installation, answer.body, token)
        except BaseException:
            # Nothing half-checked may outlive a refused mint.
            with contextlib.suppress(Exception):
                self._delete(token)
            raise

    def _create_token(self, installation_id: int, body: dict[str, Any]) -> Answer:
        path = f"/app/installations/{installation_id}/access_tokens"
        try:
            return self._call("POST", path, body=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ServiceUnavailable(
                "GitHub is unavailable", code="backend_unavailable", internal=repr(exc)[:300]
            ) from None
        except httpx.HTTPError as exc:
            # Sent, answer lost: a token may exist that nobody holds (it expires in an hour).
            raise MintOutcomeUnknown(
                "GitHub did not answer in time; nothing was issued", internal=repr(exc)[:300]
            ) from None

    def _issued(
        self,
        request: MintRequest,
        spec: GitHubAppSpec,
        installation: Installation,
        body: dict[str, Any],
        token: str,
    ) -> Minted:
        """Check GitHub's answer against the request; the minted credential."""
        now = self.clock()
        expires_at = _github_time(body.get("expires_at"))
        if expires_at is None or expires_at <= now:
            raise _refused("GitHub issued a token that has already expired; it was deleted")
        if expires_at > now + github.TOKEN_LIFETIME + EXPIRY_SLACK:
            raise _refused("GitHub issued a token living longer than an hour; it was deleted")
        granted = {str(k): str(v) for k, v in (body.get("permissions") or {}).items()}
        wider = github.widened(granted, spec.permissions)
        if wider:
            raise ServiceUnavailable(
                "GitHub issued a token wider than the scope allows; it was deleted",
                code="backend_refused",
                internal=f"unrequested permissions {wider}",
            )
        repos = [r for r in body.get("repositories") or [] if isinstance(r, dict)]
        if not spec.all_repositories:
            asked_names = {r.lower() for r in spec.repositories}
            asked_ids = set(spec.repository_ids)
            extra = [
                r.get("name")
                for r in repos
                if str(r.get("name", "")).lower() not in asked_names
                and r.get("id") not in asked_ids
            ]
            if extra or body.get("repository_selection") == "all":
                raise ServiceUnavailable(
                    "GitHub issued a token for repositories the scope does not name; it was deleted",
                    code="backend_refused",
                    internal=f"unrequested repositories {extra[:5]}",
                )
        hashed = github.hashed_token(token)
        env = {"GH_TOKEN": token, "GITHUB_TOKEN": token}
        host = urlsplit(self.git_url).hostname or ""
        if host != "github.com":
            env.update({"GH_HOST": urlsplit(self.git_url).netloc, "GH_ENTERPRISE_TOKEN": token})
        return Minted(
            kind=KIND,
            handle=hashed,
            expires_at=expires_at,
            secret={"token": token},
            env=env,
            details={
                "owner": spec.owner,
                "owner_type": spec.owner_type,
                "installation_id": installation.id,
                "repositories": [str(r.get("name")) for r in repos] or list(spec.repositories),
                "repository_ids": [int(r["id"]) for r in repos if isinstance(r.get("id"), int)]
                or list(spec.repository_ids),
                "all_repositories": spec.all_repositories,
                "permissions": granted,
                "github_expires_at": expires_at,
                "hashed_token": hashed,
                "api_url": self.settings.api_url,
                "inject": self.injection(),
            },
            sealed=self.sealer.seal(token, request.credential_id),
        )

    def injection(self) -> dict[str, Any]:
        """Where the token may be presented, for the git helper and the injection proxy."""
        return {
            "secret": "token",
            "http": [
                {"base_url": self.settings.api_url, "header": "Authorization", "scheme": "token"}
            ],
            "git": [{"url": self.git_url, "username": GIT_USERNAME}],
        }

    def revoke(self, ref: RevokeRef) -> None:
        """``DELETE /installation/token`` with the token; ``expired`` once GitHub's expiry passed."""
        deadline = (
            ref.details.get("github_expires_at")
            or ref.details.get("max_expires_at")
            or ref.expires_at
        )
        if deadline is not None and self.clock() >= float(deadline):
            raise CredentialExpired("the GitHub token has expired")
        if ref.sealed is None:
            raise ServiceUnavailable(
                "the broker holds no sealed copy of this GitHub token; it expires within the hour",
                code="github_token_unavailable",
            )
        token = self.sealer.unseal(ref.sealed, ref.credential_id)
        answer = self._delete(token)
        if answer.status == 204:
            return
        if answer.status == 401:
            # Already revoked (by a racing replica, or by its holder) or expired: GitHub no
            # longer accepts it, but only a DELETE that succeeded is reported as revoked.
            raise ServiceUnavailable(
                "GitHub no longer accepts the token; it is recorded as expired once its hour ends",
                code="github_token_rejected",
                internal=_message(answer),
            )
        raise ServiceUnavailable(
            "GitHub refused the revocation", code="backend_refused", internal=_message(answer)
        )

    def _delete(self, token: str) -> Answer:
        return self._read("DELETE", "/installation/token", token=token)

    def health(self) -> None:
        """``GET /app`` as the App: the key loads, the JWT is accepted, GitHub answers."""
        now = time.monotonic()
        if self._healthy_at is not None and now - self._healthy_at < HEALTH_CACHE_SECONDS:
            return
        answer = self._read("GET", "/app")
        if answer.status != 200:
            raise _refused("GitHub refused the App's credentials", answer)
        self._healthy_at = now

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "api_url": self.settings.api_url,
            "git_url": self.git_url,
            "app": str(self.issuer),
            "kinds": [KIND],
            "revocation": "DELETE /installation/token with the token, sealed at rest under "
            f"key {self.sealer.key_id}; tokens expire after an hour",
        }

    # --- installations ---------------------------------------------------------------------------

    def installation(self, owner_type: str, owner: str) -> Installation:
        """The App's installation on ``owner`` (remembered for ``cache_seconds``, not 404s)."""
        key = (owner_type, owner.lower())
        cached = self._installations.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.settings.cache_seconds:
            return cached[1]
        segment = "orgs" if owner_type == "organization" else "users"
        answer = self._read("GET", f"/{segment}/{quote(owner, safe='')}/installation")
        if answer.status == 404:
            raise InvalidRequest(
                f"the GitHub App is not installed on {owner!r}",
                code="github_installation_not_found",
            )
        if answer.status != 200 or not isinstance(answer.body, dict):
            raise _refused("GitHub did not return the App's installation", answer)
        body = answer.body
        found = Installation(
            id=int(body["id"]),
            account=str((body.get("account") or {}).get("login") or owner),
            permissions={str(k): str(v) for k, v in (body.get("permissions") or {}).items()},
            repository_selection=str(body.get("repository_selection") or "selected"),
            suspended=body.get("suspended_at") is not None,
        )
        self._installations[key] = (time.monotonic(), found)
        return found

    def _check_installation(self, installation: Installation, spec: GitHubAppSpec) -> None:
        """The request within what the installation holds and reaches."""
        if installation.suspended:
            raise InvalidRequest(
                "the GitHub App's installation is suspended", code="github_installation_suspended"
            )
        over = github.exceeding(
            spec.permissions, {**github.IMPLICIT_PERMISSIONS, **installation.permissions}
        )
        if over:
            raise InvalidRequest(
                f"the GitHub App's installation does not hold {', '.join(over)} at the level asked",
                code="github_permission_not_granted",
            )
        if spec.all_repositories or installation.repository_selection == "all":
            return  # every repository of the owner; GitHub refuses names that do not exist
        listed = self.repositories(installation)
        if listed is None:
            return  # too many to list; GitHub itself refuses a repository outside the installation
        missing = [r for r in spec.repositories if r.lower() not in listed]
        ids = set(listed.values())
        missing += [str(i) for i in spec.repository_ids if i not in ids]
        if missing:
            raise InvalidRequest(
                f"repositories {', '.join(missing[:5])} are not in the GitHub App's installation",
                code="github_repository_not_in_installation",
            )

    def repositories(self, installation: Installation) -> dict[str, int] | None:
        """``{lower-case name: id}`` the installation can reach (remembered briefly).

        Listing needs an installation token: the broker makes one with ``metadata: read`` only,
        lists, and deletes it at once. ``None`` when the listing is too long to pre-check.
        """
        cached = self._listings.get(installation.id)
        if cached is not None and time.monotonic() - cached[0] < self.settings.cache_seconds:
            return cached[1]
        answer = self._create_token(installation.id, {"permissions": {"metadata": "read"}})
        token = answer.body.get("token") if isinstance(answer.body, dict) else None
        if answer.status != 201 or not isinstance(token, str):
            raise _refused("GitHub refused the token that lists the installation", answer)
        try:
            listed = self._list(token)
        finally:
            gone = self._delete(token)
            if gone.status != 204:
                log.warning("the listing token could not be deleted (%s)", gone.status)
        self._listings[installation.id] = (time.monotonic(), listed)
        return listed

    def _list(self, token: str) -> dict[str, int] | None:
        listed: dict[str, int] = {}
        for page in range(1, MAX_LISTING_PAGES + 1):
            answer = self._read(
                "GET",
                "/installation/repositories",
                token=token,
                params={"per_page": 100, "page": page},
            )
            if answer.status != 200 or not isinstance(answer.body, dict):
                raise _refused("GitHub did not list the installation's repositories", answer)
            repos = [r for r in answer.body.get("repositories") or [] if isinstance(r, dict)]
            for repo in repos:
                listed[str(repo.get("name", "")).lower()] = int(repo.get("id") or 0)
            total = int(answer.body.get("total_count") or 0)
            if len(repos) < 100 or len(listed) >= total:
                return listed
        return None

    # --- for `broker scopes check --live` --------------------------------------------------------

    def check(self, template: ScopeTemplate) -> list[Requirement]:
        """``broker scopes check --live``: the installation holds what ``template`` may ask for
        (:meth:`check_template` says what is wrong, nothing cached)."""
        wanted = requirements(template)
        if "{{" in getattr(template.backend, "owner", ""):
            return [
                r.checked("unknown", "the owner is a parameter: checked at each mint")
                for r in wanted
            ]
        problems = self.check_template(template)
        if problems:
            return [r.checked("missing", "; ".join(problems)) for r in wanted]
        return [r.checked("ok", "installed, with those permissions") for r in wanted]

    def check_template(self, template: ScopeTemplate) -> list[str]:
        """Problems a live GitHub shows for ``template`` (empty when none): the App is installed
        on its owner, not suspended, and holds the permissions at the levels the template may
        ask for (its maximum, else its fixed levels)."""
        spec = template.backend
        if not isinstance(spec, GitHubAppSpec):
            return []
        if "{{" in spec.owner:
            return []  # the owner is a parameter: checked at each mint
        try:
            installation = self.installation(spec.owner_type, spec.owner)
        except (InvalidRequest, ServiceUnavailable) as exc:
            return [exc.detail]
        problems = []
        if installation.suspended:
            problems.append(f"the installation on {spec.owner!r} is suspended")
        wanted: dict[str, str] = dict(spec.maximum.permissions or {}) if spec.maximum else {}
        for name, level in spec.permissions.items():
            if name not in wanted and level in github.LEVELS:
                wanted[name] = level
        held = {**github.IMPLICIT_PERMISSIONS, **installation.permissions}
        for name in github.exceeding(wanted, held):
            problems.append(
                f"the installation on {spec.owner!r} holds {name}: {held.get(name, 'none')}, "
                f"the template may ask for {wanted[name]}"
            )
        return problems


def key_reader(settings: GitHubAppSettings) -> Callable[[], str] | None:
    """A reader for a private key kept in a file (None when it is kept in OpenBao)."""
    path = settings.private_key_file
    if path is None:
        return None
    return lambda: read_key_file(path)
