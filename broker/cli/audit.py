"""`broker audit`: the auditor's commands (trace, search, export, verify, status) and the
operator's (checkpoint, public-keys, ingest-openbao, ingest-cloudtrail).

The auditor's commands read the broker's API, signed in like every other command (see
`broker.cli.signin`: `--url` / `BROKER_URL`, the cached session, `--token`, an ID token) with a
principal holding the `auditor` role. With `--store` (or when no broker URL is known) they read
the broker's store directly instead, with the broker's own settings (`BROKER_*`,
`BROKER_CONFIG`): that is for operators on the broker's host.

`broker audit verify --file F` needs neither: an export carries its filter and the public keys of
the broker's checkpoints, and verifies offline (`--keys-url` or `--public-key` pin the keys).
Human-readable output by default, `--json` for machines.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TextIO

import typer

from broker.cli import signin
from broker.cli.output import Json, Quiet, emit_json, fail, note, shorten, table, when
from broker.cli.signin import IdTokenFile, SessionToken, Url
from broker.errors import BrokerError, ConfigurationError

if TYPE_CHECKING:  # settings pull in pydantic and CEL; commands load them when they run
    from broker.settings import Settings

audit_app = typer.Typer(
    no_args_is_help=True,
    help="The audit record: trace, search, export, verify.",
    rich_markup_mode=None,
)

PAGE = 1000
KEYS_PATH = "/.well-known/audit-keys.json"

Store = Annotated[
    bool,
    typer.Option(
        "--store",
        help="Read the broker's store directly (operators, with the broker's settings).",
    ),
]
TaskFilter = Annotated[str | None, typer.Option("--task", help="Only this task's events.")]
CredentialFilter = Annotated[
    str | None, typer.Option("--credential", help="Only events of this credential.")
]
PrincipalFilter = Annotated[
    str | None, typer.Option("--principal", help="Only events by this subject.")
]
ScopeFilter = Annotated[str | None, typer.Option("--scope", help="Only events of this scope.")]
OutcomeFilter = Annotated[
    str | None,
    typer.Option("--outcome", help="success, failure, denied (refusals included) or pending."),
]
EventFilter = Annotated[
    str | None,
    typer.Option(
        "--event",
        "--name",
        help="Only events of this name: broker.task.approval, or short: approval, refused, issue.",
    ),
]
SinceFilter = Annotated[
    str | None, typer.Option("--since", help="From this time (epoch seconds or RFC 3339).")
]
UntilFilter = Annotated[str | None, typer.Option("--until", help="Before this time.")]

#: Short event names people type, and the span names they mean.
EVENT_ALIASES = {
    "request": "broker.task.request",
    "decision": "broker.task.decision",
    "approval": "broker.task.approval",
    "refused": "broker.approval.refused",
    "issue": "broker.credential.issue",
    "use": "broker.credential.use",
    "revoke": "broker.credential.revoke",
    "expire": "broker.credential.expire",
    "end": "broker.task.complete",
    "complete": "broker.task.complete",
    "denied": "broker.request.denied",
    "auth": "broker.auth.failure",
    "session": "broker.session.start",
    "checkpoint": "broker.audit.checkpoint",
    "access": "broker.audit.access",
}
OUTCOMES = ("success", "failure", "denied", "pending")


def _settings() -> Settings:
    from broker.settings import load_settings

    try:
        return load_settings()
    except ConfigurationError as exc:
        fail(exc.detail)


def _database(settings: Settings) -> Any:
    from broker.store import Database

    return Database(settings.effective_database_url)


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
        fail(f"{name} must be epoch seconds or an RFC 3339 date-time")
    if moment.tzinfo is None:
        fail(f"{name} needs a time zone (for example Z)")
    return moment.timestamp()


def _filters(
    *,
    task: str | None = None,
    credential: str | None = None,
    principal: str | None = None,
    scope: str | None = None,
    outcome: str | None = None,
    event: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> dict[str, Any]:
    """The filters as the API names them (None: not filtered)."""
    if outcome is not None and outcome not in OUTCOMES:
        fail(f"--outcome is one of {', '.join(OUTCOMES)}")
    name = EVENT_ALIASES.get(event, event) if event else None
    if name is not None and not name.startswith("broker."):
        fail(
            f"no event named {event!r}",
            hint=f"use a span name (broker.task.approval) or one of {', '.join(EVENT_ALIASES)}",
        )
    return {
        "task": task,
        "credential": credential,
        "principal": principal,
        "scope": scope,
        "outcome": outcome,
        "name": name,
        "since": _time(since, "--since"),
        "until": _time(until, "--until"),
    }


# --- where the record is read from ------------------------------------------------------------


class Source(Protocol):
    """The audit record: the broker's API (auditors) or its store (operators)."""

    where: str

    def events(self, *, newest_first: bool = False, **filters: Any) -> Iterator[dict[str, Any]]: ...

    def trace(self, task: str) -> tuple[list[dict[str, Any]], str | None, list[dict[str, Any]]]: ...

    def verify(self) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...

    def keys(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class ApiSource:
    """The auditor endpoints, through the signed-in client."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.where = client.config.broker_url

    def events(self, *, newest_first: bool = False, **filters: Any) -> Iterator[dict[str, Any]]:
        cursor: dict[str, Any] = {}
        order = "desc" if newest_first else "asc"
        while True:
            page = self.client.request(
                "GET",
                "/v1/audit/events",
                params={**filters, **cursor, "order": order, "limit": PAGE},
            )
            yield from page["events"]
            if page.get("next") is None:
                return
            cursor = {"before" if newest_first else "after": int(page["next"])}

    def trace(self, task: str) -> tuple[list[dict[str, Any]], str | None, list[dict[str, Any]]]:
        body = self.client.request("GET", f"/v1/audit/tasks/{_segment(task)}/trace")
        return body["events"], body.get("state"), body.get("credentials") or []

    def verify(self) -> dict[str, Any]:
        report: dict[str, Any] = self.client.request("GET", "/v1/audit/verify")
        return report

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self.client.request("GET", "/v1/audit/status")
        return body

    def keys(self) -> dict[str, Any]:
        return _fetch_keys(self.where)

    def close(self) -> None:
        self.client.close()


_STORE_NAMES = {
    "task": "task_id",
    "credential": "credential_id",
    "principal": "subject",
    "name": "name",
    "scope": "scope",
    "outcome": "outcome",
    "since": "since",
    "until": "until",
}


class StoreSource:
    """The broker's own store, with its settings (operators)."""

    def __init__(self) -> None:
        self.settings = _settings()
        self.db = _database(self.settings)
        self.where = "the broker's store"

    def events(self, *, newest_first: bool = False, **filters: Any) -> Iterator[dict[str, Any]]:
        from broker.store import repo

        query = {_STORE_NAMES[k]: v for k, v in filters.items() if v is not None}
        cursor: dict[str, Any] = {}
        while True:
            with self.db.read() as conn:
                page = repo.audit_events(
                    conn, limit=PAGE, newest_first=newest_first, **query, **cursor
                )
            yield from page
            if len(page) < PAGE:
                return
            last = int(page[-1]["seq"])
            cursor = {"before_seq": last} if newest_first else {"after_seq": last}

    def trace(self, task: str) -> tuple[list[dict[str, Any]], str | None, list[dict[str, Any]]]:
        from broker.store import repo

        events = list(self.events(task=task))
        with self.db.read() as conn:
            found = repo.get_task(conn, task)
            creds = repo.credentials_for(conn, task) if found else []
        states = [
            {
                "id": c.id,
                "state": c.state.value,
                "expires_at": c.expires_at,
                "next_attempt_at": c.next_attempt_at,
            }
            for c in creds
        ]
        return events, found.state.value if found else None, states

    def verify(self) -> dict[str, Any]:
        from broker.audit.runtime import checkpoint_verifier
        from broker.audit.verify import verify_store

        try:
            keys = checkpoint_verifier(self.settings, None, self.db)
        except (OSError, ValueError) as exc:
            fail(f"no key to verify checkpoints with ({exc})")
        return verify_store(self.db, keys).as_dict()

    def status(self) -> dict[str, Any]:
        from broker.store import repo

        with self.db.read() as conn:
            seq, head = repo.audit_head(conn)
            return {
                "head": {"seq": seq, "hash": head},
                "last_checkpoint": repo.latest_checkpoint(conn),
                "export_backlog": repo.count_unexported(conn),
            }

    def keys(self) -> dict[str, Any]:
        from broker.audit.checkpoints import StoreKeys

        return StoreKeys(self.db).jwks()

    def close(self) -> None:
        self.db.dispose()


def _source(url: str | None, token: str | None, id_token_file: Path | None, store: bool) -> Source:
    if store or not signin.broker_url(url):
        return StoreSource()
    return ApiSource(signin.client(url, token, id_token_file))


def _segment(task: str) -> str:
    if not task or any(c in task for c in "/?#") or task in (".", ".."):
        fail(f"{task!r} is not a task id")
    return task


def _fetch_keys(where: str) -> dict[str, Any]:
    """The broker's published audit keys (``--keys-url``: the broker's URL or the keys' own)."""
    import httpx

    url = where.rstrip("/")
    if not url.endswith(".json"):
        url += KEYS_PATH
    try:
        resp = httpx.get(url, timeout=30, follow_redirects=False)
    except httpx.HTTPError as exc:
        fail(f"cannot fetch the audit keys from {url} ({type(exc).__name__})")
    if resp.status_code != 200:
        fail(f"{url} answered HTTP {resp.status_code}, not the broker's audit keys")
    try:
        body = resp.json()
    except ValueError:
        fail(f"{url} did not answer with a JWK Set")
    if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
        fail(f"{url} did not answer with a JWK Set")
    return body


@audit_app.command()
def trace(
    task: Annotated[str, typer.Argument(help="The task id (tsk_...).", metavar="TASK")],
    url: Url = None,
    token: SessionToken = None,
    id_token_file: IdTokenFile = None,
    store: Store = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Show one task as a tree: who asked and why, the decision, each issuance, each use, the end.

    Refused attempts are REFUSED lines with their code (never decisions); a failed mint says
    nothing was issued; a credential still revoke_pending is named at the end.
    """
    from broker.audit.trace import render_trace

    with signin.errors():
        source = _source(url, token, id_token_file, store)
        try:
            events, state, credentials = source.trace(task)
        finally:
            source.close()
    if as_json:
        emit_json({"task": task, "state": state, "events": events, "credentials": credentials})
    else:
        typer.echo(render_trace(events, task, state=state, credentials=credentials))
    if not events:
        raise typer.Exit(1)


@audit_app.command()
def search(
    task: TaskFilter = None,
    credential: CredentialFilter = None,
    principal: PrincipalFilter = None,
    scope: ScopeFilter = None,
    outcome: OutcomeFilter = None,
    event: EventFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    limit: Annotated[int, typer.Option(help="Show at most this many events.", min=1)] = 50,
    url: Url = None,
    token: SessionToken = None,
    id_token_file: IdTokenFile = None,
    store: Store = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Find audit events, newest first: every filter given must match.

    \b
        broker audit search --principal dana --event refused
        broker audit search --scope postgres-readwrite --since 2026-11-01T00:00:00Z
    """
    from broker.audit.trace import describe, label

    filters = _filters(
        task=task,
        credential=credential,
        principal=principal,
        scope=scope,
        outcome=outcome,
        event=event,
        since=since,
        until=until,
    )
    found: list[dict[str, Any]] = []
    with signin.errors():
        source = _source(url, token, id_token_file, store)
        try:
            for row in source.events(newest_first=True, **filters):
                found.append(row)
                if len(found) >= limit:
                    break
        finally:
            source.close()
    if as_json:
        emit_json(found)
        return
    rows = [
        (
            r["seq"],
            when(r["time"]),
            label(r),
            r["outcome"],
            r.get("actor_subject") or "-",
            r.get("task_id") or "-",
            shorten(describe(r), 100),
        )
        for r in found
    ]
    table(
        ("SEQ", "TIME", "EVENT", "OUTCOME", "ACTOR", "TASK", "WHAT"), rows, empty="no events match"
    )
    if len(found) >= limit:
        note(f"showing the newest {limit}; --limit shows more", quiet=quiet)


@audit_app.command()
def export(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here instead of standard output.")
    ] = None,
    task: TaskFilter = None,
    credential: CredentialFilter = None,
    principal: PrincipalFilter = None,
    scope: ScopeFilter = None,
    outcome: OutcomeFilter = None,
    event: EventFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    url: Url = None,
    token: SessionToken = None,
    id_token_file: IdTokenFile = None,
    store: Store = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary on stderr (the export is JSON).")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Write audit events as JSON Lines, in chain order, with their hashes.

    The file starts with a header (its filter and the broker's public checkpoint keys) and ends
    with a trailer (how many events), so `broker audit verify --file F` checks it offline, with no
    other flag.
    """
    from broker.audit.verify import export_header, export_trailer

    filters = _filters(
        task=task,
        credential=credential,
        principal=principal,
        scope=scope,
        outcome=outcome,
        event=event,
        since=since,
        until=until,
    )
    count = 0
    last: dict[str, Any] | None = None
    with signin.errors():
        source = _source(url, token, id_token_file, store)
        target: TextIO = out.open("w", encoding="utf-8") if out else sys.stdout
        try:
            header = export_header(
                source=source.where, filters=filters, keys=source.keys(), created_at=time.time()
            )
            target.write(json.dumps(header, sort_keys=True) + "\n")
            for row in source.events(**filters):
                target.write(json.dumps(row, sort_keys=True, default=str) + "\n")
                count += 1
                last = row
            target.write(json.dumps(export_trailer(count, last), sort_keys=True) + "\n")
        finally:
            source.close()
            if out:
                target.close()
    summary = {"events": count, "filter": header["filter"], "file": str(out) if out else None}
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True), err=True)
    else:
        what = ", ".join(f"{k}={v}" for k, v in header["filter"].items()) or "the whole chain"
        note(f"exported {count} events ({what})" + (f" to {out}" if out else ""), quiet=quiet)


@audit_app.command()
def verify(
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Verify an exported file, offline, instead of the record."),
    ] = None,
    keys_url: Annotated[
        str | None,
        typer.Option(
            "--keys-url",
            help="Trust the broker's published keys: its URL, or the keys' own URL.",
            show_default=False,
        ),
    ] = None,
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
    partial: Annotated[
        bool | None,
        typer.Option(
            "--partial/--complete",
            help="Override what the file says it is (a filtered or a complete export).",
            hidden=True,
        ),
    ] = None,
    url: Url = None,
    token: SessionToken = None,
    id_token_file: IdTokenFile = None,
    store: Store = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Check the hash chain and every signed checkpoint; exit 1 and say where when anything was
    edited, deleted, inserted or reordered.

    \b
        broker audit verify                       the broker's whole record
        broker audit verify --file task.jsonl     an export, offline
    """
    anchors = _anchors(expect or [])
    if file is not None:
        report = _verify_file(file, keys_url, public_key or [], partial)
    else:
        with signin.errors():
            source = _source(url, token, id_token_file, store)
            try:
                if anchors and isinstance(source, StoreSource):
                    report = _verify_store_anchored(source, anchors)
                else:
                    if anchors:
                        fail(
                            "--expect needs --store (or --file): the API verifies the record whole"
                        )
                    report = source.verify()
            finally:
                source.close()
    if as_json:
        emit_json(report)
    else:
        print_report(report)
    if not report["ok"]:
        raise typer.Exit(1)


def _verify_file(
    file: Path, keys_url: str | None, public_key: list[Path], partial: bool | None
) -> dict[str, Any]:
    from broker.audit.checkpoints import PublicKeys
    from broker.audit.verify import verify_export

    if not file.is_file():
        fail(f"{file} is not a file")
    keys: PublicKeys | None = None
    pinned = None
    if public_key or keys_url:
        keys = PublicKeys()
        for path in public_key:
            try:
                keys.add_file(path)
            except (OSError, ValueError) as exc:
                fail(f"cannot read public key {path}: {exc}")
        if keys_url:
            try:
                keys.add_jwk_set(_fetch_keys(keys_url))
            except ValueError as exc:
                fail(f"the keys at {keys_url} cannot be used: {exc}")
        pinned = ", ".join([*(str(p) for p in public_key), *([keys_url] if keys_url else [])])
    try:
        report = verify_export(file, keys, partial=partial).as_dict()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {file}: {exc}")
    if pinned and report.get("export"):
        report["export"]["keys"] = pinned
    return report


def _verify_store_anchored(source: StoreSource, anchors: list[tuple[int, str]]) -> dict[str, Any]:
    from broker.audit.runtime import checkpoint_verifier
    from broker.audit.verify import verify_store

    keys = checkpoint_verifier(source.settings, None, source.db)
    return verify_store(source.db, keys, anchors=anchors).as_dict()


def _anchors(items: list[str]) -> list[tuple[int, str]]:
    anchors: list[tuple[int, str]] = []
    for item in items:
        seq, sep, digest = item.partition(":")
        if not sep or not seq.isdigit() or len(digest) != 64:
            fail(f"--expect takes SEQ:HASH (a 64-hex hash), not {item!r}")
        anchors.append((int(seq), digest.lower()))
    return anchors


def print_report(report: dict[str, Any]) -> None:
    """A verification report for people: the verdict, what was checked, each finding."""
    verdict = "OK" if report["ok"] else "TAMPERED"
    export = report.get("export")
    line = f"{verdict}: {report['events']} events (seq {report['first_seq']}..{report['last_seq']})"
    if export is None:
        if report["checkpoints"]:
            signed = (
                f"{report['checkpoints']} valid signed checkpoints, last at seq "
                f"{report['last_checkpoint_seq']}; {report['unsigned_tail']} events after it"
            )
        else:
            signed = "no signed checkpoint yet"
        typer.echo(f"{line}, {signed}")
    else:
        typer.echo(f"{line} in {_export_kind(export)}")
        for detail in _export_details(report, export):
            typer.echo(f"  {detail}")
    for finding in report["findings"]:
        if finding["seq"]:
            where = f"seq {finding['seq']} ({finding['event_id']})"
            if finding.get("name"):
                where += f" {finding['name']} at {when(finding.get('time'))}"
        else:
            where = "file" if export is not None else "chain"
        typer.echo(f"  {finding['kind']:<18} {where}: {finding['message']}")


def _export_kind(export: dict[str, Any]) -> str:
    if export["kind"] == "complete":
        text = "a complete export"
    else:
        filt = export.get("filter")
        what = ", ".join(f"{k}={v}" for k, v in (filt or {}).items())
        text = f"a filtered export ({what})" if what else "a filtered export"
    if export.get("source"):
        text += f" of {export['source']}"
    if export.get("created_at"):
        text += f", made {when(export['created_at'])}"
    if not export.get("header"):
        text += " (an older file without a header)"
    return text


def _export_details(report: dict[str, Any], export: dict[str, Any]) -> list[str]:
    edited = sum(1 for f in report["findings"] if f["kind"] == "edited")
    out = [f"hashes: {report['events'] - edited} of {report['events']} events match their own hash"]
    if export["kind"] == "complete":
        out.append(f"links: every link checked, from the chain's start ({export['links_checked']})")
    else:
        gaps = export["links_unchecked"]
        out.append(
            f"links: {export['links_checked']} between events adjacent in the chain checked; "
            f"{gaps} gap{'s' if gaps != 1 else ''} (events outside the filter) cannot be "
            "checked here"
        )
    beyond = export.get("checkpoints_beyond_file") or 0
    out.append(
        f"checkpoints: {report['checkpoints']} valid signed checkpoints in the file"
        + (
            f" ({beyond} sign events outside it: only their signatures are checked)"
            if beyond
            else ""
        )
    )
    if export["keys"] == "carried by the file":
        out.append(
            "keys: the ones the file carries (pin them with --keys-url BROKER_URL or --public-key)"
        )
    else:
        out.append(f"keys: {export['keys']}")
    return out


# --- operators ---------------------------------------------------------------------------------


def _keyring(settings: Settings, db: Any) -> Any:
    from broker.wiring import build_keyring

    return build_keyring(settings, db, time.time)


@audit_app.command()
def checkpoint(as_json: Json = False, quiet: Quiet = False) -> None:
    """Sign the chain's head now with the broker's key (the broker also does this every
    checkpoint_interval). Reads the store: for operators."""
    from broker.audit.checkpoints import create_checkpoint

    settings = _settings()
    db = _database(settings)
    try:
        made = create_checkpoint(db, _keyring(settings, db), time.time)
    except (OSError, ValueError, BrokerError) as exc:
        fail(f"could not take a checkpoint: {exc}")
    finally:
        db.dispose()
    if as_json:
        emit_json(made)
    elif made is None:
        typer.echo("nothing new to sign since the last checkpoint")
    else:
        typer.echo(f"signed seq {made['seq']} hash {made['hash']} with key {made['key_id']}")


@audit_app.command("public-keys")
def public_keys(
    url: Url = None,
    store: Store = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Accepted for uniformity: the keys are a JWK Set.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Print every public key the broker ever signed checkpoints with (a JWK Set), for auditors
    who verify exports offline. From the broker's published keys, or its store with --store."""
    if store or not signin.broker_url(url):
        source = StoreSource()
        try:
            keys = source.keys()
        finally:
            source.close()
    else:
        keys = _fetch_keys(str(signin.broker_url(url)))
    emit_json(keys)


@audit_app.command("ingest-cloudtrail")
def ingest_cloudtrail(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="CloudTrail files, folders or s3://bucket/prefix.", metavar="SOURCE..."
        ),
    ],
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Read CloudTrail records once and record the uses of broker-minted STS credentials."""
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
    _counters({"files": files, **ingest.health()["outcomes"]}, as_json)


@audit_app.command("ingest-openbao")
def ingest_openbao(
    path: Annotated[Path, typer.Argument(help="The OpenBao file audit device's log.")],
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Read an OpenBao audit log from where the broker last stopped, and record the uses."""
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
    _counters({"lines": lines, **recorder.counters.as_dict()}, as_json)


def _counters(counts: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(counts)
        return
    table(("WHAT", "COUNT"), sorted(counts.items()))


@audit_app.command()
def status(
    url: Url = None,
    token: SessionToken = None,
    id_token_file: IdTokenFile = None,
    store: Store = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """The chain's head, the last signed checkpoint and the export backlog."""
    with signin.errors():
        source = _source(url, token, id_token_file, store)
        try:
            body = source.status()
        finally:
            source.close()
    if as_json:
        emit_json(body)
        return
    head = body.get("head") or {}
    last = body.get("last_checkpoint") or {}
    typer.echo(f"head             seq {head.get('seq')}  {head.get('hash')}")
    if last:
        typer.echo(
            f"last checkpoint  seq {last.get('seq')}  {when(last.get('created_at'))}  "
            f"key {last.get('key_id')}"
        )
    else:
        typer.echo("last checkpoint  none yet")
    typer.echo(f"export backlog   {body.get('export_backlog')} events not yet sent")
