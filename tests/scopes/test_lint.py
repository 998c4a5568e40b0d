"""Lint names file, line and field for every problem, and refuses what a backend cannot enforce."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.domain.vault_policies import ForbiddenPolicies
from broker.scopes.loader import LintProblem, ScopeCatalog, load_folder, parse_template

HEAD = """\
name: {name}
description: A template under test.
owner: tests
"""
REQUESTER = """\
requester:
  all:
    - claim: sub
      regex: ".+"
"""
VAULT = """\
backend:
  type: vault_token
  policies: [kv-read]
"""


def lint(tmp_path: Path, body: str, name: str = "tpl") -> list[LintProblem]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(HEAD.format(name=name) + body)
    _, problems = parse_template(path)
    return problems


def only(problems: list[LintProblem], severity: str = "error") -> LintProblem:
    found = [p for p in problems if p.severity == severity]
    assert len(found) == 1, [str(p) for p in problems]
    return found[0]


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    """A YAML error points at its line."""
    p = only(lint(tmp_path, VAULT + REQUESTER + "ttl: [unclosed\n"))
    assert (p.line, p.field) == (12, "(yaml)")
    assert str(p).startswith(f"{tmp_path / 'tpl.yaml'}:12: error: (yaml):")


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    """A second value for the same key is an error on the second key's line (no silent override)."""
    p = only(lint(tmp_path, VAULT + REQUESTER + "risk: low\nrisk: high\n"))
    assert p.line == 12 and "duplicate key 'risk'" in p.message


def test_schema_errors_name_line_and_field(tmp_path: Path) -> None:
    """A wrong type deep in the file names the dotted field and its line."""
    body = VAULT + REQUESTER + "ttl:\n  default: soon\n  max: 600\n"
    p = only(lint(tmp_path, body))
    assert (p.line, p.field, p.rule) == (12, "ttl.default", "schema")


def test_unknown_keys_and_list_items(tmp_path: Path) -> None:
    """Typos are refused (extra keys forbidden) and list positions are named."""
    body = VAULT + REQUESTER.replace("regex", "regexp")
    problems = lint(tmp_path, body)
    assert any(p.field == "requester.all[0].regexp" and p.line == 10 for p in problems)


def test_max_uses_on_a_backend_that_cannot_count(tmp_path: Path) -> None:
    """STS and database credentials cannot count uses: max_uses there is an error at its line."""
    body = (
        """\
backend:
  type: aws_sts
  role_arn: arn:aws:iam::123456789012:role/r
"""
        + REQUESTER
        + "ttl: {default: 900, max: 3600}\nmax_uses: 3\n"
    )
    p = only(lint(tmp_path, body))
    assert (p.line, p.field, p.rule) == (12, "max_uses", "backend-cannot-count-uses")
    db = "backend:\n  type: vault_database\n  role: ro\n" + REQUESTER + "max_uses: 3\n"
    assert only(lint(tmp_path, db)).rule == "backend-cannot-count-uses"
    ok = VAULT + REQUESTER + "max_uses: 3\n"
    assert lint(tmp_path, ok) == []


def test_sts_ttls_that_cannot_be_enforced(tmp_path: Path) -> None:
    """STS never issues for less than 900 s, nor longer than the role's maximum session."""
    sts = "backend:\n  type: aws_sts\n  role_arn: arn:aws:iam::123456789012:role/r\n  role_max_session: 3600\n"
    short = only(lint(tmp_path, sts + REQUESTER + "ttl: {default: 300, max: 3600}\n"))
    assert (short.field, short.rule, short.line) == ("ttl.default", "ttl-unenforceable", 12)
    long = only(lint(tmp_path, sts + REQUESTER + "ttl: {default: 900, max: 7200}\n"))
    assert (long.field, long.rule) == ("ttl.max", "ttl-unenforceable")


