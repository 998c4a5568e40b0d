"""Issuer keys: where they come from (discovery, a configured URL, a file) and how they are cached.

The cache keeps one issuer's verification keys and follows these rules:

- Keys are refreshed every ``jwks_refresh`` seconds, so a key the issuer withdraws stops working.
- A token whose ``kid`` is unknown triggers a refetch, but at most one per ``jwks_cooldown``
  seconds, shared by every request that asks meanwhile: a flood of random ``kid`` values costs
  the issuer one request per cooldown. The cooldown counts only such unknown-``kid`` refetches,
  so the first token signed with a key the issuer has just rotated in is accepted at once.
- After a failed fetch nothing is fetched again for ``jwks_cooldown`` seconds, so a dead issuer
  is not hammered and requests do not each wait for a timeout.
- While the issuer cannot be reached, the last good keys serve for at most ``jwks_max_stale``
  seconds after they were fetched; then the cache fails closed (503) until a fetch succeeds.
- Only keys fit for verification are kept: public RSA (2048 bits or more), EC on the curve its
  algorithm names, or Ed25519/Ed448; ``use`` absent or ``sig``; ``key_ops`` absent or allowing
  ``verify``; never a JWK carrying private members.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import PyJWTError

from broker.oidc.errors import IssuerUnavailable
from broker.oidc.fetch import FetchFailed, check_fetch_url, fetch_json, origin
from broker.oidc.jose import MalformedInput, strict_json
from broker.settings import IssuerConfig

log = logging.getLogger(__name__)

#: A key set with more keys than this is refused (real issuers publish two to five).
MAX_KEYS = 64
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
_MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One public key of an issuer, with what its JWK said about it."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: Any  # a cryptography public key object

    def fits(self, alg: str) -> bool:
        """Whether this key may verify a signature made with ``alg``."""
        if self.alg is not None and self.alg != alg:
            return False
        if alg.startswith(("RS", "PS")):
            return self.kty == "RSA"
        if alg in _EC_CURVES:
            return self.kty == "EC" and self.crv == _EC_CURVES[alg]
        if alg == "EdDSA":
            return self.kty == "OKP" and self.crv in _OKP_CURVES
        return False

    def verify(self, alg: str, signing_input: bytes, signature: bytes) -> bool:
        """Check the signature with PyJWT's algorithm implementation (never its token parsing)."""
        if not self.fits(alg):
            return False
        algorithm = get_default_algorithms().get(alg)
        if algorithm is None:
            return False
        try:
            return bool(algorithm.verify(signing_input, self.key, signature))
        except (PyJWTError, ValueError, TypeError):
            return False


def _unfit(jwk: dict[str, Any]) -> str | None:
    """Why a JWK may not verify anything, or None."""
    kid, alg, ops = jwk.get("kid"), jwk.get("alg"), jwk.get("key_ops")
    checks = (
        (jwk.get("kty") not in {"RSA", "EC", "OKP"}, "unsupported kty"),
        (kid is not None and (not isinstance(kid, str) or len(kid) > 256), "bad kid"),
        (alg is not None and not isinstance(alg, str), "bad alg"),
        (jwk.get("use", "sig") != "sig", "not a signing key"),
        (ops is not None and (not isinstance(ops, list) or "verify" not in ops), "no verify op"),
        (bool(_PRIVATE_MEMBERS & jwk.keys()), "carries private key material"),
    )
    return next((reason for failed, reason in checks if failed), None)


def _public_key(jwk: dict[str, Any]) -> Any:
    """The cryptography public key of a JWK, or None when it is not a usable public key."""
    algorithms = get_default_algorithms()
    try:
        if jwk["kty"] == "RSA":
            key: Any = algorithms["RS256"].from_jwk(jwk)
            ok = isinstance(key, rsa.RSAPublicKey) and key.key_size >= _MIN_RSA_BITS
        elif jwk["kty"] == "EC":
            key = algorithms["ES256"].from_jwk(jwk)
            ok = isinstance(key, ec.EllipticCurvePublicKey)
        else:
            key = algorithms["EdDSA"].from_jwk(jwk)
            ok = isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
    except (PyJWTError, ValueError, TypeError, KeyError):
        return None
    return key if ok else None


