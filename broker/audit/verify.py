"""Verify the audit chain and its signed checkpoints; say what was changed and where.

The walk is streaming (pages of events in sequence order), so memory stays bounded whatever the
size of the store. Each finding names the sequence number and event id where the chain breaks and
what most likely happened:

* **edited**: an event's content no longer matches its own hash;
* **deleted**: an event's ``prev_hash`` names an event that no longer exists;
* **inserted**: an event's ``prev_hash`` names an earlier event, so the events in between were
  inserted into the chain;
* **reordered**: an event's ``prev_hash`` names a later event;
* **rewritten**: the chain is consistent but no longer passes through a signed checkpoint (someone
  recomputed the hashes); **truncated**: a signed checkpoint names events that are gone.

Sequence numbers may have gaps without any tampering (a transaction that rolled back after taking a
number); only the hash links are evidence.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.audit.checkpoints import CheckpointVerifier
from broker.domain.audit import (
    GENESIS_HASH,
    EventName,
    checkpoint_statement,
    row_hash,
)
from broker.store import Database, repo

PAGE = 1000


@dataclass(frozen=True, slots=True)
class Finding:
    """One place where the chain is not what was recorded."""

    kind: str
    message: str
    seq: int | None = None
    event_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seq": self.seq,
            "event_id": self.event_id,
            "message": self.message,
        }


@dataclass
class Report:
    """The outcome of one verification."""

    events: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None
    checkpoints: int = 0
    last_checkpoint_seq: int | None = None
    unsigned_tail: int = 0
    findings: list[Finding] = field(default_factory=list)
    #: Stop collecting after this many findings (a wholesale rewrite would list every event).
    max_findings: int = 100

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, kind: str, message: str, row: Mapping[str, Any] | None = None) -> None:
        if len(self.findings) < self.max_findings:
            self.findings.append(
                Finding(
                    kind,
                    message,
                    seq=int(row["seq"]) if row is not None else None,
                    event_id=str(row["id"]) if row is not None else None,
                )
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
            "checkpoints": self.checkpoints,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "unsigned_tail": self.unsigned_tail,
            "findings": [f.as_dict() for f in self.findings],
        }


Lookup = Callable[[str], list[int]]


class ChainWalker:
    """Checks events one at a time, in sequence order, against their own hash and their link."""

    def __init__(self, report: Report, lookup: Lookup, *, check_links: bool = True) -> None:
        self.report = report
        self.lookup = lookup
        self.check_links = check_links
        self.prev: Mapping[str, Any] | None = None
        self.checkpoint_events: dict[int, Mapping[str, Any]] = {}

    def feed(self, row: Mapping[str, Any]) -> None:
        report = self.report
        seq = int(row["seq"])
        report.events += 1
        if report.first_seq is None:
            report.first_seq = seq
        if row_hash(dict(row)) != row["hash"]:
            report.add(
                "edited",
                f"the event at seq {seq} was edited: its content no longer matches its hash",
                row,
            )
        if self.check_links:
            expected = str(self.prev["hash"]) if self.prev is not None else GENESIS_HASH
            if row["prev_hash"] != expected:
                self._explain_link(row, seq)
        if row["name"] == EventName.AUDIT_CHECKPOINT:
            self.checkpoint_events[
                int((row.get("attributes") or {}).get("broker.audit.checkpoint.seq", -1))
            ] = row
        self.prev = row
        report.last_seq = seq
        report.last_hash = str(row["hash"])

    def _explain_link(self, row: Mapping[str, Any], seq: int) -> None:
        prev_seq = int(self.prev["seq"]) if self.prev is not None else None
        where = (
            f"between seq {prev_seq} and seq {seq}" if prev_seq is not None else f"before seq {seq}"
        )
        if row["prev_hash"] == GENESIS_HASH:
            self.report.add(
                "inserted",
                f"the event at seq {seq} claims to start the chain, but events precede it: "
                "it or they were inserted",
                row,
            )
            return
        found = [s for s in self.lookup(str(row["prev_hash"])) if s != seq]
        if found and prev_seq is not None and max(found) < prev_seq:
            first = max(found)
            self.report.add(
                "inserted",
                f"the chain skips from seq {first} to seq {seq}: the event(s) after seq {first} "
                f"up to seq {prev_seq} were inserted",
                row,
            )
        elif found and min(found) > seq:
            self.report.add(
                "reordered",
                f"the event at seq {seq} follows seq {min(found)} in the chain: events were "
                "reordered",
                row,
            )
        elif prev_seq is not None and seq - prev_seq > 1:
            self.report.add(
                "deleted",
                f"event(s) {where} were deleted: seq {seq} links to an event that no longer exists",
                row,
            )
        else:
            self.report.add(
                "deleted",
                f"the chain is broken {where}: seq {seq} links to an event that no longer exists "
                f"(deleted, or the event at seq {prev_seq} was replaced and its hash recomputed)",
                row,
            )


def check_checkpoint(
    report: Report,
    checkpoint: Mapping[str, Any],
    keys: CheckpointVerifier,
    event_at: Callable[[int], Mapping[str, Any] | None],
) -> None:
    """A checkpoint's signature, and that the chain still passes through the head it signed."""
    try:
        seq = int(checkpoint["seq"])
        statement = checkpoint_statement(
            seq, str(checkpoint["hash"]), float(checkpoint["created_at"])
        )
        valid = keys.verify(str(checkpoint["key_id"]), statement, str(checkpoint["signature"]))
    except (KeyError, TypeError, ValueError):
        report.add("bad_checkpoint", "a checkpoint is malformed")
        return
    if not valid:
        report.add(
            "bad_checkpoint",
            f"the checkpoint at seq {seq} does not verify: its signature is wrong or was made "
            f"by key {checkpoint['key_id']!r}, which is not trusted",
        )
        return
    report.checkpoints += 1
    report.last_checkpoint_seq = max(report.last_checkpoint_seq or 0, seq)
    event = event_at(seq)
    if event is None:
        report.add(
            "truncated",
            f"the signed checkpoint at seq {seq} names an event that no longer exists: "
            f"events up to seq {seq} were deleted",
        )
    elif event["hash"] != checkpoint["hash"]:
        report.add(
            "rewritten",
            f"the chain no longer passes through the head signed at seq {seq}: events up to "
            f"seq {seq} were changed and their hashes recomputed",
            event,
        )