def test_placeholder_problems(tmp_path: Path) -> None:
    """Unknown names, malformed braces, optional parameters without default: each at its line."""
    body = (
        """\
backend:
  type: vault_token
  policies:
    - "team-{{params.team}}"
    - "{{params.nope}}"
  maximum:
    policies: ["team-*"]
parameters:
  team: {pattern: "[a-z]+"}
"""
        + REQUESTER
    )
    p = only(lint(tmp_path, body))
    assert (p.line, p.field, p.rule) == (8, "backend.policies[1]", "placeholder-unknown")
    broken = VAULT.replace("[kv-read]", '["team-{{ params.team }"]') + REQUESTER
    assert only(lint(tmp_path, broken)).field == "backend.policies[0]"  # refused by the schema
    tags = (
        "backend:\n  type: aws_sts\n  role_arn: arn:aws:iam::123456789012:role/r\n"
        "  tags:\n    team: '{{params.team}'\n"
        "parameters:\n  team: {pattern: '[a-z]+'}\n" + REQUESTER + "ttl: {default: 900, max: 900}\n"
    )
    p = only(lint(tmp_path, tags))
    assert (p.line, p.field, p.rule) == (8, "backend.tags.team", "placeholder-malformed")
    optional = (
        """\
backend:
  type: vault_database
  role: "{{params.db}}"
  maximum: {roles: ["app-*"]}
parameters:
  db: {required: false, pattern: "app-[a-z]+"}
"""
        + REQUESTER
    )
    assert only(lint(tmp_path, optional)).rule == "placeholder-optional"


def test_parameterised_settings_need_a_maximum(tmp_path: Path) -> None:
    """A parameter in a policy name, role or session policy needs a declared maximum."""
    body = (
        """\
backend:
  type: vault_token
  policies: ["team-{{params.team}}"]
parameters:
  team: {pattern: "[a-z]+"}
"""
        + REQUESTER
    )
    p = only(lint(tmp_path, body))
    assert (p.field, p.rule, p.line) == ("backend.policies", "maximum-missing", 6)
    sts = (
        """\
backend:
  type: aws_sts
  role_arn: arn:aws:iam::123456789012:role/r
  session_policy:
    Version: "2012-10-17"
    Statement:
      - Effect: Allow
        Action: s3:GetObject
        Resource: "arn:aws:s3:::{{params.bucket}}/*"
parameters:
  bucket: {pattern: "[a-z-]+"}
"""
        + REQUESTER
        + "ttl: {default: 900, max: 900}\n"
    )
    assert only(lint(tmp_path, sts)).rule == "maximum-missing"


def test_fixed_policy_parts_outside_the_maximum(tmp_path: Path) -> None:
    """The fixed actions of a session policy must already be within the maximum."""
    body = (
        """\
backend:
  type: aws_sts
  role_arn: arn:aws:iam::123456789012:role/r
  session_policy:
    Version: "2012-10-17"
    Statement:
      - Effect: Allow
        Action: [s3:GetObject, s3:DeleteObject]
        Resource: "arn:aws:s3:::data-{{params.b}}/*"
  maximum:
    actions: [s3:GetObject]
    resources: ["arn:aws:s3:::data-*/*"]
parameters:
  b: {pattern: "[a-z]+"}
"""
        + REQUESTER
        + "ttl: {default: 900, max: 900}\n"
    )
    p = only(lint(tmp_path, body))
    assert p.rule == "maximum-exceeded" and "s3:DeleteObject" in p.message
    assert p.field == "backend.session_policy" and p.line == 7


@pytest.mark.parametrize(
    ("statement", "words"),
    [
        (
            "      - Effect: Allow\n        NotAction: s3:DeleteObject\n        Resource: '*'\n",
            "NotAction",
        ),
        (
            "      - Effect: Allow\n        Principal: '*'\n        Action: s3:GetObject\n        Resource: '*'\n",
            "Principal",
        ),
        ("      - Effect: Maybe\n        Action: s3:GetObject\n        Resource: '*'\n", "Effect"),
        (
            "      - Effect: '{{params.b}}'\n        Action: s3:GetObject\n        Resource: '*'\n",
            "Effect",
        ),
    ],
)
def test_session_policy_shape(tmp_path: Path, statement: str, words: str) -> None:
    """A session policy STS would reject, or that would widen, is refused."""
    body = (
        "backend:\n  type: aws_sts\n  role_arn: arn:aws:iam::123456789012:role/r\n"
        "  session_policy:\n    Version: '2012-10-17'\n    Statement:\n"
        + statement
        + "  maximum: {actions: ['s3:*'], resources: ['*']}\n"
        + "parameters:\n  b: {enum: [Allow]}\n"
        + REQUESTER
        + "ttl: {default: 900, max: 900}\n"
    )
    errors = [p for p in lint(tmp_path, body) if p.severity == "error"]
    assert errors and any(words in p.message for p in errors), [str(p) for p in errors]


