"""Failed authentication: throttled per client address and per issuer, audited as summaries.

A refused token exchange or session token costs the broker a row in the audit chain, and every
append to the chain takes the chain's one lock; a client sending bad tokens as fast as it can
would turn that lock into everyone's bottleneck and the audit log into noise. So:

- **Throttling.** Every failure the client caused (not an outage on the broker's side) counts in
  fixed windows of ``auth_limits.window`` seconds against the client's address and, when the
  token named a configured issuer, against that issuer, in the store's shared rate counters
  (one atomic upsert, so replicas agree). An address that has caused ``per_address`` failures
  is refused with 429 until the window ends, before any of its tokens is looked at. An issuer
  with ``per_issuer`` failures marks every address that fails against it for the rest of the
  window,
  and leaves addresses without failures alone: a flood of forged tokens naming an issuer cannot
  lock out that issuer's healthy agents. A replica remembers a block in memory and learns of a
  block another replica imposed at that address's next failure (the shared count says so), so a
  blocked address gets at most one more failure per replica.
- **Summaries.** The first refusal of each (address, reason) in a window is audited in full at
  once (exactly one replica wins the right to, through the store). The rest are counted (in the
  store for counted failures, in memory for refusals of blocked addresses, written every
  ``flush_interval`` seconds) and, shortly after the window ends, become one
  ``broker.auth.failure_summary`` event per (address, reason) with the count, written by
  whichever replica claims it first (the claim removes the counter, so each is written once).

Successful sessions are never summarised: each is its own ``broker.session.start`` event.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import replace

from broker.domain.audit import AuditEvent, EventName, Outcome, new_trace_id
from broker.errors import BrokerError, RateLimited
from broker.periodic import Periodic
from broker.services.common import Clock, record
from broker.settings import AuthLimitSettings
from broker.store import Database, Tx, repo

log = logging.getLogger(__name__)

SUMMARY_PREFIX = "authsum:"
_FAILURE_PREFIX = "authfail:"
#: Most (address, reason) windows one replica tracks in memory; past it, it asks the store each
#: time (slower, never wrong), so a flood from very many addresses cannot grow memory unbounded.
MAX_TRACKED = 50_000


def client_key(address: str | None, ipv6_prefix: int) -> str | None:
    """The name a client address is counted under: IPv4 as is, IPv6 by its ``/ipv6_prefix``."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]  # not an IP (a test client, a unix socket): counted by its name
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{ipv6_prefix}", strict=False))
    return str(ip)


def _issuer_key(issuer: str) -> str:
    return hashlib.sha256(issuer.encode()).hexdigest()[:32]