def _checkpoint_from_event(row: Mapping[str, Any]) -> dict[str, Any]:
    attrs = row.get("attributes") or {}
    return {
        "seq": attrs.get("broker.audit.checkpoint.seq"),
        "hash": attrs.get("broker.audit.checkpoint.hash"),
        "created_at": attrs.get("broker.audit.checkpoint.created_at"),
        "key_id": attrs.get("broker.audit.checkpoint.key_id"),
        "signature": attrs.get("broker.audit.checkpoint.signature"),
    }


def verify_store(
    db: Database,
    keys: CheckpointVerifier,
    *,
    anchors: Iterable[tuple[int, str]] = (),
    max_findings: int = 100,
) -> Report:
    """Verify every event, every checkpoint and the head of the store's chain."""
    report = Report(max_findings=max_findings)

    def lookup(digest: str) -> list[int]:
        with db.read() as conn:
            return repo.audit_seqs_with_hash(conn, digest)

    def event_at(seq: int) -> dict[str, Any] | None:
        with db.read() as conn:
            return repo.audit_event_at(conn, seq)

    walker = ChainWalker(report, lookup)
    after = 0
    while True:
        with db.read() as conn:
            page = repo.audit_events(conn, after_seq=after, limit=PAGE)
        for row in page:
            walker.feed(row)
        if len(page) < PAGE:
            break
        after = int(page[-1]["seq"])

    head_seq, head_hash, checkpoints = _head_after_catching_up(db, walker, report)
    if report.events and (head_seq, head_hash) != (report.last_seq, report.last_hash):
        report.add(
            "truncated",
            f"the chain's head names seq {head_seq}, but the last event is seq {report.last_seq}: "
            "events at the end were deleted or the head was moved",
        )
    elif not report.events and head_seq != 0:
        report.add("truncated", f"the chain's head names seq {head_seq}, but no event exists")

    rows_by_seq = {int(c["seq"]): c for c in checkpoints}
    for seq, event in walker.checkpoint_events.items():
        if seq not in rows_by_seq:
            report.add(
                "checkpoint_missing",
                f"the checkpoint of seq {seq} recorded in the chain is missing from the "
                "checkpoint table",
                event,
            )
            check_checkpoint(report, _checkpoint_from_event(event), keys, event_at)
    for checkpoint in checkpoints:
        check_checkpoint(report, checkpoint, keys, event_at)
    for seq, digest in anchors:
        anchored = event_at(seq)
        if anchored is None or anchored["hash"] != digest:
            report.add(
                "rewritten",
                f"the event at seq {seq} does not have the hash you expected ({digest[:12]}...)",
                anchored,
            )
    if report.last_seq is not None:
        report.unsigned_tail = report.last_seq - (report.last_checkpoint_seq or 0)
    return report


def _head_after_catching_up(
    db: Database, walker: ChainWalker, report: Report
) -> tuple[int, str, list[dict[str, Any]]]:
    """The chain's head and the checkpoints, once every event up to that head is read.

    Replicas keep appending while the chain is read (background summaries, checkpoints): a
    head beyond the last event read means more events to read, unless re-reading finds none.
    """
    for _ in range(100):
        with db.read() as conn:
            head_seq, head_hash = repo.audit_head(conn)
            checkpoints = repo.audit_checkpoints(conn, limit=1_000_000)
        if report.last_seq is None or head_seq <= report.last_seq:
            break
        with db.read() as conn:
            page = repo.audit_events(conn, after_seq=report.last_seq, limit=PAGE)
        if not page:
            break
        for row in page:
            walker.feed(row)
    return head_seq, head_hash, checkpoints


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Events of a ``broker audit export`` file, one JSON object per line."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def verify_export(
    path: Path,
    keys: CheckpointVerifier,
    *,
    partial: bool = False,
    max_findings: int = 100,
) -> Report:
    """Verify an exported JSONL file offline: every event's hash, the links (unless ``partial``:
    a filtered export has gaps by design) and the signature of every checkpoint event in it."""
    report = Report(max_findings=max_findings)
    by_hash: dict[str, int] = {}
    by_seq: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(path):
        by_hash[str(row["hash"])] = int(row["seq"])
        by_seq[int(row["seq"])] = {"seq": row["seq"], "id": row["id"], "hash": row["hash"]}

    def lookup(digest: str) -> list[int]:
        return [by_hash[digest]] if digest in by_hash else []

    walker = ChainWalker(report, lookup, check_links=not partial)
    for row in read_jsonl(path):
        walker.feed(row)
    for seq, event in walker.checkpoint_events.items():
        if partial and seq not in by_seq:
            # A filtered export may leave out the event a checkpoint signed: check the
            # signature alone.
            by_seq[seq] = {"seq": seq, "hash": _checkpoint_from_event(event)["hash"]}
        check_checkpoint(report, _checkpoint_from_event(event), keys, by_seq.get)
    if report.last_seq is not None:
        report.unsigned_tail = report.last_seq - (report.last_checkpoint_seq or 0)
    return report
