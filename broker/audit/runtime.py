"""The audit's background parts, built from settings and started and stopped together.

Order matters: the exporter starts first and stops last, so the final checkpoint (taken when the
checkpointer stops) and the last ingested uses are still exported on a clean shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from broker.audit.checkpoints import (
    AnyKey,
    Checkpointer,
    CheckpointSigner,
    CheckpointVerifier,
    FileKeySigner,
    StoreKeys,
)
from broker.audit.cloudtrail import CloudTrailIngest, ObjectStore
from broker.audit.exporter import OutboxExporter, SpanSender, build_sender
from broker.audit.openbao_ingest import OpenBaoIngest
from broker.audit.uses import UseRecorder
from broker.settings import Settings
from broker.store import Database

log = logging.getLogger(__name__)


class _Part(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


class AuditRuntime:
    """Outbox export, signed checkpoints, OpenBao and CloudTrail ingest."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        clock: Callable[[], float],
        uses: UseRecorder,
        *,
        sender: SpanSender | None = None,
        signer: CheckpointSigner | None = None,
        object_store: ObjectStore | None = None,
    ) -> None:
        self.settings = settings
        audit = settings.audit
        sender = sender or build_sender(settings.otlp)
        self.exporter = (
            OutboxExporter(db, sender, settings.otlp, clock) if sender is not None else None
        )
        self.signer = signer or FileKeySigner.from_settings(settings)
        self.checkpointer = Checkpointer(
            db,
            self.signer,
            clock,
            audit.checkpoint_interval,
            dedup_retention=audit.dedup_retention,
        )
        self.openbao = (
            OpenBaoIngest(
                audit.openbao,
                db,
                uses,
                clock,
                cluster=settings.cluster_name,
            )
            if audit.openbao.listen or audit.openbao.file
            else None
        )
        if (
            audit.cloudtrail.sources
            and object_store is None
            and any(s.startswith("s3://") for s in audit.cloudtrail.sources)
        ):
            from broker.backends.aws_s3 import S3ObjectStore
            from broker.settings import AwsSettings

            object_store = S3ObjectStore(settings.aws or AwsSettings())
        self.cloudtrail = (
            CloudTrailIngest(audit.cloudtrail, db, uses, clock, object_store=object_store)
            if audit.cloudtrail.sources
            else None
        )
        self._started: list[_Part] = []

    def parts(self) -> list[_Part]:
        """In start order."""
        found: list[Any] = [self.exporter, self.openbao, self.cloudtrail, self.checkpointer]
        return [p for p in found if p is not None]

    def start(self) -> None:
        from broker.logs import install_log_scrubber, quiet_libraries

        # Whoever runs a broker gets scrubbed logs, even without `broker serve`'s set-up.
        install_log_scrubber()
        quiet_libraries()
        for part in self.parts():
            part.start()
            self._started.append(part)

    def stop(self) -> None:
        while self._started:
            part = self._started.pop()
            try:
                part.stop()
            except Exception:
                log.exception("stopping %s failed", type(part).__name__)

    def health(self) -> dict[str, Any]:
        """Each part's state, for operators and auditors (no secrets)."""
        return {
            "export": self.exporter.health() if self.exporter else {"enabled": False},
            "checkpoints": self.checkpointer.health(),
            "openbao": self.openbao.health() if self.openbao else {"enabled": False},
            "cloudtrail": self.cloudtrail.health() if self.cloudtrail else {"enabled": False},
        }


def checkpoint_verifier(
    settings: Settings, signer: object | None = None, db: Database | None = None
) -> CheckpointVerifier:
    """What verifies this broker's checkpoints: its key ring (or signer) when it can verify, the
    public keys published in the store, and the signing key file when one exists."""
    verifiers: list[CheckpointVerifier] = []
    if signer is not None and callable(getattr(signer, "verify", None)):
        verifiers.append(signer)  # type: ignore[arg-type]  # checked structurally just above
    if db is not None:
        verifiers.append(StoreKeys(db))
    if settings.effective_signing_key_file.exists():
        verifiers.append(FileKeySigner.from_settings(settings))
    return AnyKey(*verifiers)
