"""The broker's one typed settings object.

Values come from ``BROKER_*`` environment variables (nested with ``__``, for example
``BROKER_VAULT__ADDR``) and an optional YAML file named by ``BROKER_CONFIG``; the environment wins.
Outside dev mode, :meth:`Settings.check_production` refuses insecure combinations.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from broker.domain.conditions import ConditionSet
from broker.domain.principal import Role
from broker.domain.scope import RateWindow
from broker.errors import ConfigurationError

#: Algorithms the broker will ever accept on an ID token: asymmetric only.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def is_loopback_url(url: str) -> bool:
    """True when ``url`` points at this machine (127.0.0.0/8, ::1 or ``localhost``)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: A claim name, or a dotted path into nested claims (``kubernetes.io.namespace``).
CLAIM_PATH = r"^[A-Za-z0-9_:\-]+(\.[A-Za-z0-9_:\-]+)*$"


class RoleRule(BaseModel):
    """Grant ``role`` to every principal of the issuer whose claims satisfy ``when``."""

    model_config = {"extra": "forbid"}

    role: Role
    when: ConditionSet


class ClaimMapping(BaseModel):
    """Which claims of a verified token make up the principal (dotted paths reach nested claims)."""

    model_config = {"extra": "forbid"}

    subject: str = Field(default="sub", pattern=CLAIM_PATH)
    display_name: str | None = Field(default="name", pattern=CLAIM_PATH)
    groups: str | None = Field(default="groups", pattern=CLAIM_PATH)
    #: A claim whose values name broker roles (agent, approver, auditor, admin); other values
    #: are ignored.
    roles: str | None = Field(default=None, pattern=CLAIM_PATH)
    #: Roles granted when the claims satisfy conditions, e.g. approver for one IdP group.
    role_rules: list[RoleRule] = Field(default_factory=list)
    #: Claims that together name the run a token was issued to (a CI job, a pod): a task is
    #: reachable from the session that requested it and from later sessions of the same run.
    #: Empty: a task belongs to its session alone. Presets set GitHub's ``run_id`` and
    #: ``run_attempt``, GitLab's ``pipeline_id`` and ``job_id``, Kubernetes' pod uid.
    run_identity: list[Annotated[str, Field(pattern=CLAIM_PATH)]] = Field(
        default_factory=list, max_length=8
    )
    #: Claims naming the person behind this identity across issuers (a verified e-mail, an
    #: employee id, the GitHub ``actor`` who triggered a run): approvers are counted by person,
    #: and the requester's person never approves. ``email`` counts only with
    #: ``email_verified: true``. Empty: people are told apart by (issuer, subject) only.
    person: list[Annotated[str, Field(pattern=CLAIM_PATH)]] = Field(
        default_factory=list, max_length=8
    )

    @field_validator("run_identity", "person", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class AccessTokenConfig(BaseModel):
    """Access tokens (RFC 9068 JWTs) an issuer's callers may exchange instead of ID tokens.

    They are a different kind of token with their own audiences: an ID token never passes as an
    access token, nor the reverse (``typ`` and the audiences keep them apart).
    """

    model_config = {"extra": "forbid"}

    #: The access token's ``aud`` must name at least one of these and nothing else; they may not
    #: overlap the issuer's ID token ``audiences``.
    audiences: list[str] = Field(min_length=1, max_length=16)
    #: RFC 9068 access tokens carry ``typ: at+jwt``; turn off only for an issuer whose access
    #: tokens are untyped JWTs (then only the audiences tell them from ID tokens).
    require_typ: bool = True
    #: When set, the token's ``client_id`` (or ``azp``) must be one of these clients.
    clients: list[str] = Field(default_factory=list, max_length=64)


class IssuerConfig(BaseModel):
    """A trusted OIDC issuer. Identity is always the pair (issuer, subject).

    A ``preset`` fills in the fields an entry leaves out (see :mod:`broker.oidc.presets` and
    docs/authentication.md); what the entry says itself always wins.
    """

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    preset: Literal["generic", "github-actions", "gitlab-ci", "kubernetes", "dev"] = "generic"
    #: Compared with the token's ``iss`` as an exact string: no case folding, no trailing-slash
    #: tolerance, no prefix matching.
    issuer: str = Field(min_length=1, max_length=2048)
    #: The token's ``aud`` must name at least one of these and nothing else.
    audiences: list[str] = Field(min_length=1, max_length=16)
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA"], min_length=1)
    #: Where the keys are, when not through discovery: a URL, or a file (re-read like a URL).
    jwks_uri: str | None = None
    jwks_file: Path | None = None
    #: Hosts besides the issuer's own that the discovery document may send the broker to for keys.
    jwks_hosts: list[str] = Field(default_factory=list)
    required_claims: list[str] = Field(default_factory=list)
    #: Refuse tokens issued (``iat``) longer ago than this many seconds.
    max_token_age: int | None = Field(default=None, gt=0)
    #: Refuse tokens whose ``exp`` lies further ahead than this many seconds.
    max_token_lifetime: int = Field(default=86_400, gt=0, le=366 * 86_400)
    leeway: int = Field(default=30, ge=0, le=60)
    claims: ClaimMapping = Field(default_factory=ClaimMapping)
    #: Roles granted to every principal of this issuer, in addition to claim-derived roles.
    roles: list[Role] = Field(default_factory=lambda: list[Role](["agent"]))
    #: Conditions every token of this issuer must satisfy; see docs/authentication.md.
    trust: ConditionSet | None = None
    #: ``audit`` records what the trust rules would have denied, without denying it.
    trust_mode: Literal["enforce", "audit"] = "enforce"
    #: Every token must carry a ``jti``, and each is accepted once (across replicas).
    require_jti: bool = False
    #: When set, an ID token carrying ``azp`` must name one of these clients (the party the
    #: token was issued to); tokens without ``azp`` are judged by ``aud`` alone.
    authorized_parties: list[str] = Field(default_factory=list, max_length=64)
    #: Accept access tokens (``subject_token_type`` ``...:jwt`` or ``...:access_token``) of this
    #: issuer, with their own audiences; without it only ID tokens are accepted.
    access_tokens: AccessTokenConfig | None = None
    #: A cap on sessions of this issuer, below the global ``session_max_ttl``.
    session_max_ttl: int | None = Field(default=None, gt=0, le=86_400)
    #: Key cache: refresh period, unknown-kid refetch cooldown, how long the last good keys serve
    #: while the issuer is unreachable, and the deadline of one fetch (all in seconds).
    jwks_refresh: float = Field(default=300, ge=10, le=86_400)
    jwks_cooldown: float = Field(default=5, ge=1, le=300)
    jwks_max_stale: float = Field(default=3600, ge=60, le=7 * 86_400)
    fetch_timeout: float = Field(default=5, gt=0, le=30)

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data: Any) -> Any:
        from broker.oidc.presets import apply_defaults

        return apply_defaults(data)

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, issuer: str) -> str:
        parts = urlsplit(issuer)
        if (
            parts.scheme not in {"https", "http"}
            or not parts.hostname
            or parts.query
            or parts.fragment
            or parts.username is not None
            or any(c.isspace() for c in issuer)
        ):
            raise ValueError(
                "issuer must be an absolute https URL without query, fragment or user info"
            )
        return issuer

    @field_validator("audiences")
    @classmethod
    def _audiences(cls, audiences: list[str]) -> list[str]:
        if any(not a or len(a) > 512 for a in audiences):
            raise ValueError("audiences must be non-empty strings of at most 512 characters")
        return audiences

    @field_validator("required_claims")
    @classmethod
    def _claim_paths(cls, claims: list[str]) -> list[str]:
        import re

        bad = [c for c in claims if not re.fullmatch(CLAIM_PATH, c)]
        if bad:
            raise ValueError(f"required_claims {bad} are not claim names or dotted paths")
        return claims

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, algorithms: list[str]) -> list[str]:
        bad = [a for a in algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if bad:
            raise ValueError(
                f"algorithms {bad} are not allowed: only asymmetric algorithms "
                f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))}) may verify ID tokens"
            )
        return algorithms

    #: The trust conditions that pin a multi-tenant preset's tenant (always enforced).
    _tenant_pin: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _coherent(self) -> IssuerConfig:
        from broker.oidc.presets import preset_problem, tenant_pin, tenant_problem

        if self.jwks_uri is not None and self.jwks_file is not None:
            raise ValueError("give jwks_uri or jwks_file, not both")
        if self.jwks_max_stale <= self.jwks_refresh:
            raise ValueError("jwks_max_stale must be longer than jwks_refresh")
        if self.access_tokens is not None:
            shared = set(self.access_tokens.audiences) & set(self.audiences)
            if shared:
                raise ValueError(
                    f"access_tokens.audiences {sorted(shared)} are also ID token audiences: "
                    "an ID token could then pass as an access token (or the reverse)"
                )
        problem = tenant_problem(self.preset, self.trust) or preset_problem(
            self.preset, self.issuer
        )
        if problem:
            raise ValueError(problem)
        self._tenant_pin = tenant_pin(self.preset, self.trust)
        return self

    @property
    def tenant_pin(self) -> Any:
        """The :class:`~broker.oidc.presets.TenantPin` of a multi-tenant preset, or None."""
        return self._tenant_pin

    def transport_problems(self, *, dev_mode: bool) -> list[str]:
        """Plain http is for loopback issuers in dev mode only."""
        problems = []
        for what, url in (("issuer", self.issuer), ("jwks_uri", self.jwks_uri)):
            if url is None or urlsplit(url).scheme == "https":
                continue
            if not dev_mode:
                problems.append(f"issuer {self.name!r} has an {what} without https")
            elif not is_loopback_url(url):
                problems.append(
                    f"issuer {self.name!r} has a plain-http {what} that is not loopback "
                    "(even dev mode allows http only on this machine)"
                )
        return problems


