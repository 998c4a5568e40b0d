"""``broker audit``: the auditor's commands (trace, export, verify) and the operator's (checkpoint,
public-key, ingest, status).

Each reads the broker's store directly (settings from ``BROKER_*`` and ``BROKER_CONFIG``), or,
with ``--url`` and an auditor's session token, the broker's API (``GET /v1/audit/...``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TextIO

import httpx
import typer

from broker.errors import BrokerError, ConfigurationError

if TYPE_CHECKING:  # settings pull in pydantic and CEL; commands load them when they run
    from broker.settings import Settings

audit_app = typer.Typer(no_args_is_help=True, help="The audit record: trace, export, verify.")

PAGE = 1000

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="BROKER_AUDIT_URL",
        help="Read through this broker's API instead of the store.",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="BROKER_AUDIT_TOKEN", help="An auditor's session token (with --url)."
    ),
]


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _settings() -> Settings:
    from broker.settings import load_settings

    try:
        return load_settings()
    except ConfigurationError as exc:
        _fail(exc.detail)


def _database(settings: Settings) -> Any:
    from broker.store import Database

    return Database(settings.effective_database_url)


class _Api:
    """The auditor endpoints over HTTP."""

    def __init__(self, url: str, token: str | None) -> None:
        if not token:
            _fail("--url needs an auditor's session token (--token or BROKER_AUDIT_TOKEN)")
        self.client = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            follow_redirects=False,
        )

    def get(self, path: str, **params: Any) -> Any:
        try:
            resp = self.client.get(path, params={k: v for k, v in params.items() if v is not None})
        except httpx.HTTPError as exc:
            _fail(f"the broker is not reachable: {type(exc).__name__}")
        if resp.status_code != 200:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text[:200]
            _fail(f"the broker refused: HTTP {resp.status_code}: {detail}")
        return resp.json()

    def events(self, **filters: Any) -> Iterator[dict[str, Any]]:
        after = 0
        while True:
            page = self.get("/v1/audit/events", after=after, limit=PAGE, **filters)
            yield from page["events"]
            if page.get("next") is None:
                return
            after = int(page["next"])


def _store_events(db: Any, **filters: Any) -> Iterator[dict[str, Any]]:
    from broker.store import repo

    after = 0
    while True:
        with db.read() as conn:
            page = repo.audit_events(conn, after_seq=after, limit=PAGE, **filters)
        yield from page
        if len(page) < PAGE:
            return
        after = int(page[-1]["seq"])


def _time(value: str | None, name: str) -> float | None:
    from datetime import datetime

    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        _fail(f"{name} must be epoch seconds or an RFC 3339 date-time")
    if moment.tzinfo is None:
        _fail(f"{name} needs a time zone (for example Z)")
    return moment.timestamp()


@audit_app.command()
def trace(
    task: Annotated[str, typer.Argument(help="The task id (tsk_...).")],
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the events as JSON.")] = False,
) -> None:
    """Show one task as a tree: who asked and why, the decision, each issuance, each use, the end."""
    from broker.audit.trace import render_trace

    if url:
        body = _Api(url, token).get(f"/v1/audit/tasks/{task}/trace")
        events: list[dict[str, Any]] = body["events"]
    else:
        db = _database(_settings())
        try:
            events = list(_store_events(db, task_id=task))
        finally:
            db.dispose()
    if as_json:
        typer.echo(json.dumps(events, indent=2, sort_keys=True, default=str))
    else:
        typer.echo(render_trace(events, task))
    if not events:
        raise typer.Exit(1)


@audit_app.command()
def export(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here instead of standard output.")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Only this task's events.")] = None,
    principal: Annotated[str | None, typer.Option(help="Only events by this subject.")] = None,
    scope: Annotated[str | None, typer.Option(help="Only events of tasks for this scope.")] = None,
    name: Annotated[str | None, typer.Option(help="Only events of this name.")] = None,
    since: Annotated[str | None, typer.Option(help="From this time (epoch or RFC 3339).")] = None,
    until: Annotated[str | None, typer.Option(help="Before this time.")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Write audit events as JSON Lines, in chain order, with their hashes (verifiable offline
    with `broker audit verify --file`)."""
    filters = {
        "task_id": task,
        "subject": principal,
        "scope": scope,
        "name": name,
        "since": _time(since, "--since"),
        "until": _time(until, "--until"),
    }
    target: TextIO = out.open("w", encoding="utf-8") if out else sys.stdout
    count = 0
    try:
        if url:
            api_names = {"task_id": "task", "subject": "principal"}
            rows = _Api(url, token).events(
                **{api_names.get(k, k): v for k, v in filters.items() if v is not None}
            )
            for row in rows:
                target.write(json.dumps(row, sort_keys=True, default=str) + "\n")
                count += 1
        else:
            db = _database(_settings())
            try:
                for row in _store_events(db, **{k: v for k, v in filters.items() if v is not None}):
                    target.write(json.dumps(row, sort_keys=True, default=str) + "\n")
                    count += 1
            finally:
                db.dispose()
    finally:
        if out:
            target.close()
    typer.echo(f"exported {count} events", err=True)


