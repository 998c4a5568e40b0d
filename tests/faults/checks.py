"""The checks every fault test ends with: every event exported once, the chain verified, clear errors."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import httpx

from broker.store import Database, repo
from tests.replicas.cluster import Agent, wait_until
from tests.support.otlp import OtlpReceiver


def all_exported(
    store: Database, otlp: OtlpReceiver, *, timeout: float = 30.0, duplicates_up_to: int = 0
) -> int:
    """Wait until the outbox is empty, then check every stored event crossed the wire exactly
    once (span ids counted at both ends); the number of events. ``duplicates_up_to``: how many
    spans may have been sent again (a batch in flight when the store itself went away: the
    collector took it, the store could not record that; the same span ids are sent again)."""

    def drained() -> bool:
        with store.read() as conn:
            return repo.count_unexported(conn) == 0

    deadline = time.monotonic() + timeout
    while True:
        wait_until(drained, timeout=timeout, what="the audit outbox to drain")
        # The wire first, then the store: every span on the wire was stored before it was sent,
        # so a span exported between the two reads is in both (the other order would miss it).
        wire = Counter(s.span_id for s in list(otlp.spans))
        with store.read() as conn:
            rows = repo.audit_events(conn, limit=1_000_000)
        stored = [e["span_id"] for e in rows]
        missing = set(stored) - set(wire)
        # Background work (checkpoints, the reaper) may append after the drain: such events are
        # not exported yet, so wait for them; an event marked exported but absent is a loss.
        pending = {e["span_id"] for e in rows if not e["exported"]}
        if missing and missing <= pending and time.monotonic() < deadline:
            continue
        break
    assert not missing, f"{len(missing)} stored events never reached the collector"
    assert set(wire) <= set(stored), "the collector got spans the store does not have"
    duplicates = {k: v for k, v in wire.items() if v > 1}
    assert len(duplicates) <= duplicates_up_to, f"spans sent twice: {duplicates}"
    return len(stored)


def chain_verifies(client: httpx.Client, auditor: Agent) -> dict[str, Any]:
    """The hash chain and its checkpoints verify (from this replica)."""
    resp = client.get("/v1/audit/verify", headers=auditor.auth)
    assert resp.status_code == 200, resp.text
    report: dict[str, Any] = resp.json()
    assert report["ok"] is True, report
    return report


def problem(resp: httpx.Response, status: int, *codes: str) -> dict[str, Any]:
    """``resp`` is a problem document with ``status`` and one of ``codes``."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body: dict[str, Any] = resp.json()
    assert body["code"] in codes, body
    return body