class AuthGuard:
    """Throttles failed authentication and turns floods of refusals into summaries."""

    def __init__(self, limits: AuthLimitSettings, db: Database, clock: Clock) -> None:
        self.limits = limits
        self.db = db
        self.clock = clock
        self._lock = threading.Lock()
        self._blocked: dict[str, float] = {}  # client key -> end of its blocked window
        self._flooded: dict[str, float] = {}  # issuer -> end of the window it is flooded in
        self._opened: set[tuple[str, float]] = set()  # summary counters that exist in the store
        self._pending: dict[tuple[str, float], int] = {}  # counted here, not yet in the store
        self._loop = Periodic("auth-summaries", limits.flush_interval, self.flush)

    # --- windows ----------------------------------------------------------------------------

    def _window(self, now: float) -> float:
        width = self.limits.window
        return float(math.floor(now / width) * width)

    def key(self, address: str | None) -> str | None:
        """The counted name of a client address (see :func:`client_key`)."""
        return client_key(address, self.limits.ipv6_prefix)

    # --- admission --------------------------------------------------------------------------

    def admit(self, address: str | None, event: Callable[[BrokerError], AuditEvent]) -> None:
        """Refuse (429) an address blocked in this window, before any of its tokens is read.

        ``event`` builds the refusal's audit event from the error, should it be the window's
        first of its kind from this address.
        """
        source = self.key(address)
        if source is None:
            return
        now = self.clock()
        with self._lock:
            until = self._blocked.get(source)
        if until is None or until <= now:
            return
        error = RateLimited(
            "too many failed authentication attempts from this address; try again later",
            code="too_many_failures",
            retry_after=max(1, math.ceil(until - now)),
        )
        self.refused(address, "rate_limited", None, event(error), counts=False)
        raise error

    # --- refusals ---------------------------------------------------------------------------

    def refused(
        self,
        address: str | None,
        reason: str,
        issuer: str | None,
        event: AuditEvent,
        *,
        counts: bool = True,
    ) -> bool:
        """Account for one refusal of ``address``: count it against the limits when ``counts``
        (the client's fault), and audit ``event`` now if it is the window's first of ``reason``
        from this address, else count it into the window's summary. True when ``event`` was
        written in full."""
        source = self.key(address) or "unknown"
        now = self.clock()
        start = self._window(now)
        until = start + self.limits.window
        summary = (f"{SUMMARY_PREFIX}{self.limits.window}:{reason}:{source}", start)
        with self._lock:
            opened = summary in self._opened
            if opened and not counts:
                self._pending[summary] = self._pending.get(summary, 0) + 1
                return False
        try:
            with self.db.write() as conn:
                by_address, by_issuer = (
                    self._count_failure(conn, source, issuer, start) if counts else (0, 0)
                )
                first = not opened and repo.open_rate_counter(conn, *summary)
                if first:
                    record(conn, self._marked(event, source, start))
                else:
                    repo.hit_rate_counter(conn, *summary)
        except BrokerError:
            # The refusal stands either way; failing to record it must not turn it into a 5xx.
            log.exception("could not account for an authentication refusal")
            return False
        with self._lock:
            if len(self._opened) < MAX_TRACKED:
                self._opened.add(summary)
            if by_address >= self.limits.per_address:
                self._blocked[source] = until
            if issuer is not None:
                if by_issuer >= self.limits.per_issuer:
                    self._flooded[issuer] = until
                if self._flooded.get(issuer, 0.0) > now:
                    self._blocked[source] = until
        return first

    def _count_failure(
        self, conn: Tx, source: str, issuer: str | None, start: float
    ) -> tuple[int, int]:
        width = self.limits.window
        by_address = repo.hit_rate_counter(conn, f"{_FAILURE_PREFIX}a:{width}:{source}", start)
        by_issuer = 0
        if issuer is not None:
            key = f"{_FAILURE_PREFIX}i:{width}:{_issuer_key(issuer)}"
            by_issuer = repo.hit_rate_counter(conn, key, start)
        return by_address, by_issuer

    def _marked(self, event: AuditEvent, source: str, start: float) -> AuditEvent:
        """The full event of a window's first refusal, saying where and which window."""
        return replace(
            event,
            attributes={
                **event.attributes,
                "broker.auth.source": source,
                "broker.auth.window_start": start,
                "broker.auth.window_end": start + self.limits.window,
            },
        )

    # --- summaries --------------------------------------------------------------------------

    def flush(self) -> int:
        """Write counts kept in memory, then summarise windows every replica is done with.

        Returns how many summary events were written.
        """
        now = self.clock()
        with self._lock:
            pending, self._pending = self._pending, {}
            current = self._window(now)
            self._opened = {k for k in self._opened if k[1] >= current}
            self._blocked = {k: u for k, u in self._blocked.items() if u > now}
            self._flooded = {k: u for k, u in self._flooded.items() if u > now}
        if pending:
            try:
                with self.db.write() as conn:
                    for (key, start), count in pending.items():
                        repo.hit_rate_counter(conn, key, start, count)
            except BrokerError:
                with self._lock:  # keep them for the next pass
                    for item, count in pending.items():
                        self._pending[item] = self._pending.get(item, 0) + count
                raise
        # Every live replica has flushed a window two flush intervals after it ended.
        ended_before = self._window(now - 2 * self.limits.flush_interval - 1)
        with self.db.write() as conn:
            repo.take_rate_counters(conn, _FAILURE_PREFIX, ended_before)
            rows = repo.take_rate_counters(conn, SUMMARY_PREFIX, ended_before)
            written = 0
            for row in rows:
                if row["count"] > 0:
                    event = self._summary(row["key"], row["window_start"], row["count"])
                    record(conn, event)
                    written += 1
                    log.warning(
                        "%d more authentication refusals (%s) from %s in the window of %d s",
                        row["count"],
                        event.attributes["broker.auth.reason"],
                        event.attributes["broker.auth.source"],
                        self.limits.window,
                    )
        return written

    def _summary(self, key: str, start: float, count: int) -> AuditEvent:
        width, reason, source = key.removeprefix(SUMMARY_PREFIX).split(":", 2)
        return AuditEvent(
            name=EventName.AUTH_FAILURE_SUMMARY,
            outcome=Outcome.DENIED,
            time=self.clock(),
            trace_id=new_trace_id(),
            attributes={
                "broker.auth.source": source,
                "broker.auth.reason": reason,
                "broker.auth.count": int(count),
                "broker.auth.window_start": start,
                "broker.auth.window_end": start + float(width),
            },
        )

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
        try:
            self.flush()
        except BrokerError:
            log.exception("could not write the last authentication refusal counts")