@audit_app.command()
def verify(
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Verify an exported JSONL file instead of the store."),
    ] = None,
    partial: Annotated[
        bool, typer.Option(help="The file is a filtered export: check hashes, not links.")
    ] = False,
    public_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--public-key", help="Trust this public key (PEM, JWK or JWK Set); repeatable."
        ),
    ] = None,
    expect: Annotated[
        list[str] | None,
        typer.Option(
            help="SEQ:HASH known from elsewhere (an exported checkpoint span); repeatable."
        ),
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check the hash chain and every signed checkpoint; exit 1 and say where when anything was
    edited, deleted, inserted or reordered."""
    from broker.audit.verify import verify_export, verify_store

    anchors = _anchors(expect or [])
    if url:
        report: dict[str, Any] = _Api(url, token).get("/v1/audit/verify")
    else:
        db = _database(_settings()) if file is None or not public_key else None
        try:
            keys = _trusted_keys(public_key or [], db)
            if file is not None:
                if not file.is_file():
                    _fail(f"{file} is not a file")
                report = verify_export(file, keys, partial=partial).as_dict()
            else:
                assert db is not None  # opened above whenever no file is given
                report = verify_store(db, keys, anchors=anchors).as_dict()
        finally:
            if db is not None:
                db.dispose()
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_report(report)
    if not report["ok"]:
        raise typer.Exit(1)


def _anchors(items: list[str]) -> list[tuple[int, str]]:
    anchors: list[tuple[int, str]] = []
    for item in items:
        seq, sep, digest = item.partition(":")
        if not sep or not seq.isdigit() or len(digest) != 64:
            _fail(f"--expect takes SEQ:HASH (a 64-hex hash), not {item!r}")
        anchors.append((int(seq), digest.lower()))
    return anchors


def _trusted_keys(paths: list[Path], db: Any | None) -> Any:
    from broker.audit.checkpoints import PublicKeys
    from broker.audit.runtime import checkpoint_verifier

    if not paths:
        try:
            return checkpoint_verifier(_settings(), None, db)
        except (OSError, ValueError) as exc:
            _fail(f"no key to verify checkpoints with ({exc}); pass --public-key")
    trusted = PublicKeys()
    for path in paths:
        try:
            trusted.add_file(path)
        except (OSError, ValueError) as exc:
            _fail(f"cannot read public key {path}: {exc}")
    return trusted


def _print_report(report: dict[str, Any]) -> None:
    verdict = "OK" if report["ok"] else "TAMPERED"
    typer.echo(
        f"{verdict}: {report['events']} events (seq {report['first_seq']}..{report['last_seq']}), "
        f"{report['checkpoints']} valid signed checkpoints, last at seq "
        f"{report['last_checkpoint_seq']}; {report['unsigned_tail']} events after it"
    )
    for finding in report["findings"]:
        where = f"seq {finding['seq']} ({finding['event_id']})" if finding["seq"] else "chain"
        typer.echo(f"  {finding['kind']:<18} {where}: {finding['message']}")


def _keyring(settings: Settings, db: Any) -> Any:
    import time

    from broker.wiring import build_keyring

    return build_keyring(settings, db, time.time)


@audit_app.command()
def checkpoint() -> None:
    """Sign the chain's head now with the broker's key (the broker also does this every
    checkpoint_interval)."""
    import time

    from broker.audit.checkpoints import create_checkpoint

    settings = _settings()
    db = _database(settings)
    try:
        made = create_checkpoint(db, _keyring(settings, db), time.time)
    except (OSError, ValueError, BrokerError) as exc:
        _fail(f"could not take a checkpoint: {exc}")
    finally:
        db.dispose()
    if made is None:
        typer.echo("nothing new to sign since the last checkpoint")
    else:
        typer.echo(f"signed seq {made['seq']} hash {made['hash']} with key {made['key_id']}")


@audit_app.command("public-keys")
def public_keys() -> None:
    """Print every public key the broker ever signed with (a JWK Set), for auditors who verify
    exports offline (`broker audit verify --file F --public-key KEYS.json`)."""
    from broker.audit.checkpoints import StoreKeys

    db = _database(_settings())
    try:
        typer.echo(json.dumps(StoreKeys(db).jwks(), indent=2, sort_keys=True))
    finally:
        db.dispose()


@audit_app.command("ingest-cloudtrail")
def ingest_cloudtrail(
    sources: Annotated[
        list[str], typer.Argument(help="CloudTrail files, folders or s3://bucket/prefix.")
    ],
) -> None:
    """Read CloudTrail records once and record the uses of broker-minted STS credentials."""
    import time

    from broker.audit.cloudtrail import CloudTrailIngest
    from broker.audit.uses import UseRecorder

    settings = _settings()
    config = settings.audit.cloudtrail.model_copy(update={"sources": sources})
    store = None
    if any(s.startswith("s3://") for s in sources):
        from broker.backends.aws_s3 import S3ObjectStore
        from broker.settings import AwsSettings

        store = S3ObjectStore(settings.aws or AwsSettings())
    db = _database(settings)
    try:
        ingest = CloudTrailIngest(
            config, db, UseRecorder(db, time.time), time.time, object_store=store
        )
        files = ingest.poll_once()
    finally:
        db.dispose()
    typer.echo(json.dumps({"files": files, **ingest.health()["outcomes"]}, sort_keys=True))


@audit_app.command("ingest-openbao")
def ingest_openbao(
    path: Annotated[Path, typer.Argument(help="The OpenBao file audit device's log.")],
) -> None:
    """Read an OpenBao audit log from where the broker last stopped, and record the uses."""
    import time

    from broker.audit.openbao_ingest import EntryHandler, FileTail
    from broker.audit.uses import UseRecorder

    settings = _settings()
    db = _database(settings)
    try:
        recorder = UseRecorder(db, time.time)
        handler = EntryHandler(recorder, time.time, cluster=settings.cluster_name)
        tail = FileTail(path, handler, db, time.time)
        lines = tail.poll_once()
        tail.close()
    finally:
        db.dispose()
    typer.echo(json.dumps({"lines": lines, **recorder.counters.as_dict()}, sort_keys=True))


@audit_app.command()
def status(url: UrlOption = None, token: TokenOption = None) -> None:
    """The chain's head, the last signed checkpoint and the export backlog."""
    if url:
        typer.echo(json.dumps(_Api(url, token).get("/v1/audit/status"), indent=2, sort_keys=True))
        return
    from broker.store import repo

    db = _database(_settings())
    try:
        with db.read() as conn:
            seq, head = repo.audit_head(conn)
            body = {
                "head": {"seq": seq, "hash": head},
                "last_checkpoint": repo.latest_checkpoint(conn),
                "export_backlog": repo.count_unexported(conn),
            }
    finally:
        db.dispose()
    typer.echo(json.dumps(body, indent=2, sort_keys=True))
