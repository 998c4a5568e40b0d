"""`broker audit verify` detects an edited, deleted, inserted or reordered event and says where;
signed checkpoints catch a chain recomputed from scratch and a truncated tail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from broker.audit.checkpoints import FileKeySigner, PublicKeys, create_checkpoint
from broker.audit.verify import verify_export, verify_store
from broker.cli.main import app
from broker.domain.audit import body_of, chain_hash
from broker.store import Database, repo
from tests.audit.conftest import append_events


def now() -> float:
    return 1_800_000_000.0


def chain(db: Database, signer: FileKeySigner, n: int = 12, checkpoint_at: int = 8) -> None:
    """``n`` events with a signed checkpoint after the first ``checkpoint_at``."""
    append_events(db, checkpoint_at)
    assert create_checkpoint(db, signer, now) is not None
    append_events(db, n - checkpoint_at, start=1_700_000_100.0)


def rows(db: Database) -> list[dict[str, Any]]:
    with db.read() as conn:
        return repo.audit_events(conn, limit=10_000)


def sql(db: Database, statement: str, **params: Any) -> None:
    with db.write() as conn:
        conn.execute(text(statement), params)


def kinds(report: Any) -> list[tuple[str, int | None]]:
    return [(f.kind, f.seq) for f in report.findings]


def test_an_untouched_chain_verifies(store: Database, signer: FileKeySigner) -> None:
    """A chain written by the broker, with a checkpoint, verifies with no finding."""
    chain(store, signer)
    report = verify_store(store, signer.public_keys())
    assert report.ok, report.findings
    assert report.events == 13  # 12 events and the checkpoint's own event
    assert report.checkpoints == 1
    assert report.last_checkpoint_seq == 8
    assert report.unsigned_tail == 5


def test_an_edited_event_is_found_at_its_seq(store: Database, signer: FileKeySigner) -> None:
    """Changing one attribute of one stored event is reported as an edit at exactly that seq."""
    chain(store, signer)
    target = rows(store)[4]
    attrs = dict(target["attributes"], **{"broker.purpose": "something innocent"})
    sql(
        store,
        "UPDATE audit_events SET attributes = :a WHERE seq = :s",
        a=json.dumps(attrs),
        s=target["seq"],
    )
    report = verify_store(store, signer.public_keys())
    assert ("edited", 5) in kinds(report)
    assert report.findings[0].event_id == target["id"]


def test_a_deleted_event_is_found_where_the_chain_breaks(
    store: Database, signer: FileKeySigner
) -> None:
    """Deleting an event is reported between its neighbours, naming the gap."""
    chain(store, signer)
    sql(store, "DELETE FROM audit_events WHERE seq = 10")
    report = verify_store(store, signer.public_keys())
    assert kinds(report) == [("deleted", 11)]
    assert "between seq 9 and seq 11" in report.findings[0].message


def test_an_inserted_event_is_found(store: Database, signer: FileKeySigner) -> None:
    """A well-formed event inserted mid-chain (hash computed, later events renumbered) is found."""
    append_events(store, 6)
    before = rows(store)
    forged = dict(before[2])
    forged["id"] = "evt_forged"
    forged["attributes"] = {"broker.purpose": "a forged approval"}
    forged["prev_hash"] = before[2]["hash"]
    forged["hash"] = chain_hash(forged["prev_hash"], body_of(forged))
    # Make room after seq 3 and put the forgery at seq 4.
    sql(store, "UPDATE audit_events SET seq = seq + 1000 WHERE seq > 3")
    sql(store, "UPDATE audit_events SET seq = seq - 999 WHERE seq > 1000")
    columns = [c for c in forged if c not in ("seq",)]
    sql(
        store,
        f"INSERT INTO audit_events (seq, {', '.join(columns)}) VALUES (4, "
        + ", ".join(f":{c}" for c in columns)
        + ")",
        **{
            c: json.dumps(forged[c]) if isinstance(forged[c], (dict, list)) else forged[c]
            for c in columns
        },
    )
    report = verify_store(store, signer.public_keys())
    assert ("inserted", 5) in kinds(report)
    assert "after seq 3 up to seq 4 were inserted" in report.findings[0].message


def test_reordered_events_are_found(store: Database, signer: FileKeySigner) -> None:
    """Swapping two adjacent events (each keeping its own content and hash) is a reordering."""
    append_events(store, 6)
    sql(store, "UPDATE audit_events SET seq = 100 WHERE seq = 3")
    sql(store, "UPDATE audit_events SET seq = 3 WHERE seq = 4")
    sql(store, "UPDATE audit_events SET seq = 4 WHERE seq = 100")
    report = verify_store(store, signer.public_keys())
    assert ("reordered", 3) in kinds(report)


def test_a_recomputed_chain_is_caught_by_the_signed_checkpoint(
    store: Database, signer: FileKeySigner
) -> None:
    """An attacker who edits an early event and recomputes every later hash (and the head) leaves
    a consistent chain, but one that no longer passes through the signed head."""
    chain(store, signer)
    prev = "0" * 64
    for row in rows(store):
        if row["seq"] == 2:
            row["actor_subject"] = "someone-else"
        row["prev_hash"] = prev
        row["hash"] = chain_hash(prev, body_of(row))
        sql(
            store,
            "UPDATE audit_events SET actor_subject = :a, prev_hash = :p, hash = :h WHERE seq = :s",
            a=row["actor_subject"],
            p=row["prev_hash"],
            h=row["hash"],
            s=row["seq"],
        )
        prev = row["hash"]
    with store.write() as conn:
        repo.set_audit_head(conn, rows(store)[-1]["seq"], prev)
    report = verify_store(store, signer.public_keys())
    assert ("rewritten", 8) in kinds(report)


def test_a_truncated_tail_is_found(store: Database, signer: FileKeySigner) -> None:
    """Deleting the last events is caught by the head; moving the head too is caught by the
    checkpoint that signed them."""
    chain(store, signer, n=8, checkpoint_at=8)  # checkpoint at seq 8, its event is seq 9
    sql(store, "DELETE FROM audit_events WHERE seq >= 8")
    report = verify_store(store, signer.public_keys())
    assert "truncated" in [k for k, _ in kinds(report)]
    with store.write() as conn:
        repo.set_audit_head(conn, 7, rows(store)[-1]["hash"])
    report = verify_store(store, signer.public_keys())
    assert [k for k, _ in kinds(report)] == ["truncated"]
    assert "seq 8" in report.findings[0].message


def test_a_forged_or_untrusted_checkpoint_is_refused(
    store: Database, signer: FileKeySigner
) -> None:
    """A checkpoint whose signature does not verify, or by a key nobody trusts, is a finding."""
    chain(store, signer)
    sql(store, "UPDATE audit_checkpoints SET created_at = created_at + 1")
    report = verify_store(store, signer.public_keys())
    assert "bad_checkpoint" in [k for k, _ in kinds(report)]
    report = verify_store(store, PublicKeys())
    assert "bad_checkpoint" in [k for k, _ in kinds(report)]


def test_a_deleted_checkpoint_row_is_found_from_the_chain(
    store: Database, signer: FileKeySigner
) -> None:
    """Checkpoints are also events in the chain: removing the table row does not hide one."""
    chain(store, signer)
    sql(store, "DELETE FROM audit_checkpoints")
    report = verify_store(store, signer.public_keys())
    assert [k for k, _ in kinds(report)] == ["checkpoint_missing"]
    assert report.checkpoints == 1  # its signature still verified from the event


def test_an_expected_anchor_from_elsewhere_is_checked(
    store: Database, signer: FileKeySigner
) -> None:
    """A (seq, hash) an auditor kept (from an exported checkpoint span) must still be in the chain."""
    append_events(store, 5)
    good = rows(store)[2]
    assert verify_store(store, signer.public_keys(), anchors=[(3, good["hash"])]).ok
    report = verify_store(store, signer.public_keys(), anchors=[(3, "f" * 64)])
    assert kinds(report) == [("rewritten", 3)]


def test_export_then_verify_offline_and_detect_an_edit_in_the_file(
    store: Database, signer: FileKeySigner, tmp_path: Path
) -> None:
    """An exported JSONL file verifies offline with only the public key; an edit in it is found."""
    chain(store, signer)
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows(store)))
    pem = tmp_path / "broker.pub"
    pem.write_text(signer.public_pem())
    keys = PublicKeys()
    keys.add_file(pem)
    report = verify_export(path, keys)
    assert report.ok and report.checkpoints == 1
    lines = path.read_text().splitlines()
    edited = json.loads(lines[6])
    edited["outcome"] = "denied"
    lines[6] = json.dumps(edited)
    path.write_text("\n".join(lines) + "\n")
    assert kinds(verify_export(path, keys)) == [("edited", 7)]


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return {
        "BROKER_DEV_MODE": "true",
        "BROKER_DATA_DIR": str(tmp_path / "data"),
        "BROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}",
        "BROKER_CONFIG": "",
    }


def test_the_cli_verifies_and_says_where(
    store: Database, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """`broker audit checkpoint` signs with the broker's key; `broker audit verify` exits 0 on an
    intact chain and 1 naming the seq and event of an edit; `export` + `verify --file` agree."""
    runner = CliRunner()
    append_events(store, 6)
    result = runner.invoke(app, ["audit", "checkpoint"], env=cli_env)
    assert result.exit_code == 0, result.output
    assert "signed seq 6" in result.output
    result = runner.invoke(app, ["audit", "verify"], env=cli_env)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: 7 events")

    out = tmp_path / "export.jsonl"
    result = runner.invoke(app, ["audit", "export", "--out", str(out)], env=cli_env)
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert len(lines) == 9  # a header, the 7 events and a trailer
    assert json.loads(lines[0])["broker_audit_export"] == 1
    assert json.loads(lines[-1])["events"] == 7
    pub = tmp_path / "keys.json"
    pub.write_text(runner.invoke(app, ["audit", "public-keys"], env=cli_env).output)
    assert json.loads(pub.read_text())["keys"], "the key ring published its key"
    result = runner.invoke(
        app, ["audit", "verify", "--file", str(out), "--public-key", str(pub)], env=cli_env
    )
    assert result.exit_code == 0, result.output

    victim = rows(store)[1]
    sql(store, "UPDATE audit_events SET actor_subject = 'mallory' WHERE seq = 2")
    result = runner.invoke(app, ["audit", "verify"], env=cli_env)
    assert result.exit_code == 1
    assert "TAMPERED" in result.output
    assert f"seq 2 ({victim['id']})" in result.output
    assert "edited" in result.output
    result = runner.invoke(app, ["audit", "verify", "--json"], env=cli_env)
    assert json.loads(result.output)["findings"][0]["seq"] == 2


@pytest.mark.postgres
def test_two_replicas_sign_one_head_once(pg_url: str, signer: FileKeySigner) -> None:
    """Replicas checkpointing at the same moment on PostgreSQL record the head once, and the
    chain with its checkpoint verifies."""
    import threading

    from broker.store.migrate import upgrade

    upgrade(pg_url)
    replicas = [Database(pg_url) for _ in range(3)]
    append_events(replicas[0], 5)
    barrier = threading.Barrier(len(replicas))
    made: list[Any] = []

    def take(db: Database) -> None:
        barrier.wait()
        made.append(create_checkpoint(db, signer, now))

    threads = [threading.Thread(target=take, args=(db,)) for db in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([m for m in made if m is not None]) == 1
    with replicas[0].read() as conn:
        assert len(repo.audit_checkpoints(conn)) == 1
    report = verify_store(replicas[0], signer.public_keys())
    assert report.ok and report.checkpoints == 1 and report.events == 6
    for db in replicas:
        db.dispose()


def test_old_dedup_keys_are_forgotten_hourly(store: Database, signer: FileKeySigner) -> None:
    """Ingested record ids are kept for the retention period only (the table stays bounded),
    pruned by the checkpointer at most once an hour."""
    from broker.audit.checkpoints import Checkpointer

    clock = [1_000_000.0]
    with store.write() as conn:
        assert repo.remember_ingested(conn, "openbao", "old", clock[0] - 8 * 86_400)
        assert repo.remember_ingested(conn, "openbao", "new", clock[0] - 60)
    checkpointer = Checkpointer(store, signer, lambda: clock[0], 60, dedup_retention=7 * 86_400)
    assert checkpointer.prune() == 1
    with store.write() as conn:
        assert repo.remember_ingested(conn, "openbao", "old", clock[0])  # forgotten: new again
        assert not repo.remember_ingested(conn, "openbao", "new", clock[0])
        assert repo.remember_ingested(conn, "openbao", "older", clock[0] - 9 * 86_400)
    assert checkpointer.prune() == 0  # not again within the hour
    clock[0] += 3601
    assert checkpointer.prune() == 1


def _export(runner: CliRunner, env: dict[str, str], out: Path, *filters: str) -> list[str]:
    result = runner.invoke(
        app, ["audit", "export", "--store", "--out", str(out), *filters], env=env
    )
    assert result.exit_code == 0, result.output
    return out.read_text().splitlines()


def _verify_file(runner: CliRunner, env: dict[str, str], path: Path, *extra: str) -> Any:
    return runner.invoke(app, ["audit", "verify", "--file", str(path), *extra], env=env)


def test_a_filtered_export_verifies_offline_with_no_other_flag_and_an_edit_names_the_event(
    store: Database, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """One task's export (its events are not adjacent to the others in the chain) verifies with
    `broker audit verify --file` alone: it says it is a filtered export and how many links it
    could check, and calls nothing deleted. Editing one byte of one event makes it TAMPERED,
    naming that event's seq, id and name; removing an event line or the trailer is caught too."""
    runner = CliRunner()
    append_events(store, 12)
    assert runner.invoke(app, ["audit", "checkpoint"], env=cli_env).exit_code == 0
    append_events(store, 4, start=1_700_000_100.0)
    task = rows(store)[2]["task_id"]
    path = tmp_path / "task.jsonl"
    lines = _export(runner, cli_env, path, "--task", task)
    assert json.loads(lines[0])["filter"] == {"task": task}
    result = _verify_file(runner, cli_env, path)
    assert result.exit_code == 0, result.output
    # Seq 3, 4 and 16, 17: one link across a gap the filter left, two between neighbours.
    assert result.output.startswith(f"OK: 4 events (seq 3..17) in a filtered export (task={task})")
    assert "links: 2 between events adjacent in the chain checked; 1 gap (events" in result.output
    assert "deleted" not in result.output
    assert "keys: the ones the file carries" in result.output
    report = json.loads(_verify_file(runner, cli_env, path, "--json").output)
    assert report["export"]["kind"] == "filtered" and report["findings"] == []

    victim = json.loads(lines[1])
    lines_edited = list(lines)
    lines_edited[1] = lines[1].replace('"step ', '"Step ', 1)  # one byte of one event
    assert lines_edited[1] != lines[1]
    path.write_text("\n".join(lines_edited) + "\n")
    tampered = _verify_file(runner, cli_env, path)
    assert tampered.exit_code == 1
    assert tampered.output.startswith("TAMPERED")
    assert (
        f"edited             seq {victim['seq']} ({victim['id']}) {victim['name']}"
        in tampered.output
    )

    path.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    removed = json.loads(_verify_file(runner, cli_env, path, "--json").output)
    assert [f["kind"] for f in removed["findings"]] == ["deleted"]
    path.write_text("\n".join(lines[:-1]) + "\n")
    cut = json.loads(_verify_file(runner, cli_env, path, "--json").output)
    assert [f["kind"] for f in cut["findings"]] == ["truncated"]


