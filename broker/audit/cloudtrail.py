"""AWS CloudTrail records, turned into ``broker.credential.use`` spans.

CloudTrail delivers JSON files (``{"Records": [...]}``, usually gzipped) to an S3 bucket; this
reads them from local files or folders and from ``s3://bucket/prefix`` sources, and matches each
record made with broker-minted STS credentials to its credential by, in this order:

1. ``userIdentity.accessKeyId``: the access key id of the session, the credential's handle;
2. ``userIdentity.sessionContext.sourceIdentity``: the credential's ``details["source_identity"]``;
3. the RoleSessionName (the last part of ``userIdentity.arn``): ``details["role_session_name"]``.

A record whose SourceIdentity or session name starts with the broker's prefix, or whose session
belongs to one of the roles the broker assumes, but that matches no credential, is reported as
``broker.use.unmatched``. Every file is read once (remembered by key, size and ETag); every record
once (by ``eventID``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from broker.audit.uses import Ingested, Match, ObservedUse, UseRecorder
from broker.domain.audit import Outcome, UseSource
from broker.domain.scrub import scrub_text
from broker.settings import CloudTrailSettings
from broker.store import Database, repo

log = logging.getLogger(__name__)

#: Largest CloudTrail file read (CloudTrail's own files are far smaller).
MAX_FILE_BYTES = 256 * 1024 * 1024
_DENIED_CODES = ("AccessDenied", "UnauthorizedOperation", "Unauthorized", "Forbidden")
_OBJECT_SOURCE = "cloudtrail-object"


def _time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def session_name(identity: Mapping[str, Any]) -> str | None:
    """The RoleSessionName of an assumed-role identity (``.../assumed-role/ROLE/SESSION``)."""
    arn = identity.get("arn")
    if isinstance(arn, str) and ":assumed-role/" in arn:
        return arn.rsplit("/", 1)[-1] or None
    principal = identity.get("principalId")
    if isinstance(principal, str) and ":" in principal:
        return principal.split(":", 1)[1] or None
    return None


def parse_record(
    record: Mapping[str, Any],
    *,
    session_prefixes: Sequence[str] = ("tsk_", "crd_"),
    role_arns: Sequence[str] = (),
) -> ObservedUse | None:
    """One CloudTrail record -> an observed use, or None when it cannot concern a credential."""
    event_id = record.get("eventID")
    if not isinstance(event_id, str) or not event_id:
        return None
    identity = record.get("userIdentity") or {}
    context = identity.get("sessionContext") or {}
    issuer = context.get("sessionIssuer") or {}
    key_id = identity.get("accessKeyId")
    source_identity = context.get("sourceIdentity") or record.get("sourceIdentity")
    name = session_name(identity) if identity.get("type") == "AssumedRole" else None
    matches: list[Match] = []
    if isinstance(key_id, str) and key_id:
        matches.append(Match("access_key_id", "aws_sts", key_id))
    if isinstance(source_identity, str) and source_identity:
        matches.append(Match("source_identity", "aws_sts", source_identity, "source_identity"))
    if name:
        matches.append(Match("role_session_name", "aws_sts", name, "role_session_name"))
    if not matches:
        return None
    role_arn = issuer.get("arn") if isinstance(issuer.get("arn"), str) else None
    prefixes = tuple(session_prefixes)
    ours = bool(
        (isinstance(source_identity, str) and prefixes and source_identity.startswith(prefixes))
        or (name and prefixes and name.startswith(prefixes))
        or (role_arn and role_arn in role_arns)
    )
    code = record.get("errorCode")
    if code:
        message = f"{code}: {record.get('errorMessage') or ''}".strip(": ")
        error: str | None = scrub_text(message, limit=300)
        outcome = Outcome.DENIED if any(d in str(code) for d in _DENIED_CODES) else Outcome.FAILURE
    else:
        error, outcome = None, Outcome.SUCCESS
    resources = [
        str(r["ARN"]) for r in record.get("resources") or [] if isinstance(r, dict) and r.get("ARN")
    ]
    event_source = str(record.get("eventSource") or "unknown")
    attributes: dict[str, Any] = {
        "aws.cloudtrail.event_id": event_id,
        "aws.cloudtrail.event_source": event_source,
        "aws.cloudtrail.event_name": record.get("eventName"),
        "aws.cloudtrail.event_type": record.get("eventType"),
        "aws.cloudtrail.read_only": record.get("readOnly"),
        "aws.request_id": record.get("requestID"),
        "aws.cloudtrail.resources": resources or None,
        "aws.role.arn": role_arn,
        "aws.role.session_name": name,
        "aws.source_identity": source_identity,
        "aws.access_key_id": key_id,
        "cloud.region": record.get("awsRegion"),
        "cloud.account.id": record.get("recipientAccountId"),
        "user_agent.original": record.get("userAgent"),
    }
    when = _time(record.get("eventTime"))
    return ObservedUse(
        source=UseSource.CLOUDTRAIL,
        record_id=event_id,
        time=when if when is not None else 0.0,
        matches=tuple(matches),
        operation=str(record.get("eventName") or "unknown"),
        target=resources[0] if resources else event_source,
        outcome=outcome,
        error=error,
        client_address=record.get("sourceIPAddress"),
        ours=ours,
        attributes={k: v for k, v in attributes.items() if v is not None},
    )


def records_of(data: bytes) -> list[dict[str, Any]]:
    """The records of one CloudTrail file (gzipped or not)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    body = json.loads(data)
    if isinstance(body, dict) and isinstance(body.get("Records"), list):
        return [r for r in body["Records"] if isinstance(r, dict)]
    if isinstance(body, list):  # a bare list of records (an export from Athena or the console)
        return [r for r in body if isinstance(r, dict)]
    raise ValueError("not a CloudTrail file: no Records list")


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One CloudTrail file in a source: its key, size and version tag."""

    key: str
    size: int
    etag: str


class ObjectStore(Protocol):
    """Lists and reads objects under an S3 prefix (``broker.backends.aws_s3`` implements it)."""

    def list_objects(self, bucket: str, prefix: str) -> Iterator[tuple[str, int, str]]:
        """``(key, size, etag)`` of each object under ``prefix``."""
        ...

    def read_object(self, bucket: str, key: str) -> bytes: ...


class Source(Protocol):
    name: str

    def objects(self) -> Iterator[StoredObject]: ...

    def read(self, obj: StoredObject) -> bytes: ...


class LocalSource:
    """A CloudTrail file, or a folder of them (searched recursively, in name order)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    def objects(self) -> Iterator[StoredObject]:
        if self.path.is_file():
            files = [self.path]
        else:
            files = sorted(
                p
                for p in self.path.rglob("*")
                if p.is_file() and (p.name.endswith(".json") or p.name.endswith(".json.gz"))
            )
        for p in files:
            stat = p.stat()
            yield StoredObject(str(p), stat.st_size, f"{stat.st_mtime_ns}")

    def read(self, obj: StoredObject) -> bytes:
        return Path(obj.key).read_bytes()