def load_key(jwk: Any) -> VerificationKey | None:
    """A verification key from one JWK, or None (with a log line) when it is unfit."""
    if not isinstance(jwk, dict):
        return None
    reason = _unfit(jwk)
    key = _public_key(jwk) if reason is None else None
    if key is None:
        log.info("skipping JWK kid=%r: %s", str(jwk.get("kid"))[:64], reason or "unusable key")
        return None
    crv = jwk.get("crv")
    return VerificationKey(
        kid=jwk.get("kid"),
        kty=str(jwk["kty"]),
        crv=crv if isinstance(crv, str) else None,
        alg=jwk.get("alg"),
        key=key,
    )


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys of one successful fetch, and when (monotonic seconds) they were fetched."""

    keys: tuple[VerificationKey, ...]
    fetched_at: float

    def has_kid(self, kid: str) -> bool:
        return any(k.kid == kid for k in self.keys)

    def candidates(self, kid: str | None, alg: str) -> list[VerificationKey]:
        """Keys that may have signed a token with this ``kid`` and ``alg``.

        Without a ``kid``, a key is chosen only when exactly one fits: trying every key would let
        each token cost many signature checks.
        """
        fitting = [k for k in self.keys if k.fits(alg)]
        if kid is None:
            return fitting if len(fitting) == 1 else []
        return [k for k in fitting if k.kid == kid]


def parse_key_set(document: dict[str, Any], fetched_at: float) -> KeySet:
    """The usable keys of a JWKS document; a document that is not a key set is an error."""
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise FetchFailed("the key set has no 'keys' list")
    if len(keys) > MAX_KEYS:
        raise FetchFailed(f"the key set holds {len(keys)} keys, more than {MAX_KEYS}")
    loaded = (load_key(k) for k in keys)
    return KeySet(tuple(k for k in loaded if k is not None), fetched_at)


class KeySource(Protocol):
    """Where an issuer's JWKS document comes from."""

    def load(self) -> dict[str, Any]:
        """Fetch the JWKS document; raise :class:`FetchFailed` when it cannot."""
        ...


class UrlKeySource:
    """A JWKS document at a configured URL."""

    def __init__(self, http: httpx.Client, url: str, *, timeout: float) -> None:
        self.http = http
        self.url = url
        self.timeout = timeout

    def load(self) -> dict[str, Any]:
        return fetch_json(self.http, self.url, timeout=self.timeout)


class FileKeySource:
    """A JWKS document in a local file (for clusters whose discovery endpoint is not public)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        try:
            with self.path.open("rb") as f:
                data = f.read(256 * 1024 + 1)
        except OSError as exc:
            raise FetchFailed(f"{self.path}: {exc.strerror}") from None
        if len(data) > 256 * 1024:
            raise FetchFailed(f"{self.path}: larger than 256 KiB")
        try:
            value = strict_json(data)
        except MalformedInput as exc:
            raise FetchFailed(f"{self.path}: {exc}") from None
        if not isinstance(value, dict):
            raise FetchFailed(f"{self.path}: not a JSON object")
        return value


class DiscoveredKeySource:
    """The JWKS document an issuer's discovery document points at.

    The discovery document must name exactly the configured issuer, and its ``jwks_uri`` must be
    https (loopback http in dev mode) on the issuer's own host and port, or one listed in
    ``jwks_hosts`` (``host`` or ``host:port``, https): a compromised or misconfigured issuer cannot point the broker at an arbitrary
    address. The discovered URL is remembered for ``jwks_refresh`` seconds and forgotten as soon
    as a key fetch from it fails.
    """

    def __init__(
        self,
        http: httpx.Client,
        issuer: IssuerConfig,
        *,
        allow_http_loopback: bool,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        self.issuer = issuer
        self.allow_http_loopback = allow_http_loopback
        self.monotonic = monotonic
        self._jwks_uri: str | None = None
        self._discovered_at = 0.0

    @property
    def discovery_url(self) -> str:
        return self.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"

    def discover(self) -> str:
        url = self.discovery_url
        check_fetch_url(url, allow_http_loopback=self.allow_http_loopback)
        doc = fetch_json(self.http, url, timeout=self.issuer.fetch_timeout)
        if doc.get("issuer") != self.issuer.issuer:
            raise FetchFailed(
                f"{url}: the discovery document names issuer {str(doc.get('issuer'))[:200]!r}"
            )
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or len(jwks_uri) > 2048:
            raise FetchFailed(f"{url}: no usable jwks_uri")
        where = check_fetch_url(jwks_uri, allow_http_loopback=self.allow_http_loopback)
        allowed = {origin(self.issuer.issuer)} | {
            origin(f"https://{h}") for h in self.issuer.jwks_hosts
        }
        if where not in allowed:
            raise FetchFailed(f"{url}: jwks_uri {where!r} is neither the issuer's nor allowed")
        return jwks_uri

    def load(self) -> dict[str, Any]:
        now = self.monotonic()
        if self._jwks_uri is None or now - self._discovered_at >= self.issuer.jwks_refresh:
            self._jwks_uri = self.discover()
            self._discovered_at = now
        try:
            return fetch_json(self.http, self._jwks_uri, timeout=self.issuer.fetch_timeout)
        except FetchFailed:
            self._jwks_uri = None
            raise


def key_source_for(
    issuer: IssuerConfig,
    http: httpx.Client,
    *,
    allow_http_loopback: bool,
    monotonic: Callable[[], float] = time.monotonic,
) -> KeySource:
    """The key source an issuer's configuration asks for."""
    if issuer.jwks_file is not None:
        return FileKeySource(issuer.jwks_file)
    if issuer.jwks_uri is not None:
        check_fetch_url(issuer.jwks_uri, allow_http_loopback=allow_http_loopback)
        return UrlKeySource(http, issuer.jwks_uri, timeout=issuer.fetch_timeout)
    return DiscoveredKeySource(
        http, issuer, allow_http_loopback=allow_http_loopback, monotonic=monotonic
    )


