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
from collections.abc import Callable, Iterable, Mapping
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
    #: The event's name and time, so a person can find it without the id.
    name: str | None = None
    time: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seq": self.seq,
            "event_id": self.event_id,
            "name": self.name,
            "time": self.time,
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
    #: For a file: what kind of export it is and what could be checked in it.
    export: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, kind: str, message: str, row: Mapping[str, Any] | None = None) -> None:
        if len(self.findings) < self.max_findings:
            self.findings.append(
                Finding(
                    kind,
                    message,
                    seq=int(row["seq"]) if row is not None and "seq" in row else None,
                    event_id=str(row["id"]) if row is not None and "id" in row else None,
                    name=str(row["name"]) if row is not None and "name" in row else None,
                    time=_float(row.get("time")) if row is not None else None,
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
            **({"export": self.export} if self.export is not None else {}),
        }


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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


# --- exports ---------------------------------------------------------------------------------
#
# An export (``broker audit export``) is JSON Lines: a header, the events in chain order, a trailer.
#
#   {"broker_audit_export": 1, "created_at": ..., "source": ..., "filter": {...}, "keys": {JWK Set}}
#   {event} ...
#   {"broker_audit_export_end": 1, "events": N, "last_seq": ..., "last_hash": ...}
#
# The header says what was asked for (an empty filter: the whole chain from its start) and carries
# the public keys the broker ever signed checkpoints with, so the file verifies on its own. The
# trailer lets a verifier notice lines cut off the end. Files without a header (older exports)
# are still read: one starting at the chain's genesis is taken as complete, any other as filtered.

EXPORT_FORMAT = 1
HEADER_KEY = "broker_audit_export"
TRAILER_KEY = "broker_audit_export_end"


def export_header(
    *, source: str, filters: Mapping[str, Any], keys: Mapping[str, Any], created_at: float
) -> dict[str, Any]:
    """The first line of an export: where it came from, what it holds, the keys to check it."""
    return {
        HEADER_KEY: EXPORT_FORMAT,
        "created_at": created_at,
        "source": source,
        "filter": {k: v for k, v in filters.items() if v is not None},
        "keys": dict(keys),
    }


def export_trailer(events: int, last: Mapping[str, Any] | None) -> dict[str, Any]:
    """The last line of an export: how many events it holds and the last one's hash."""
    return {
        TRAILER_KEY: EXPORT_FORMAT,
        "events": events,
        "last_seq": int(last["seq"]) if last is not None else None,
        "last_hash": str(last["hash"]) if last is not None else None,
    }


@dataclass
class ExportFile:
    """An export as read from disk."""

    header: dict[str, Any] | None
    events: list[dict[str, Any]]
    trailer: dict[str, Any] | None
    #: Lines that are not JSON objects (their line numbers).
    unreadable: list[int] = field(default_factory=list)

    @property
    def filtered(self) -> bool:
        """Whether the file holds only some events of the chain (by its header, or, for a file
        without one, because it does not start at the chain's genesis)."""
        if self.header is not None:
            return bool(self.header.get("filter"))
        return not self.events or self.events[0].get("prev_hash") != GENESIS_HASH


def read_export(path: Path) -> ExportFile:
    """Read an export file; lines are classified, never trusted."""
    header: dict[str, Any] | None = None
    trailer: dict[str, Any] | None = None
    events: list[dict[str, Any]] = []
    unreadable: list[int] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                unreadable.append(number)
                continue
            if not isinstance(item, dict):
                unreadable.append(number)
            elif HEADER_KEY in item and header is None and not events:
                header = item
            elif TRAILER_KEY in item:
                trailer = item
            elif {"seq", "id", "hash", "prev_hash"} <= item.keys():
                events.append(item)
            else:
                unreadable.append(number)
    return ExportFile(header, events, trailer, unreadable)


def keys_in(export: ExportFile) -> CheckpointVerifier:
    """The public keys an export carries (a JWK Set in its header)."""
    from broker.audit.checkpoints import PublicKeys

    keys = PublicKeys()
    body = (export.header or {}).get("keys")
    if isinstance(body, dict):
        keys.add_jwk_set(body)
    return keys


class AdjacentLinks:
    """Checks links only between events adjacent in sequence (a filtered export has gaps)."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.prev: Mapping[str, Any] | None = None
        self.checked = 0
        self.skipped = 0

    def feed(self, row: Mapping[str, Any]) -> None:
        prev, self.prev = self.prev, row
        if prev is None:
            return
        if int(row["seq"]) != int(prev["seq"]) + 1:
            self.skipped += 1
            return
        self.checked += 1
        if row["prev_hash"] != prev["hash"]:
            self.report.add(
                "edited",
                f"the event at seq {prev['seq']} ({prev['name']}) is not the one the event at "
                f"seq {row['seq']} follows in the chain: it was edited and its hash recomputed, "
                "or replaced",
                prev,
            )


def verify_export(
    path: Path,
    keys: CheckpointVerifier | None = None,
    *,
    partial: bool | None = None,
    max_findings: int = 100,
) -> Report:
    """Verify an exported file offline: everything that can be verified in it.

    Every event against its own hash; for a complete export every link from the chain's genesis,
    for a filtered one (recognised by its header) the links between events adjacent in sequence;
    every checkpoint event's signature, and that the chain passes through the head it signed
    where that event is in the file; the trailer's count and last hash. ``keys`` are the trusted
    public keys; without them, the keys the file carries are used (and the report says so).
    ``partial`` overrides what the file says about itself.
    """
    export = read_export(path)
    report = Report(max_findings=max_findings)
    filtered = export.filtered if partial is None else partial
    report.export = {
        "kind": "filtered" if filtered else "complete",
        "filter": (export.header or {}).get("filter") if export.header else None,
        "header": export.header is not None,
        "source": (export.header or {}).get("source"),
        "created_at": (export.header or {}).get("created_at"),
        "keys": "given" if keys is not None else "carried by the file",
    }
    if keys is None:
        keys = keys_in(export)
    for number in export.unreadable:
        report.add("unreadable", f"line {number} of the file is not an audit event")
    by_seq = {int(e["seq"]): e for e in export.events}
    hashes = {str(e["hash"]): int(e["seq"]) for e in export.events}

    def lookup(digest: str) -> list[int]:
        return [hashes[digest]] if digest in hashes else []

    walker = ChainWalker(report, lookup, check_links=not filtered)
    adjacent = AdjacentLinks(report)
    for row in export.events:
        walker.feed(row)
        if filtered:
            adjacent.feed(row)
    report.export["links_checked"] = adjacent.checked if filtered else len(export.events)
    report.export["links_unchecked"] = adjacent.skipped if filtered else 0
    report.export["checkpoints_beyond_file"] = 0
    for seq, event in walker.checkpoint_events.items():
        if seq not in by_seq and filtered:
            # The head it signed is not in the file: its signature is all there is to check.
            report.export["checkpoints_beyond_file"] += 1
            signed = _checkpoint_from_event(event)
            check_checkpoint(report, signed, keys, _signed_head(signed))
            continue
        check_checkpoint(report, _checkpoint_from_event(event), keys, by_seq.get)
    _check_trailer(report, export)
    if report.last_seq is not None:
        report.unsigned_tail = report.last_seq - (report.last_checkpoint_seq or 0)
    return report


def _signed_head(signed: Mapping[str, Any]) -> Callable[[int], Mapping[str, Any] | None]:
    """For a checkpoint whose head is outside the file: the head as the checkpoint states it."""

    def event_at(seq: int) -> Mapping[str, Any] | None:
        return {"seq": seq, "hash": signed["hash"]}

    return event_at


def _check_trailer(report: Report, export: ExportFile) -> None:
    if export.header is None:
        return  # an older export: it had no trailer to check
    trailer = export.trailer
    if trailer is None:
        report.add(
            "truncated",
            "the file ends without its trailer: lines at its end were cut off",
        )
        return
    last = export.events[-1] if export.events else None
    if trailer.get("events") != len(export.events):
        report.add(
            "deleted" if int(trailer.get("events") or 0) > len(export.events) else "inserted",
            f"the file's trailer counts {trailer.get('events')} events, the file holds "
            f"{len(export.events)}: events were removed from or added to the file",
        )
    elif last is not None and (
        trailer.get("last_seq") != int(last["seq"]) or trailer.get("last_hash") != last["hash"]
    ):
        report.add(
            "edited",
            f"the file's trailer names seq {trailer.get('last_seq')} as the last event, not "
            f"seq {last['seq']} as found",
            last,
        )
