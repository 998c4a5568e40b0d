"""Rate limits and quotas on task requests, shared by every replica through the store.

Fixed windows: a window of ``per`` seconds starts at a multiple of ``per`` (UNIX time), and each
request adds one to the window's counter (an atomic upsert, so replicas agree). A request that
would go over any limit is refused with ``RateLimited`` (429) and ``Retry-After`` set to when the
fullest window ends. A long window (a day, a week) is a quota.

Three families of limits apply to ``POST /v1/tasks``:

- ``settings.rate_limits.per_principal``: per principal, over all scopes;
- a template's ``limits.principal``: per principal, for that scope;
- a template's ``limits.scope``: everyone together, for that scope.

A refused request does not count (its transaction rolls back), so a client that honours
``Retry-After`` is never locked out longer than the window.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from broker.domain.principal import Principal
from broker.domain.scope import RateWindow, ScopeTemplate
from broker.errors import RateLimited
from broker.services.common import Clock
from broker.store import Database, Tx, repo

#: Counters older than this are pruned (the longest window a template may declare).
RETENTION = 31 * 86_400
PRUNE_EVERY = 600.0


@dataclass(frozen=True, slots=True)
class Limit:
    """One window applied to one counter key."""

    key: str
    window: RateWindow
    label: str  # what the caller is told was exceeded


def _principal_key(principal: Principal) -> str:
    # Issuer URLs may be long; the key column is bounded, so identify the principal by a hash.
    digest = hashlib.sha256(f"{principal.issuer}\n{principal.subject}".encode()).hexdigest()[:32]
    return f"p:{digest}"


def limits_for(
    principal: Principal, template: ScopeTemplate, global_windows: Sequence[RateWindow]
) -> list[Limit]:
    """Every window that applies to ``principal`` requesting ``template``."""
    who = _principal_key(principal)
    out = [Limit(f"tasks:{who}:{w.per}", w, "your requests") for w in global_windows]
    out += [
        Limit(f"tasks:{who}:{template.name}:{w.per}", w, f"your requests for {template.name!r}")
        for w in template.limits.principal
    ]
    out += [
        Limit(f"tasks:scope:{template.name}:{w.per}", w, f"requests for {template.name!r}")
        for w in template.limits.scope
    ]
    return out


class RateLimiter:
    """Counts requests in fixed windows and refuses the one that goes over."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock
        self._pruned_at = 0.0

    def hit(self, conn: Tx, limits: Sequence[Limit], now: float) -> None:
        """Count one request against every limit in the caller's transaction, or raise 429."""
        refusal: RateLimited | None = None
        for limit in limits:
            start = math.floor(now / limit.window.per) * limit.window.per
            count = repo.hit_rate_counter(conn, limit.key, float(start))
            if count > limit.window.requests:
                retry = math.ceil(start + limit.window.per - now)
                if refusal is None or retry > refusal.retry_after:
                    refusal = RateLimited(
                        f"too many requests: {limit.label} are limited to "
                        f"{limit.window.requests} per {limit.window.per} s",
                        code="rate_limited",
                        retry_after=retry,
                    )
        if refusal is not None:
            raise refusal
        if now - self._pruned_at > PRUNE_EVERY:
            self._pruned_at = now
            repo.prune_rate_counters(conn, now - RETENTION)