class VaultSettings(BaseModel):
    """How the broker reaches OpenBao/Vault and authenticates itself."""

    model_config = {"extra": "forbid"}

    addr: str = "http://127.0.0.1:8200"
    #: How the broker logs in: its own ``token`` (renewed before expiry), AppRole or JWT auth.
    auth_method: Literal["token", "approle", "jwt"] = "token"
    token: SecretStr | None = None
    #: Mount path of the AppRole or JWT auth method (default ``approle`` / ``jwt``).
    auth_mount: str | None = None
    role_id: str | None = None
    secret_id: SecretStr | None = None
    #: JWT auth: the role to log in to and a file holding the JWT (re-read at each login, as
    #: Kubernetes rotates projected service account tokens).
    jwt_role: str | None = None
    jwt_file: Path | None = None
    #: Token role used to create child tokens; it bounds which policies the broker can grant.
    token_role: str | None = None
    #: Token role for the broker-internal tokens that own dynamic database leases.
    lease_token_role: str | None = None
    #: Policies no template may grant besides ``root`` (compared as Vault normalises names:
    #: trimmed, lowercased), refused by the template loader, the renderer and the backend.
    forbidden_policies: list[str] = Field(default_factory=list)
    namespace: str | None = None
    timeout: float = Field(default=5.0, gt=0)
    verify_tls: bool = True

    @model_validator(mode="after")
    def _auth_complete(self) -> VaultSettings:
        needed: dict[str, list[tuple[str, object]]] = {
            "token": [],  # a missing token is reported by the backend's health check
            "approle": [("role_id", self.role_id), ("secret_id", self.secret_id)],
            "jwt": [("jwt_role", self.jwt_role), ("jwt_file", self.jwt_file)],
        }
        absent = [name for name, value in needed[self.auth_method] if not value]
        if absent:
            raise ValueError(f"vault auth_method {self.auth_method!r} needs {', '.join(absent)}")
        return self