class JwksCache:
    """One issuer's keys, cached and refreshed by the rules in the module docstring."""

    def __init__(
        self,
        issuer: IssuerConfig,
        source: KeySource,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.source = source
        self.monotonic = monotonic
        self._keys: KeySet | None = None
        self._lock = threading.Lock()
        self._attempts = 0
        self._last_failure_at: float | None = None
        self._last_error: str | None = None
        self._last_miss_refetch_at: float | None = None
        self._last_attempt_failed = False

    @property
    def fetch_attempts(self) -> int:
        """How many times the source was asked (for tests and metrics)."""
        return self._attempts

    def _usable(self, keys: KeySet | None) -> bool:
        return keys is not None and self.monotonic() - keys.fetched_at < self.issuer.jwks_max_stale

    def keys_for(self, kid: str | None, alg: str) -> list[VerificationKey]:
        """Keys that may verify a token with this ``kid`` and ``alg`` (possibly none).

        Raises :class:`IssuerUnavailable` when no usable keys can be had, or when the ``kid`` is
        unknown and the issuer could not be asked about it.
        """
        keys = self._keys
        if keys is None or self.monotonic() - keys.fetched_at >= self.issuer.jwks_refresh:
            # Stale but still usable keys: refresh only if nobody else is, never wait for it.
            self._refresh(wait=not self._usable(keys), miss=False)
            keys = self._keys
        if keys is None or not self._usable(keys):
            raise IssuerUnavailable(
                self.issuer.issuer,
                internal=f"no usable keys for {self.issuer.name}: {self._last_error}",
                retry_after=max(1, int(self.issuer.jwks_cooldown)),
            )
        found = keys.candidates(kid, alg)
        if found or kid is None or keys.has_kid(kid):
            return found
        self._refresh(wait=True, miss=True)
        keys = self._keys
        assert keys is not None  # a refresh never forgets keys
        found = keys.candidates(kid, alg)
        if not found and not keys.has_kid(kid) and self._last_attempt_failed:
            # We could not ask the issuer about this key: that is an outage, not a bad token.
            raise IssuerUnavailable(
                self.issuer.issuer,
                internal=f"unknown kid and {self.issuer.name} unreachable: {self._last_error}",
                retry_after=max(1, int(self.issuer.jwks_cooldown)),
            )
        return found

    def _refresh(self, *, wait: bool, miss: bool) -> None:
        seen = self._attempts
        # The wait is bounded: whoever holds the lock is inside one fetch with its own deadline.
        acquired = (
            self._lock.acquire(timeout=3 * self.issuer.fetch_timeout + 1)
            if wait
            else self._lock.acquire(blocking=False)
        )
        if not acquired:
            return
        try:
            if self._attempts != seen:
                return  # another request fetched while we waited: share its result
            now = self.monotonic()
            cooldown = self.issuer.jwks_cooldown
            if self._last_failure_at is not None and now - self._last_failure_at < cooldown:
                return
            if miss:
                if (
                    self._last_miss_refetch_at is not None
                    and now - self._last_miss_refetch_at < cooldown
                ):
                    return
                self._last_miss_refetch_at = now
            self._attempts += 1
            try:
                keys = parse_key_set(self.source.load(), self.monotonic())
            except FetchFailed as exc:
                self._last_failure_at = self.monotonic()
                self._last_error = str(exc)
                self._last_attempt_failed = True
                log.warning("keys of issuer %s could not be fetched: %s", self.issuer.name, exc)
                return
            self._keys = keys
            self._last_failure_at = None
            self._last_attempt_failed = False
            log.info("fetched %d keys of issuer %s", len(keys.keys), self.issuer.name)
        finally:
            self._lock.release()