def test_complete_exports_checkpoints_and_pinned_keys(
    store: Database, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """A complete export verifies every link and its signed checkpoint with the keys it carries;
    pinned to another key the checkpoint does not verify (TAMPERED: bad_checkpoint); an export of
    the checkpoints alone checks their signatures though the heads they sign are not in it; an
    older file without a header that does not start at the chain's genesis is read as filtered."""
    from cryptography.hazmat.primitives.asymmetric import ec

    runner = CliRunner()
    append_events(store, 6)
    assert runner.invoke(app, ["audit", "checkpoint"], env=cli_env).exit_code == 0
    append_events(store, 2, start=1_700_000_100.0)
    whole = tmp_path / "all.jsonl"
    _export(runner, cli_env, whole)
    ok = json.loads(_verify_file(runner, cli_env, whole, "--json").output)
    assert ok["ok"] and ok["checkpoints"] == 1 and ok["export"]["kind"] == "complete"
    stranger = tmp_path / "stranger.pub"
    stranger.write_text(FileKeySigner(ec.generate_private_key(ec.SECP256R1())).public_pem())
    pinned = _verify_file(runner, cli_env, whole, "--public-key", str(stranger))
    assert pinned.exit_code == 1 and "bad_checkpoint" in pinned.output

    only_checkpoints = tmp_path / "checkpoints.jsonl"
    _export(runner, cli_env, only_checkpoints, "--event", "checkpoint")
    report = json.loads(_verify_file(runner, cli_env, only_checkpoints, "--json").output)
    assert report["ok"] and report["checkpoints"] == 1
    assert report["export"]["checkpoints_beyond_file"] == 1

    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows(store)[2:5]))
    old = json.loads(_verify_file(runner, cli_env, legacy, "--json").output)
    assert old["ok"] and old["export"]["kind"] == "filtered" and not old["export"]["header"]
