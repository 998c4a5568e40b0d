"""What minting taught this replica about each scope's backend setup.

When a mint fails because a scope is misconfigured at its backend (a policy OpenBao does not have,
a token role that does not allow it, a missing database or IAM role), the agent is told only that
the scope is misconfigured; the cause is for the admin. It is logged, and kept here until a later
mint of the same scope succeeds, so ``/readyz`` can show it beside the backends' health (without
failing readiness: one bad scope must not take a replica out of its load balancer).

Each replica knows what it saw itself; ``broker scopes check --live`` asks the backends directly.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScopeProblem:
    """The last misconfiguration seen for one scope."""

    cause: str
    since: float
    last_seen: float
    failures: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "misconfigured",
            "cause": self.cause,
            "since": self.since,
            "last_seen": self.last_seen,
            "failures": self.failures,
        }


class ScopeHealth:
    """Misconfigured scopes as this replica last saw them (thread-safe, in memory)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._problems: dict[str, ScopeProblem] = {}

    def misconfigured(self, scope: str, cause: str, now: float) -> None:
        """Remember (and log, for the admin) why a mint of ``scope`` could not succeed."""
        with self._lock:
            earlier = self._problems.get(scope)
            self._problems[scope] = ScopeProblem(
                cause=cause,
                since=earlier.since if earlier and earlier.cause == cause else now,
                last_seen=now,
                failures=(earlier.failures if earlier else 0) + 1,
            )
        log.warning(
            "scope %s is misconfigured: %s (see `broker scopes check --live`)", scope, cause
        )

    def healthy(self, scope: str) -> None:
        """A mint of ``scope`` succeeded: whatever was wrong has been fixed."""
        with self._lock:
            if self._problems.pop(scope, None) is not None:
                log.info("scope %s mints again", scope)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: p.as_dict() for name, p in sorted(self._problems.items())}