class S3Source:
    """CloudTrail files under ``s3://bucket/prefix``."""

    def __init__(self, url: str, store: ObjectStore) -> None:
        rest = url[len("s3://") :]
        self.bucket, _, self.prefix = rest.partition("/")
        self.store = store
        self.name = url

    def objects(self) -> Iterator[StoredObject]:
        for key, size, etag in self.store.list_objects(self.bucket, self.prefix):
            if key.endswith(".json") or key.endswith(".json.gz"):
                yield StoredObject(key, size, etag)

    def read(self, obj: StoredObject) -> bytes:
        return self.store.read_object(self.bucket, obj.key)


class CloudTrailIngest:
    """Polls the configured sources and records what concerns broker credentials."""

    def __init__(
        self,
        settings: CloudTrailSettings,
        db: Database,
        recorder: UseRecorder,
        clock: Callable[[], float],
        *,
        object_store: ObjectStore | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.recorder = recorder
        self.clock = clock
        self.sources: list[Source] = []
        for spec in settings.sources:
            if spec.startswith("s3://"):
                if object_store is None:
                    raise ValueError("an s3:// CloudTrail source needs AWS access (aws settings)")
                self.sources.append(S3Source(spec, object_store))
            else:
                self.sources.append(LocalSource(Path(spec)))
        self.files = 0
        self.records = 0
        self.bad_files = 0
        self.outcomes: dict[str, int] = {}
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _object_id(source: Source, obj: StoredObject) -> str:
        return hashlib.sha256(
            f"{source.name}\n{obj.key}\n{obj.size}\n{obj.etag}".encode()
        ).hexdigest()

    def ingest_records(self, records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Record the uses among ``records``; returns counts by outcome."""
        counts: dict[str, int] = {}
        for rec in records:
            use = parse_record(
                rec,
                session_prefixes=self.settings.session_prefixes,
                role_arns=self.settings.role_arns,
            )
            self.records += 1
            if use is None:
                result = Ingested.IGNORED
            else:
                if use.time == 0.0:
                    use = replace(use, time=self.clock())
                result = self.recorder.ingest(use)
            counts[result.value] = counts.get(result.value, 0) + 1
            self.outcomes[result.value] = self.outcomes.get(result.value, 0) + 1
        return counts

    def poll_once(self) -> int:
        """Read every file not read before; returns how many files were read."""
        done = 0
        for source in self.sources:
            for obj in source.objects():
                object_id = self._object_id(source, obj)
                with self.db.read() as conn:
                    seen = repo.ingest_cursor(conn, f"{_OBJECT_SOURCE}:{object_id}")
                if seen is not None:
                    continue
                if obj.size > MAX_FILE_BYTES:
                    log.warning(
                        "skipping CloudTrail file %s: larger than %d bytes", obj.key, MAX_FILE_BYTES
                    )
                    self.bad_files += 1
                    self._remember(object_id, obj, "too_large")
                    continue
                try:
                    records = records_of(source.read(obj))
                except (ValueError, OSError) as exc:
                    log.warning("skipping CloudTrail file %s: %s", obj.key, type(exc).__name__)
                    self.bad_files += 1
                    self._remember(object_id, obj, "unreadable")
                    continue
                self.ingest_records(records)
                self._remember(object_id, obj, "read")
                self.files += 1
                done += 1
        return done

    def _remember(self, object_id: str, obj: StoredObject, state: str) -> None:
        with self.db.write() as conn:
            repo.set_ingest_cursor(
                conn,
                f"{_OBJECT_SOURCE}:{object_id}",
                {"key": obj.key[:400], "size": obj.size, "state": state},
                self.clock(),
            )

    def _run(self) -> None:
        while True:
            try:
                self.poll_once()
                self.last_error = None
            except Exception as exc:
                self.last_error = type(exc).__name__
                log.warning("reading CloudTrail failed: %s", type(exc).__name__)
            if self._stop.wait(self.settings.poll_interval):
                return

    def start(self) -> None:
        if self.sources and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="broker-cloudtrail", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def health(self) -> dict[str, Any]:
        return {
            "sources": [s.name for s in self.sources],
            "files": self.files,
            "records": self.records,
            "bad_files": self.bad_files,
            "outcomes": dict(self.outcomes),
            "last_error": self.last_error,
        }
