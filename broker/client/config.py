"""Where the broker is and how to reach it, from the environment; the CLI's session cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from broker.client.errors import ConfigurationError
from broker.client.models import Session
from broker.client.tokens import IdTokenSource, cache_hint, unverified_identity

_TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_broker_url(url: str, *, allow_insecure: bool = False) -> str:
    """The broker's base URL without a trailing slash; plain http only to this machine.

    The client sends ID tokens and receives secrets: over plain http to another host both could
    be read on the way, so that takes an explicit ``BROKER_INSECURE_HTTP=1``.
    """
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"BROKER_URL must be an http(s) URL, not {url!r}",
            next_step="set BROKER_URL to the broker's address, e.g. https://broker.example.com",
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigurationError("BROKER_URL must not carry a query, fragment or user info")
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS and not allow_insecure:
        raise ConfigurationError(
            f"refusing plain http to {parts.hostname}: ID tokens and credentials would travel unencrypted",
            next_step="use https, or set BROKER_INSECURE_HTTP=1 on a network you trust",
        )
    return url


def new_traceparent(trace_id: str | None = None) -> str:
    """A fresh W3C ``traceparent`` (sampled)."""
    return f"00-{trace_id or secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Everything the client needs besides the ID token source."""

    broker_url: str
    audience: str = "broker"
    timeout: float = 30.0
    #: A session token handed to this process (``BROKER_SESSION_TOKEN``); skips the exchange.
    session_token: str | None = None
    #: The agent's W3C trace context (``TRACEPARENT``): the broker's spans join the agent's trace.
    traceparent: str | None = None
    #: The agent's conversation id, recorded on tasks (``BROKER_CONVERSATION_ID``).
    conversation_id: str | None = None

    def __repr__(self) -> str:  # the session token stays out of reprs and logs
        return f"ClientConfig(broker_url={self.broker_url!r}, audience={self.audience!r})"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, broker_url: str | None = None
    ) -> ClientConfig:
        """Read ``BROKER_URL``, ``BROKER_AUDIENCE``, ``BROKER_TIMEOUT``, ``BROKER_SESSION_TOKEN``,
        ``TRACEPARENT``, ``BROKER_CONVERSATION_ID`` and ``BROKER_INSECURE_HTTP``."""
        env = os.environ if environ is None else environ
        url = broker_url or env.get("BROKER_URL")
        if not url:
            raise ConfigurationError(
                "BROKER_URL is not set",
                next_step="export BROKER_URL=https://your-broker (with `broker dev`: http://127.0.0.1:8080)",
            )
        insecure = env.get("BROKER_INSECURE_HTTP", "").lower() in ("1", "true", "yes")
        try:
            timeout = float(env.get("BROKER_TIMEOUT") or 30.0)
        except ValueError:
            raise ConfigurationError("BROKER_TIMEOUT must be a number of seconds") from None
        traceparent = (env.get("TRACEPARENT") or "").strip().lower() or None
        if traceparent and not _TRACEPARENT.match(traceparent):
            traceparent = None  # an invalid traceparent is ignored, as W3C says
        return cls(
            broker_url=check_broker_url(url, allow_insecure=insecure),
            audience=env.get("BROKER_AUDIENCE") or "broker",
            timeout=timeout,
            session_token=env.get("BROKER_SESSION_TOKEN") or None,
            traceparent=traceparent,
            conversation_id=env.get("BROKER_CONVERSATION_ID") or None,
        )


def default_cache_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("BROKER_SESSION_CACHE"):
        return Path(env["BROKER_SESSION_CACHE"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "broker" / "sessions.json"


def cache_key(broker_url: str, identity: tuple[str, ...]) -> str:
    """The cache entry of one identity (or one token source) at one broker: agents sharing a
    home never share a session. Only a hash of ``identity`` is kept in the key."""
    digest = hashlib.sha256("\n".join((broker_url, *identity)).encode()).hexdigest()[:32]
    return f"{broker_url}#{digest}"


def session_cache_key(broker_url: str, source: IdTokenSource, id_token: str | None) -> str | None:
    """The cache key of ``source``'s session at ``broker_url``.

    From the source's own hint when it has one (a command, GitHub Actions: no token needed, so a
    cached session is found without running anything); otherwise from the issuer and subject in
    ``id_token`` (None when no token is given: the caller fetches one and asks again).
    """
    hint = cache_hint(source)
    if hint is not None:
        return cache_key(broker_url, ("source", *hint))
    if id_token is None:
        return None
    identity = unverified_identity(id_token)
    return cache_key(broker_url, identity) if identity else None


class SessionCache:
    """Short-lived session tokens on disk for the CLI (``broker login``), one per broker and
    identity (:func:`session_cache_key`: the token source for a command or GitHub Actions, else
    the ID token's issuer and subject).

    The file is created ``0600`` inside a ``0700`` folder; expired entries are dropped on write.
    The SDK keeps its session in memory and uses no cache unless given one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def load(self, key: str, now: float | None = None) -> Session | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict):
            return None
        token, expires = entry.get("token"), entry.get("expires_at")
        if not isinstance(token, str) or not isinstance(expires, (int, float)):
            return None
        session = Session(token=token, expires_at=float(expires))
        return session if session.usable(now if now is not None else time.time()) else None

    def save(self, key: str, session: Session, identity: tuple[str, str] | None = None) -> None:
        """Keep ``session`` under ``key``; ``identity`` (issuer, subject) is remembered beside it
        so a session found by its token source still says whose it is."""
        now = time.time()
        data = {
            name: entry
            for name, entry in self._read().items()
            if isinstance(entry, dict)
            and isinstance(entry.get("expires_at"), (int, float))
            and float(entry["expires_at"]) > now  # type: ignore[arg-type]
        }
        entry: dict[str, object] = {"token": session.token, "expires_at": session.expires_at}
        if identity is not None:
            entry["identity"] = list(identity)
        data[key] = entry
        self._write(data)

    def identity(self, key: str) -> tuple[str, str] | None:
        """The (issuer, subject) remembered with a cached session, if any."""
        entry = self._read().get(key)
        value = entry.get("identity") if isinstance(entry, dict) else None
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            return (value[0], value[1])
        return None

    def forget(self, key: str) -> None:
        data = self._read()
        if data.pop(key, None) is not None:
            self._write(data)

    def _write(self, data: dict[str, dict[str, object]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            tmp.replace(self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
