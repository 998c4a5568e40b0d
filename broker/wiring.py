"""The composition root: build every part of a broker from settings (nothing at import time)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from broker.audit.uses import UseRecorder
from broker.backends.base import Backend
from broker.domain.vault_policies import ForbiddenPolicies
from broker.errors import BrokerError, ConfigurationError, ServiceUnavailable
from broker.keyring import KeyRing, PublishedKeys
from broker.oidc.verifier import TokenVerifier
from broker.scopes.loader import ScopeCatalog
from broker.services.approvals import ApprovalService
from broker.services.auth_guard import AuthGuard
from broker.services.credentials import CredentialService
from broker.services.introspection import Introspector
from broker.services.kill_switch import KillSwitchBackend, KillSwitches
from broker.services.limits import RateLimiter
from broker.services.notifications import WebhookNotifier
from broker.services.reaper import Reaper
from broker.services.revocation import Revoker
from broker.services.scope_health import ScopeHealth
from broker.services.sessions import SessionService
from broker.services.tasks import ExpiryLoop, TaskService
from broker.settings import Settings
from broker.store import Database, repo

log = logging.getLogger(__name__)


def default_backends(
    settings: Settings,
    *,
    keyring: KeyRing | None = None,
    clock: Callable[[], float] = time.time,
) -> dict[str, Backend]:
    """The backends the settings configure (broker-signed tokens need only the key ring)."""
    backends: dict[str, Backend] = {}
    if settings.vault is not None:
        from broker.backends.vault import VaultBackend

        backends["vault"] = VaultBackend(settings.vault, cluster=settings.cluster_name, clock=clock)
    if settings.aws is not None:
        from broker.backends.aws_sts import AwsStsBackend

        backends["aws_sts"] = AwsStsBackend(
            settings.aws, cluster=settings.cluster_name, clock=clock
        )
    if settings.github is not None:
        backends["github"] = github_backend(settings, backends.get("vault"), clock=clock)
    if keyring is not None:
        from broker.backends.broker_jwt import BrokerJwtBackend

        backends["broker_jwt"] = BrokerJwtBackend(keyring, settings.public_url, clock=clock)
    return backends


def github_backend(
    settings: Settings, vault: Backend | None, *, clock: Callable[[], float] = time.time
) -> Backend:
    """The GitHub App backend: its private key from a file or OpenBao KV (read through the
    Vault backend, so hvac stays there), its token-sealing key from a file (made in dev mode)."""
    from broker.backends.github_app import GitHubAppBackend, TokenSealer, key_reader

    github = settings.github
    assert github is not None
    read_key = key_reader(github)
    ref = github.private_key_vault
    if ref is not None:
        from broker.backends.vault import VaultBackend

        if not isinstance(vault, VaultBackend):
            raise ConfigurationError("github.private_key_vault needs the vault settings")
        store = vault

        def read_key() -> str:
            return store.read_kv(ref.mount, ref.path, ref.field, version=ref.kv_version)

    assert read_key is not None
    key_file = github.token_key_file
    if key_file is None:
        if not settings.dev_mode:
            raise ConfigurationError("github.token_key_file is required outside dev mode")
        key_file = settings.data_dir / "github-token.key"
        if not key_file.exists():
            with contextlib.suppress(FileExistsError):  # another dev process made it first
                TokenSealer.create_file(key_file)
    return GitHubAppBackend(
        github, private_key=read_key, sealer=TokenSealer.from_file(key_file), clock=clock
    )


def build_keyring(settings: Settings, db: Database, clock: Callable[[], float]) -> KeyRing:
    """The broker's signing keys: the operator's key file, or rotating keys under data_dir."""
    return KeyRing(
        keys_dir=settings.data_dir / "keys",
        key_file=settings.signing_key_file,
        algorithm=settings.signing_algorithm,
        rotation=settings.signing_key_rotation,
        verify_window=settings.credential_max_ttl + 300,
        published=PublishedKeys(db),
        clock=clock,
    )


@dataclass
class Broker:
    """Every long-lived part of one broker process."""

    settings: Settings
    db: Database
    catalog: ScopeCatalog
    verifier: TokenVerifier
    backends: dict[str, Backend]
    sessions: SessionService
    tasks: TaskService
    credentials: CredentialService
    revoker: Revoker
    http: httpx.Client
    clock: Callable[[], float]
    #: Records observed uses of credentials (OpenBao, CloudTrail, introspection).
    uses: UseRecorder
    #: Approvers' decisions on pending tasks.
    approvals: ApprovalService
    #: Webhook notifications of task decisions (an outbox, delivered in the background).
    notifier: WebhookNotifier
    background: list[Any] = field(default_factory=list)
    #: The audit's background parts (export, checkpoints, ingest) once started.
    audit: Any = None
    #: The broker's own rotating signing key (broker-signed tokens, audit checkpoints, JWKS).
    keyring: KeyRing | None = None
    #: AWS kill switches (deny entries on roles).
    kill_switches: KillSwitches | None = None
    #: Background repair: expiry, revocation retries, crashed mints, orphans.
    reaper: Reaper | None = None
    #: RFC 7662 introspection of broker-signed tokens.
    introspector: Introspector | None = None
    #: Throttling and summarised auditing of failed authentication.
    guard: AuthGuard | None = None
    #: Scopes whose last mint found them misconfigured at their backend (``/readyz`` detail).
    scope_health: ScopeHealth = field(default_factory=ScopeHealth)

    def readiness(self) -> dict[str, str]:
        """Each dependency's state: ``ok`` or a short reason (no secrets, no internals)."""
        checks: dict[str, str] = {}
        try:
            self.db.ping()
            checks["store"] = "ok"
        except BrokerError:
            checks["store"] = "unavailable"
        for name, backend in sorted(self.backends.items()):
            try:
                backend.health()
                checks[f"backend:{name}"] = "ok"
            except ServiceUnavailable as exc:
                checks[f"backend:{name}"] = exc.code
        return checks

    def revocations(self) -> dict[str, int]:
        """Counts for operators and probes: revocations still being retried, and those among
        them where something of the credential may still live (``revocation_unconfirmed``)."""
        try:
            with self.db.read() as conn:
                states = repo.count_credentials_by_state(conn)
                unconfirmed = repo.count_unconfirmed_revocations(conn)
        except BrokerError:
            return {}
        return {"pending": states.get("revoke_pending", 0), "unconfirmed": unconfirmed}

    def start(self) -> None:
        """Start background work (audit export, checkpoints and use ingest, reaper)."""
        from broker.audit.runtime import AuditRuntime

        self.audit = AuditRuntime(
            self.settings, self.db, self.clock, self.uses, signer=self.keyring
        )
        self.audit.start()
        self.background.append(self.audit)
        self.notifier.start()
        self.background.append(self.notifier)
        expiry = ExpiryLoop(self.tasks, self.settings.reaper_interval)
        expiry.start()
        self.background.append(expiry)
        if self.reaper is not None:
            self.reaper.start()
            self.background.append(self.reaper)
        if self.guard is not None:
            self.guard.start()
            self.background.append(self.guard)

    def stop(self) -> None:
        for part in reversed(self.background):
            try:
                part.stop()
            except Exception:
                log.exception("stopping %s failed", part)
        self.background.clear()
        self.http.close()
        self.db.dispose()


