"""`broker scopes schema|lint|test`: what admins run locally and in their CI."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from typer.testing import CliRunner

from broker.cli.main import app

REPO = Path(__file__).resolve().parents[2]
SCOPES = REPO / "scopes"
runner = CliRunner()


def test_schema_is_a_valid_json_schema() -> None:
    """`broker scopes schema` prints a Draft 2020-12 schema that names every top-level field."""
    result = runner.invoke(app, ["scopes", "schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema")
    assert {"name", "backend", "parameters", "requester", "approval", "limits", "share"} <= set(
        schema["properties"]
    )
    assert schema["properties"]["share"]["enum"] == ["session", "principal"]


def test_lint_is_clean_on_the_examples() -> None:
    result = runner.invoke(app, ["scopes", "lint", "--strict", "-v", str(SCOPES)])
    assert result.exit_code == 0, result.output
    assert "ok aws-deploy" in result.stdout


def test_lint_reports_file_line_and_field(tmp_path: Path) -> None:
    """An error line reads file:line: severity: field: message [rule]; the exit status is 1."""
    bad = tmp_path / "bad-one.yaml"
    text = (SCOPES / "postgres-readonly.yaml").read_text().replace("postgres-readonly", "bad-one")
    bad.write_text(text.replace("max_active_tasks: 3", "max_active_tasks: 3\nmax_uses: 2"))
    line = next(
        i for i, t in enumerate(bad.read_text().splitlines(), 1) if t.startswith("max_uses")
    )
    result = runner.invoke(app, ["scopes", "lint", str(tmp_path)])
    assert result.exit_code == 1
    assert (
        f"{bad}:{line}: error: max_uses: the vault_database backend cannot count uses; "
        "remove max_uses [backend-cannot-count-uses]"
    ) in result.stdout
    as_json = runner.invoke(app, ["scopes", "lint", "--format", "json", str(bad)])
    assert json.loads(as_json.stdout)[0]["line"] == line


def test_warnings_fail_only_when_strict(tmp_path: Path) -> None:
    (tmp_path / "loose.yaml").write_text(
        "name: loose\ndescription: d\nowner: o\nbackend: {type: vault_token, policies: [kv-read]}\n"
        "parameters: {note: {}}\nrequester: {all: [{claim: sub, regex: '.+'}]}\n"
    )
    assert runner.invoke(app, ["scopes", "lint", str(tmp_path)]).exit_code == 0
    strict = runner.invoke(app, ["scopes", "lint", "--strict", str(tmp_path)])
    assert strict.exit_code == 1 and "param-unused" in strict.stdout


def test_policy_tests_pass_on_the_examples() -> None:
    """The example policy tests (scopes/tests/examples.yaml) all pass."""
    result = runner.invoke(
        app, ["scopes", "test", str(SCOPES / "tests" / "examples.yaml"), "--dir", str(SCOPES)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("PASS") == 15


def test_a_failing_policy_test_fails_the_run(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "cases:\n  - name: contractors get in\n    scope: postgres-readonly\n"
        "    claims: {sub: x, groups: [contractors]}\n    expect: approved\n"
    )
    result = runner.invoke(app, ["scopes", "test", str(cases), "--dir", str(SCOPES)])
    assert result.exit_code == 1
    assert "FAIL" in result.stdout and "expected approved, got denied" in result.stdout


def test_one_adhoc_evaluation() -> None:
    """--scope with claims and params prints the decision and the rendered backend."""
    result = runner.invoke(
        app,
        [
            "scopes",
            "test",
            "--dir",
            str(SCOPES),
            "--scope",
            "aws-s3-read",
            "--claim",
            "sub=dev-1",
            "--param",
            "bucket=example-data-logs",
            "--param",
            "prefix=a/b",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["outcome"] == "approved"
    assert out["rendered"]["session_policy"]["Statement"][1]["Resource"] == (
        "arn:aws:s3:::example-data-logs/a/b/*"
    )
    typed = runner.invoke(
        app,
        [
            "scopes",
            "test",
            "--dir",
            str(SCOPES),
            "--scope",
            "postgres-readwrite",
            "--claim",
            "sub=d",
            "--claim",
            'groups:=["developers"]',
            "--approver",
            "sub=d",
            "--json",
        ],
    )
    assert json.loads(typed.stdout)["approver"] == "self"


def test_scopes_test_can_assert_the_expected_outcome() -> None:
    """--expect makes one evaluation a check: exit 0 when the broker would decide so, 1 (saying
    what it got) when not; human output by default."""
    args = ["scopes", "test", "--dir", str(SCOPES), "--scope", "postgres-readonly"]
    ok = runner.invoke(app, [*args, "--claim", "groups=developers", "--expect", "approved"])
    assert ok.exit_code == 0, ok.output
    assert "outcome             approved" in ok.stdout
    wrong = runner.invoke(app, [*args, "--claim", "groups=contractors", "--expect", "approved"])
    assert wrong.exit_code == 1
    assert "FAIL: expected approved, got denied" in wrong.output
    bad = runner.invoke(app, [*args, "--expect", "maybe"])
    assert bad.exit_code == 2


def test_scopes_check_offline_lists_what_each_backend_needs() -> None:
    """Offline, `scopes check` lints and lists each template's prerequisites with what to create
    (exit 0: nothing was checked yet); --json gives the same as data."""
    result = runner.invoke(app, ["scopes", "check", str(SCOPES)])
    assert result.exit_code == 0, result.output
    assert "vault-kv-read  (vault_token" in result.stdout
    assert "needs    OpenBao/Vault has the ACL policy 'kv-read', granting no sudo" in result.stdout
    assert "create: bao policy write kv-read" in result.stdout
    assert "the IAM role arn:aws:iam::123456789012:role/broker-deploy trusts the broker" in (
        result.stdout
    )
    data = json.loads(runner.invoke(app, ["scopes", "check", str(SCOPES), "--json"]).stdout)
    names = {c["scope"] for c in data["checks"]}
    assert names == {p.stem for p in SCOPES.glob("*.yaml")}
    assert all(r["status"] == "unchecked" for c in data["checks"] for r in c["requirements"])