def test_forbidden_policies_are_found_in_any_spelling_vault_reads_alike(tmp_path: Path) -> None:
    """``Root`` is root to Vault, and so is an admin-forbidden name in other capitals: the
    loader refuses both (the catalog keeps such a template out), naming the normal form."""
    root = VAULT.replace("[kv-read]", "[kv-read, Root]") + REQUESTER
    p = only(lint(tmp_path, root))
    assert (p.rule, p.field) == ("forbidden-policy", "backend.policies[1]")
    assert "'root'" in p.message
    admin = VAULT.replace("[kv-read]", "[KV-Admin]") + REQUESTER
    assert not [p for p in lint(tmp_path, admin) if p.severity == "error"]
    folder = tmp_path / "scopes"
    folder.mkdir()
    (folder / "tpl.yaml").write_text(HEAD.format(name="tpl") + admin)
    catalog = ScopeCatalog(folder, forbidden_policies=ForbiddenPolicies.of(["kv-admin"]))
    assert catalog.all() == []
    [problem] = catalog.problems
    assert problem.rule == "forbidden-policy"


def test_root_policy_and_reserved_claims(tmp_path: Path) -> None:
    """The root policy can never be granted; a broker JWT template cannot set registered claims."""
    root = VAULT.replace("[kv-read]", "[kv-read, root]") + REQUESTER
    assert only(lint(tmp_path, root)).rule == "forbidden-policy"
    jwt = "backend:\n  type: broker_jwt\n  audience: svc\n  claims: {sub: admin}\n" + REQUESTER
    p = only(lint(tmp_path, jwt))
    assert (p.rule, p.field) == ("reserved-claim", "backend.claims.sub")


def test_defaults_must_satisfy_their_parameter(tmp_path: Path) -> None:
    """A default that its own pattern or enum refuses is an error at the default's line."""
    body = VAULT + "parameters:\n  env:\n    enum: [dev, prod]\n    default: staging\n" + REQUESTER
    p = only(lint(tmp_path, body))
    assert (p.field, p.line, p.rule) == ("parameters.env.default", 10, "default-invalid")


def test_warnings_do_not_refuse(tmp_path: Path) -> None:
    """Unused parameters, unconstrained strings and open requesters are warnings only."""
    body = VAULT + "parameters:\n  note: {}\nrequester:\n  all:\n    - cel: 'true'\n"
    path = tmp_path / "tpl.yaml"
    path.write_text(HEAD.format(name="tpl") + body)
    loaded, problems = parse_template(path)
    assert loaded is not None
    assert {p.rule for p in problems} == {"param-unused", "requester-open"}
    assert all(p.severity == "warning" for p in problems)