class AwsSettings(BaseModel):
    """How the broker reaches AWS STS (credentials come from the standard chain)."""

    model_config = {"extra": "forbid"}

    region: str = "us-east-1"
    endpoint_url: str | None = None
    timeout: float = Field(default=5.0, gt=0)
    #: Look each role up (iam:GetRole) before AssumeRole: refuses missing roles and learns the
    #: role's real MaxSessionDuration. Turn off only if the broker may not call iam:GetRole.
    verify_roles: bool = True
    #: Name of the inline role policy that carries the broker's kill switches.
    kill_switch_policy: str = Field(default="broker-kill-switch", pattern=r"^[\w+=,.@-]{1,128}$")


class VaultSecretRef(BaseModel):
    """A value in OpenBao/Vault's KV engine, read with the broker's own Vault identity."""

    model_config = {"extra": "forbid"}

    mount: str = Field(default="secret", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    path: str = Field(pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$", max_length=512)
    field: str = Field(default="private_key", pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    kv_version: Literal[1, 2] = 2


def _http_base_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError(f"{what} must be an http(s) URL without query, fragment or user info")
    return url.rstrip("/")


class GitHubAppSettings(BaseModel):
    """The broker's GitHub App: who it is, where its private key is, which GitHub it talks to.

    ``api_url`` is ``https://api.github.com`` or a GitHub Enterprise Server's
    ``https://HOST/api/v3``; ``git_url`` (where git clones over HTTPS) defaults to
    ``https://github.com`` or ``https://HOST``. See docs/backends.md.
    """

    model_config = {"extra": "forbid"}

    #: The App's numeric id or its client id (GitHub recommends the client id); one of them.
    app_id: int | None = Field(default=None, ge=1)
    client_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    #: The App's private key (PEM): a file, or a field of a KV secret in OpenBao/Vault.
    private_key_file: Path | None = None
    private_key_vault: VaultSecretRef | None = None
    api_url: str = "https://api.github.com"
    git_url: str | None = None
    #: A 32-byte key (base64) sealing minted tokens at rest so any replica can revoke them
    #: (``DELETE /installation/token`` needs the token itself); never stored in the database.
    token_key_file: Path | None = None
    timeout: float = Field(default=10.0, gt=0, le=60)
    #: How long an installation (id, permissions, repositories) is remembered, in seconds.
    cache_seconds: float = Field(default=60.0, ge=0, le=3600)
    verify_tls: bool = True

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, url: str) -> str:
        return _http_base_url(url, "github.api_url")

    @field_validator("git_url")
    @classmethod
    def _git_url(cls, url: str | None) -> str | None:
        return None if url is None else _http_base_url(url, "github.git_url")

    @model_validator(mode="after")
    def _coherent(self) -> GitHubAppSettings:
        if (self.app_id is None) == (self.client_id is None):
            raise ValueError("github: give exactly one of app_id and client_id")
        if (self.private_key_file is None) == (self.private_key_vault is None):
            raise ValueError("github: give exactly one of private_key_file and private_key_vault")
        if self.git_url is None and self.effective_git_url is None:
            raise ValueError(
                "github: set git_url (api_url is neither api.github.com nor .../api/v3)"
            )
        return self

    @property
    def effective_git_url(self) -> str | None:
        """Where git reaches repositories over HTTPS."""
        if self.git_url is not None:
            return self.git_url
        if self.api_url == "https://api.github.com":
            return "https://github.com"
        if self.api_url.endswith("/api/v3"):
            return self.api_url.removesuffix("/api/v3")
        return None

    def production_problems(self) -> list[str]:
        """What only a developer's machine may get away with."""
        problems = []
        if self.token_key_file is None:
            problems.append("github.token_key_file is not set (tokens could not be revoked)")
        return problems


class OtlpSettings(BaseModel):
    """Where audit spans are exported."""

    model_config = {"extra": "forbid"}

    endpoint: str | None = None
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    timeout: float = Field(default=5.0, gt=0)
    batch_size: int = Field(default=512, gt=0, le=10_000)
    interval: float = Field(default=0.5, gt=0)
    max_backoff: float = Field(default=30.0, gt=0)
    service_name: str = "broker"
    #: Compression of each OTLP request body.
    compression: Literal["gzip", "none"] = "gzip"


class OpenBaoAuditSettings(BaseModel):
    """Ingest of OpenBao/Vault's own audit stream: each request made with a minted token or lease."""

    model_config = {"extra": "forbid"}

    #: Where the broker listens for OpenBao's ``socket`` audit device: ``HOST:PORT`` (TCP) or
    #: ``unix:/path``. OpenBao drops entries while nobody listens; ``file`` catches them up.
    listen: str | None = None
    #: Peers allowed to connect to a TCP ``listen`` address (OpenBao's own addresses).
    allowed_peers: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    #: The ``file`` audit device's log, tailed from a stored position so nothing is missed.
    file: Path | None = None
    poll_interval: float = Field(default=1.0, gt=0)
    #: Longest audit entry accepted (OpenBao writes one JSON object per line).
    max_entry_bytes: int = Field(default=1_048_576, ge=4096)

    @field_validator("listen")
    @classmethod
    def _listen_address(cls, value: str | None) -> str | None:
        if value is None or value.startswith("unix:/"):
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("listen must be HOST:PORT or unix:/absolute/path")
        return value

    @field_validator("allowed_peers")
    @classmethod
    def _networks(cls, peers: list[str]) -> list[str]:
        for peer in peers:
            try:
                ipaddress.ip_network(peer, strict=False)
            except ValueError:
                raise ValueError(f"allowed_peers: {peer!r} is not an address or network") from None
        return peers


class CloudTrailSettings(BaseModel):
    """Ingest of AWS CloudTrail records: uses of STS credentials the broker minted."""

    model_config = {"extra": "forbid"}

    #: Files or folders of CloudTrail JSON (``.json`` or ``.json.gz``) and ``s3://bucket/prefix``.
    sources: list[str] = Field(default_factory=list)
    poll_interval: float = Field(default=60.0, gt=0)
    #: A SourceIdentity or RoleSessionName starting with one of these marks a broker session
    #: (the STS backend names sessions after the task and credential), so a record carrying it
    #: that matches no credential is reported as unmatched.
    session_prefixes: list[str] = Field(default_factory=lambda: ["tsk_", "crd_"])
    #: Roles the broker assumes; every session of these roles is expected to be the broker's.
    role_arns: list[str] = Field(default_factory=list)


class AuditSettings(BaseModel):
    """Checkpoints of the audit chain and the ingest of credential use records."""

    model_config = {"extra": "forbid"}

    #: Seconds between signed checkpoints of the chain (taken only when events were added).
    checkpoint_interval: float = Field(default=60.0, gt=0)
    openbao: OpenBaoAuditSettings = Field(default_factory=OpenBaoAuditSettings)
    cloudtrail: CloudTrailSettings = Field(default_factory=CloudTrailSettings)
    #: How long ingested record ids are remembered to drop duplicates (longer than any replay).
    dedup_retention: float = Field(default=7 * 86_400.0, gt=0)


WebhookEvent = Literal["task.pending", "task.approved", "task.denied", "task.expired"]


class WebhookSettings(BaseModel):
    """A webhook told when a task starts waiting for approvers and when it is decided.

    Each delivery is signed: ``X-Broker-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
    "<t>.<body>" under secret>``. ``format: slack`` sends a Slack-compatible ``text``/``blocks``
    body (an incoming-webhook URL works as is). See docs/scopes.md.
    """

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    url: str = Field(min_length=8, max_length=2048)
    secret: SecretStr
    format: Literal["json", "slack"] = "json"
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list[WebhookEvent](
            ["task.pending", "task.approved", "task.denied", "task.expired"]
        ),
        min_length=1,
    )
    timeout: float = Field(default=5.0, gt=0, le=30)
    max_attempts: int = Field(default=8, ge=1, le=50)

    @field_validator("secret")
    @classmethod
    def _strong_secret(cls, secret: SecretStr) -> SecretStr:
        if len(secret.get_secret_value()) < 16:
            raise ValueError("a webhook secret needs at least 16 characters")
        return secret

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError("a webhook url must be an http(s) URL")
        return url


class ConsoleSettings(BaseModel):
    """The web console under ``/ui`` for approvers and auditors (docs/console.md).

    People sign in with OpenID Connect (authorization code with PKCE) at ``issuer``, one of the
    configured ``issuers`` whose ``audiences`` include ``client_id``; their roles come from its
    claims exactly as for the API. Without ``issuer`` the console explains that sign-in is not
    configured and serves nothing else.
    """

    model_config = {"extra": "forbid"}

    #: The ``name`` of the configured issuer people sign in with (their identity provider).
    issuer: str | None = None
    #: The console's client id at that identity provider (also the ID token's audience).
    client_id: str = Field(default="broker", min_length=1, max_length=256)
    #: For a confidential client (sent with HTTP Basic); PKCE is used either way.
    client_secret: SecretStr | None = None
    #: Where the identity provider sends people back; default ``<public_url>/ui/callback``.
    redirect_url: str | None = None
    #: OAuth scopes asked for at sign-in (``openid`` is always included).
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"], max_length=20)
    #: ``strict`` keeps the session cookie off every cross-site navigation (a link in a chat
    #: opens the sign-in again); ``lax`` sends it on top-level links. Forms need a CSRF token
    #: either way.
    cookie_samesite: Literal["lax", "strict"] = "lax"
    #: How long a sign-in at the identity provider may take, in seconds.
    login_ttl: int = Field(default=600, ge=60, le=3600)
    #: A link to a task's trace in a tracing UI, ``{trace_id}`` replaced, for example
    #: ``https://jaeger.example.com/trace/{trace_id}``.
    trace_url: str | None = Field(default=None, max_length=2048)
    #: How long an audit chain verification is shown before the console runs it again (seconds).
    verify_interval: float = Field(default=300.0, ge=0, le=86_400)

    @field_validator("trace_url")
    @classmethod
    def _trace_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        if "{trace_id}" not in url or urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("trace_url must be an http(s) URL containing {trace_id}")
        return url

    @field_validator("redirect_url")
    @classmethod
    def _redirect_url(cls, url: str | None) -> str | None:
        if url is not None and (
            urlsplit(url).scheme not in ("http", "https")
            or not urlsplit(url).hostname
            or urlsplit(url).fragment
        ):
            raise ValueError("redirect_url must be an absolute http(s) URL without fragment")
        return url


class RateLimitSettings(BaseModel):
    """Broker-wide limits on task requests, per principal over all scopes (templates add their own)."""

    model_config = {"extra": "forbid"}

    per_principal: list[RateWindow] = Field(default_factory=list, max_length=5)


class HttpSettings(BaseModel):
    """Limits on what one HTTP request may make the broker read, and who may speak for clients."""

    model_config = {"extra": "forbid"}

    #: Largest request body of any route not named below, in bytes (JSON API bodies).
    max_body: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    #: ``/oauth2/*`` form bodies (a subject token is at most 16 KiB).
    max_body_token: int = Field(default=32 * 1024, ge=1024, le=1024 * 1024)
    #: ``POST /v1/tasks/{id}/exec`` run reports (up to 65 redacted arguments of 1 KiB).
    max_body_exec: int = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)
    #: The console's forms under ``/ui``.
    max_body_console: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    #: All request header lines together, in bytes, and how many header lines.
    max_header_bytes: int = Field(default=16 * 1024, ge=4096, le=256 * 1024)
    max_headers: int = Field(default=64, ge=16, le=1000)
    #: Addresses or networks of reverse proxies whose ``X-Forwarded-For`` is believed; from any
    #: other peer the header is ignored and the socket's peer is the client.
    trusted_proxies: list[str] = Field(default_factory=list, max_length=64)
    #: Serve ``/docs``, ``/redoc`` and ``/openapi.json`` outside dev mode.
    public_docs: bool = False
    #: Requests doing authentication work (verifying a subject token, resolving a session
    #: token, auditing a refusal) at once; others wait without holding a thread.
    auth_concurrency: int = Field(default=4, ge=1, le=256)
    #: Requests that may wait for that work; beyond it the broker answers 503 at once.
    auth_queue: int = Field(default=512, ge=0, le=100_000)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {proxy!r} is not an address or network"
                ) from None
        return proxies