def build_broker(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    http: httpx.Client | None = None,
    backends: dict[str, Backend] | None = None,
) -> Broker:
    """Construct a broker; outward clients can be injected (tests, benchmarks)."""
    db = Database(settings.effective_database_url)
    catalog = ScopeCatalog(
        settings.scopes_dir,
        check_interval=settings.scopes_reload_interval,
        forbidden_policies=ForbiddenPolicies.of(
            settings.vault.forbidden_policies if settings.vault else ()
        ),
    )
    http = http or httpx.Client(timeout=httpx.Timeout(5.0), follow_redirects=False)
    verifier = TokenVerifier(
        settings.issuers, http, clock=clock, allow_http_loopback=settings.dev_mode
    )
    keyring = build_keyring(settings, db, clock)
    if backends is None:
        backends = default_backends(settings, keyring=keyring, clock=clock)
    sts = backends.get("aws_sts")
    kill_switches = KillSwitches(
        db,
        sts if isinstance(sts, KillSwitchBackend) else None,
        clock,
        cluster=settings.cluster_name,
    )
    revoker = Revoker(db, backends, clock, kill_switches)
    notifier = WebhookNotifier(settings, db, clock)
    tasks = TaskService(
        settings, db, catalog, revoker, clock, limiter=RateLimiter(db, clock), notifier=notifier
    )
    uses = UseRecorder(db, clock)
    reaper = Reaper(settings, db, backends, revoker, kill_switches, clock)
    guard = AuthGuard(settings.auth_limits, db, clock)
    scope_health = ScopeHealth()
    return Broker(
        settings=settings,
        db=db,
        catalog=catalog,
        verifier=verifier,
        backends=backends,
        sessions=SessionService(settings, db, verifier, clock, guard),
        tasks=tasks,
        credentials=CredentialService(
            settings,
            db,
            catalog,
            backends,
            clock,
            revoker=revoker,
            notifier=notifier,
            scope_health=scope_health,
        ),
        revoker=revoker,
        http=http,
        clock=clock,
        uses=uses,
        approvals=ApprovalService(db, catalog, tasks, notifier, clock),
        notifier=notifier,
        keyring=keyring,
        kill_switches=kill_switches,
        reaper=reaper,
        introspector=Introspector(settings.public_url, db, keyring, clock, uses),
        guard=guard,
        scope_health=scope_health,
    )