def test_the_name_must_match_the_file(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text(HEAD.format(name="tpl") + VAULT + REQUESTER)
    _, problems = parse_template(path)
    assert [(p.field, p.line) for p in problems] == [("name", 1)]


def test_a_folder_with_a_broken_file_serves_the_rest(tmp_path: Path) -> None:
    """One bad template is skipped and reported; the others load. Duplicates load neither."""
    (tmp_path / "good.yaml").write_text(HEAD.format(name="good") + VAULT + REQUESTER)
    (tmp_path / "bad.yaml").write_text(HEAD.format(name="bad") + REQUESTER)
    (tmp_path / "twin.yaml").write_text(HEAD.format(name="twin") + VAULT + REQUESTER)
    (tmp_path / "twin.yml").write_text(HEAD.format(name="twin") + VAULT + REQUESTER)
    templates, problems = load_folder(tmp_path)
    assert set(templates) == {"good"}
    assert {(Path(p.file).name, p.field) for p in problems} == {
        ("bad.yaml", "backend"),
        ("twin.yml", "name"),
    }


def test_the_catalog_reloads_and_hashes_meaning(tmp_path: Path) -> None:
    """An edit is picked up without restart; a comment does not change the content hash,
    a changed value does; a file broken by an edit is withdrawn, not kept in its old version."""
    path = tmp_path / "tpl.yaml"
    path.write_text(HEAD.format(name="tpl") + VAULT + REQUESTER)
    catalog = ScopeCatalog(tmp_path, check_interval=0)
    first = catalog.get("tpl").content_hash
    path.write_text("# a comment\n" + path.read_text())
    assert catalog.get("tpl").content_hash == first
    path.write_text(path.read_text().replace("kv-read", "kv-write"))
    assert catalog.get("tpl").content_hash != first
    path.write_text(path.read_text().replace("owner: tests\n", ""))
    assert catalog.all() == []
    assert catalog.problems[0].field == "owner"


def test_sharing_across_sessions_is_explicit_and_warned_for_manual_scopes(tmp_path: Path) -> None:
    """``share`` is ``session`` or ``principal`` (anything else is a schema error); a manual
    scope shared across the requester's sessions is a warning (an approval for one request then
    serves every session of the requester), an automatic one is clean."""
    manual = (
        "approval:\n  mode: manual\n  count: 1\n  approvers:\n    all: [{claim: sub, regex: x}]\n"
    )
    shared = lint(tmp_path, VAULT + REQUESTER + "risk: medium\nshare: principal\n" + manual)
    warning = only(shared, "warning")
    assert (warning.rule, warning.field) == ("share-principal", "share")
    assert lint(tmp_path, VAULT + REQUESTER + "share: principal\n") == []
    bad = only(lint(tmp_path, VAULT + REQUESTER + "share: everyone\n"))
    assert bad.field == "share"


def test_the_share_default_keeps_older_hashes(tmp_path: Path) -> None:
    """A template that does not say ``share`` hashes as before the field existed (its tasks'
    approvals stay valid across the upgrade); saying ``share: session`` changes nothing, saying
    ``principal`` changes the hash."""
    import hashlib

    from broker.domain.audit import canonical_json

    path = tmp_path / "tpl.yaml"
    path.write_text(HEAD.format(name="tpl") + VAULT + REQUESTER)
    loaded, _ = parse_template(path)
    assert loaded is not None
    before = loaded.template.model_dump(mode="json")
    del before["share"]
    assert loaded.content_hash == hashlib.sha256(canonical_json(before)).hexdigest()
    path.write_text(path.read_text() + "share: session\n")
    same, _ = parse_template(path)
    assert same is not None and same.content_hash == loaded.content_hash
    path.write_text(path.read_text().replace("share: session", "share: principal"))
    other, _ = parse_template(path)
    assert other is not None and other.content_hash != loaded.content_hash


def test_a_misspelled_field_gets_a_did_you_mean(tmp_path: Path) -> None:
    """An unknown field is named with the closest known one at that place, in plain words; the
    required field it was meant to be is reported missing with the misspelling beside it."""
    body = "backend:\n  type: vault_token\n  polices: [kv-read]\n" + REQUESTER
    problems = {p.field: p for p in lint(tmp_path, body)}
    assert problems["backend.polices"].message == (
        "unknown field 'polices'; did you mean 'policies'?"
    )
    assert problems["backend.polices"].line == 6
    assert problems["backend.policies"].message == (
        "the field 'policies' is required but missing (is 'polices' a misspelling of it?)"
    )
    nested = lint(tmp_path, VAULT + "requester:\n  all:\n    - clam: sub\n      regex: '.+'\n")
    assert [p.message for p in nested if p.field == "requester.all[0].clam"] == [
        "unknown field 'clam'; did you mean 'claim'?"
    ]
    far = lint(tmp_path, VAULT + REQUESTER + "zzz: 1\n")
    assert "did you mean" not in far[0].message and "known here: name" in far[0].message


@pytest.mark.parametrize("pattern", [".*", ".+", "[\\s\\S]*", ".{1,64}", "(.*)"])
def test_a_pattern_that_matches_everything_is_warned_about(tmp_path: Path, pattern: str) -> None:
    """A parameter pattern that admits almost any value is no constraint: it is warned about
    like a missing pattern (param-unconstrained), on the pattern's line."""
    body = (
        "backend:\n  type: vault_token\n  policies: ['kv-{{params.team}}']\n"
        "  maximum: {policies: ['kv-*']}\n"
        f"parameters:\n  team:\n    pattern: '{pattern}'\n    max_length: 20\n" + REQUESTER
    )
    warning = only(lint(tmp_path, body), "warning")
    assert (warning.rule, warning.field, warning.line) == (
        "param-unconstrained",
        "parameters.team.pattern",
        10,
    )
    assert "matches almost anything" in warning.message
    tight = body.replace(f"'{pattern}'", "'[a-z]{2,20}'")
    assert not [p for p in lint(tmp_path, tight) if p.rule == "param-unconstrained"]