class AuthLimitSettings(BaseModel):
    """Throttling of failed authentication and how a flood of refusals is audited.

    Counted in fixed windows shared by every replica (the store's rate counters): a failed token
    exchange or a bad session token counts against the client's address and, when the token
    named a configured issuer, against that issuer.
    """

    model_config = {"extra": "forbid"}

    #: Failures one client address may cause per window; then it is refused (429) until the
    #: window ends.
    per_address: int = Field(default=30, ge=1, le=1_000_000)
    #: Failures naming one issuer per window; from then on every address failing against that
    #: issuer is refused until the window ends (addresses without failures are not).
    per_issuer: int = Field(default=300, ge=1, le=10_000_000)
    #: The window, in seconds, of both limits and of the audit summaries.
    window: int = Field(default=60, ge=1, le=3600)
    #: IPv6 clients are counted by this prefix (one host usually holds a whole /64).
    ipv6_prefix: int = Field(default=64, ge=32, le=128)
    #: How often counts kept in memory are written to the store and ended windows summarised.
    flush_interval: float = Field(default=1.0, gt=0, le=60)


class Settings(BaseSettings):
    """Everything the broker can be told. Build it once and pass it to ``create_app``."""

    model_config = SettingsConfigDict(
        env_prefix="BROKER_",
        env_nested_delimiter="__",
        extra="forbid",
        yaml_file=None,
    )

    dev_mode: bool = False
    public_url: str = "http://127.0.0.1:8080"
    data_dir: Path = Path(".broker")
    database_url: str | None = None
    scopes_dir: Path = Path("scopes")
    #: How often (seconds) the scope folder is checked for changed templates.
    scopes_reload_interval: float = Field(default=1.0, ge=0, le=300)
    webhooks: list[WebhookSettings] = Field(default_factory=list, max_length=20)
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)
    #: Longest a client may hold ``GET /v1/tasks/{id}?wait=`` open, in seconds.
    task_wait_max: int = Field(default=60, ge=1, le=300)
    signing_key_file: Path | None = None

    issuers: list[IssuerConfig] = Field(default_factory=list)
    session_max_ttl: int = Field(default=3600, gt=0, le=86_400)
    credential_max_ttl: int = Field(default=12 * 3600, ge=60, le=7 * 86_400)

    vault: VaultSettings | None = None
    aws: AwsSettings | None = None
    github: GitHubAppSettings | None = None
    otlp: OtlpSettings = Field(default_factory=OtlpSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)

    reaper_interval: float = Field(default=5.0, gt=0)
    #: A credential still ``minting`` this long after its intent was recorded is a crashed mint.
    reaper_mint_grace: float = Field(default=60.0, gt=0)
    #: How often backends are scanned for objects carrying this broker's metadata but no record.
    reaper_orphan_interval: float = Field(default=300.0, gt=0)
    reaper_batch: int = Field(default=100, ge=1, le=10_000)
    #: Written into every backend object's metadata; the orphan scan only touches its own.
    cluster_name: str = Field(default="broker", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    #: Broker-signed tokens and checkpoints: key algorithm and how often a new key is made.
    signing_algorithm: Literal["EdDSA", "ES256"] = "EdDSA"
    signing_key_rotation: int = Field(default=86_400, ge=300)
    #: Test hook, refused outside dev mode: ``pause_after_mint`` stops a mint between the
    #: backend call and its record (so a test can SIGKILL the broker there).
    dev_fault: Literal["pause_after_mint"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    http: HttpSettings = Field(default_factory=HttpSettings)
    auth_limits: AuthLimitSettings = Field(default_factory=AuthLimitSettings)
    #: Hosts the broker may reach over plain http outside dev mode (Vault, the OTLP collector,
    #: an AWS endpoint, webhooks): a sidecar, or a network where a mesh adds TLS. Naming a host
    #: here is the explicit acknowledgement; loopback is always allowed.
    plain_http_hosts: list[str] = Field(default_factory=list, max_length=64)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        import os

        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("BROKER_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise ConfigurationError(f"BROKER_CONFIG names {config_file!r}, which is no file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    @field_validator("issuers")
    @classmethod
    def _unique_issuers(cls, issuers: list[IssuerConfig]) -> list[IssuerConfig]:
        names = [i.name for i in issuers]
        urls = [i.issuer for i in issuers]
        if len(set(names)) != len(names) or len(set(urls)) != len(urls):
            raise ValueError("issuer names and issuer URLs must each be unique")
        return issuers

    @model_validator(mode="after")
    def _console_issuer(self) -> Settings:
        """The console signs people in at one configured issuer, as one of its audiences."""
        name = self.console.issuer
        if name is None:
            return self
        issuer = next((i for i in self.issuers if i.name == name), None)
        if issuer is None:
            raise ValueError(f"console.issuer {name!r} names no configured issuer")
        if self.console.client_id not in issuer.audiences:
            raise ValueError(
                f"console.client_id {self.console.client_id!r} must be one of the audiences of "
                f"issuer {name!r} (the ID tokens it issues to the console name it)"
            )
        return self

    @model_validator(mode="after")
    def _production_rules(self) -> Settings:
        if not self.dev_mode:
            self.check_production()
        else:
            loose = [p for iss in self.issuers for p in iss.transport_problems(dev_mode=True)]
            if loose:
                raise ValueError("; ".join(loose))
        return self

    def check_production(self) -> None:
        """Refuse what is only acceptable on a developer's machine."""
        problems: list[str] = []
        for iss in self.issuers:
            if iss.preset == "dev":
                problems.append(f"issuer {iss.name!r} is the development issuer")
            if urlsplit(iss.issuer).scheme != "https":
                problems.append(f"issuer {iss.name!r} ({iss.issuer}) does not use https")
            if iss.jwks_uri and urlsplit(iss.jwks_uri).scheme != "https":
                problems.append(f"issuer {iss.name!r} has a jwks_uri without https")
        if self.signing_key_file is None:
            problems.append("no signing_key_file (BROKER_SIGNING_KEY_FILE) is set")
        if self.dev_fault is not None:
            problems.append("dev_fault is a test hook")
        if (
            self.console.issuer is not None
            and urlsplit(self.public_url).scheme != "https"
            and not is_loopback_url(self.public_url)
        ):
            problems.append("the console needs an https public_url (its cookies are Secure)")
        problems += self._transport_problems()
        if self.github is not None:
            problems.extend(self.github.production_problems())
        if any(
            ipaddress.ip_network(p, strict=False).prefixlen == 0 for p in self.http.trusted_proxies
        ):
            problems.append(
                "http.trusted_proxies trusts every address: any client could then choose the "
                "address it is counted under by sending X-Forwarded-For"
            )
        if problems:
            raise ValueError(
                "refusing insecure configuration outside dev mode: "
                + "; ".join(problems)
                + " (set BROKER_DEV_MODE=true only on a developer machine)"
            )

    def _transport_problems(self) -> list[str]:
        """Plain http to a non-loopback host, and TLS checks turned off (outside dev mode)."""
        targets: list[tuple[str, str | None]] = [
            ("vault.addr", self.vault.addr if self.vault else None),
            ("otlp.endpoint", self.otlp.endpoint),
            ("aws.endpoint_url", self.aws.endpoint_url if self.aws else None),
        ]
        targets += [(f"webhooks[{hook.name}].url", hook.url) for hook in self.webhooks]
        if self.github is not None:
            targets += [
                ("github.api_url", self.github.api_url),
                ("github.git_url", self.github.effective_git_url),
            ]
        problems = []
        for setting, url in targets:
            if url is None:
                continue
            # An OTLP/gRPC endpoint may be a bare host:port, which the exporter dials without TLS.
            absolute = url if "://" in url else f"http://{url}"
            parts = urlsplit(absolute)
            if (
                parts.scheme == "https"
                or is_loopback_url(absolute)
                or (parts.hostname or "") in self.plain_http_hosts
            ):
                continue
            problems.append(
                f"{setting} ({parts.scheme}://{parts.hostname}) is plain {parts.scheme} to a host "
                "that is not loopback: use https, or name the host in plain_http_hosts if a "
                "sidecar or mesh encrypts that traffic"
            )
        if self.vault is not None and not self.vault.verify_tls:
            problems.append("vault.verify_tls is false: anyone on the path could pose as Vault")
        if self.github is not None and not self.github.verify_tls:
            problems.append("github.verify_tls is false: anyone on the path could pose as GitHub")
        return problems

    @property
    def effective_database_url(self) -> str:
        """The store URL; SQLite under ``data_dir`` unless ``database_url`` is set."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def effective_signing_key_file(self) -> Path:
        return self.signing_key_file or self.data_dir / "signing-key.pem"


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment and config file, as a clear error when invalid."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        from broker.config_locations import config_location

        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            source = config_location(err["loc"], overrides=overrides)
            lines.append(f"  {source + ': ' if source else ''}{where}: {err['msg']}")
        raise ConfigurationError("invalid settings:\n" + "\n".join(lines)) from None
