"""Trust rules, audit-only mode, roles from claims, and configuration errors that name file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.errors import ConfigurationError
from broker.oidc.errors import TokenRefused
from broker.settings import load_settings
from tests.oidc.conftest import MakeVerifier
from tests.oidc.tokens import FakeTime, claims_for, forge
from tests.support.issuer import TestIssuer

pytestmark = pytest.mark.integration


def tok(idp: TestIssuer, now: float, **claims: Any) -> str:
    key = idp.keys[0]
    return forge({"alg": "ES256", "kid": key.kid}, claims_for(idp, now, **claims), key=key)


@pytest.mark.parametrize(
    ("condition", "value", "ok"),
    [
        ({"equals": "main"}, "main", True),
        ({"equals": "main"}, "Main", False),
        ({"one_of": ["main", "dev"]}, "dev", True),
        ({"glob": "feature/*"}, "feature/x", True),
        ({"glob": "feature/*"}, "feature/x/y", False),  # * stops at /
        ({"glob": "feature/**"}, "feature/x/y", True),
        ({"glob": "release-?"}, "release-1", True),
        ({"glob": "release-?"}, "release-10", False),
        ({"glob": "v[1]"}, "v1", False),  # brackets are literal
        ({"regex": "main"}, "not-main-branch", False),  # always anchored
        ({"regex": "main|dev"}, "maintenance", False),
        ({"regex": "release-[0-9]+"}, "release-12", True),
    ],
)
def test_claim_conditions(
    idp: TestIssuer,
    make_verifier: MakeVerifier,
    fake_time: FakeTime,
    condition: dict[str, Any],
    value: str,
    ok: bool,
) -> None:
    """Exact, glob (documented dialect) and fully anchored regex conditions on a claim."""
    verifier = make_verifier(idp.issuer_config(trust={"all": [{"claim": "branch", **condition}]}))
    token = tok(idp, fake_time.wall, branch=value)
    if ok:
        verifier.verify(token)
    else:
        with pytest.raises(TokenRefused) as info:
            verifier.verify(token)
        assert info.value.code == "untrusted_token"
        assert "branch" not in info.value.detail  # the caller is not told the policy
        assert info.value.internal and "branch" in info.value.internal  # the operator is


def test_cel_conditions(idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime) -> None:
    """CEL (cel-python) sees the claims; a runtime error (missing claim) is a non-match."""
    verifier = make_verifier(
        idp.issuer_config(
            trust={"all": [{"cel": 'claims.team in ["infra", "data"] && claims.level >= 2'}]}
        )
    )
    verifier.verify(tok(idp, fake_time.wall, team="infra", level=3))
    for claims in ({"team": "infra", "level": 1}, {"team": "sales", "level": 5}, {"level": 9}):
        with pytest.raises(TokenRefused, match="trust rules"):
            verifier.verify(tok(idp, fake_time.wall, **claims))


def test_audit_mode_admits_but_reports(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """In audit mode a token the rules would deny is admitted, and the decision says so."""
    verifier = make_verifier(
        idp.issuer_config(trust={"all": [{"claim": "team", "equals": "infra"}]}, trust_mode="audit")
    )
    denied = verifier.verify(tok(idp, fake_time.wall, team="sales"))
    assert denied.trust.audit_only_denial
    assert "team" in denied.trust.verdict.reason
    assert not verifier.verify(tok(idp, fake_time.wall, team="infra")).trust.audit_only_denial


def test_roles_from_configuration_and_claims(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """Roles = the issuer's base roles + known role names in the role claim + role rules.
    Unknown role names in the claim grant nothing."""
    verifier = make_verifier(
        idp.issuer_config(
            roles=[],
            claims={
                "roles": "broker_roles",
                "role_rules": [
                    {"role": "approver", "when": {"all": [{"claim": "groups", "equals": "sre"}]}},
                    {"role": "agent", "when": {"all": [{"cel": "claims.bot == true"}]}},
                ],
            },
        )
    )

    def roles(**claims: Any) -> frozenset[str]:
        return verifier.verify(tok(idp, fake_time.wall, **claims)).principal.roles

    assert roles() == frozenset()
    assert roles(groups=["dev", "sre"]) == {"approver"}
    assert roles(bot=True) == {"agent"}
    assert roles(broker_roles=["auditor", "root", "superuser"]) == {"auditor"}
    assert roles(broker_roles="admin", groups="sre") == {"admin", "approver"}
    principal = verifier.verify(tok(idp, fake_time.wall, groups=["sre"], name="Ann")).principal
    assert principal.has_role("approver")
    assert not principal.has_role("agent")
    assert principal.display_name == "Ann"
    assert principal.groups == ("sre",)


def test_persons_from_the_person_claims(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """``claims.person`` names who the holder is, case-folded: an e-mail only when
    ``email_verified`` is true (the string "true" too), any other claim as it is; none named
    means None (identity rule), named but absent means no person (an empty tuple)."""
    verifier = make_verifier(idp.issuer_config(claims={"person": ["email", "employee_id"]}))

    def persons(**claims: Any) -> tuple[str, ...] | None:
        return verifier.verify(tok(idp, fake_time.wall, **claims)).principal.persons

    assert persons(email="Ann@Corp.Example", email_verified=True) == ("ann@corp.example",)
    assert persons(email="ann@corp.example", email_verified="true", employee_id=1234) == (
        "ann@corp.example",
        "1234",
    )
    assert persons(email="ann@corp.example") == ()
    assert persons(email="ann@corp.example", email_verified=False, employee_id="E-7") == ("e-7",)
    assert persons(employee_id=True) == ()
    plain = make_verifier(idp.issuer_config(name="plain"))
    assert (
        plain.verify(tok(idp, fake_time.wall, email="a@b", email_verified=True)).principal.persons
        is None
    )


def test_run_identity_from_the_run_claims(idp: TestIssuer) -> None:
    """The run identity is a digest of every configured run claim (numbers and strings alike),
    different per run and attempt, and absent when any claim is missing or none is configured."""
    from broker.oidc.trust import run_identity_of
    from broker.settings import IssuerConfig

    config = IssuerConfig(**idp.issuer_config(claims={"run_identity": ["run_id", "run_attempt"]}))
    one = run_identity_of(config, {"run_id": 42, "run_attempt": "1"})
    assert one is not None and len(one) == 64
    assert one == run_identity_of(config, {"run_id": "42", "run_attempt": 1})
    assert one != run_identity_of(config, {"run_id": 42, "run_attempt": "2"})
    assert run_identity_of(config, {"run_id": 42}) is None
    assert run_identity_of(config, {"run_id": 42, "run_attempt": True}) is None
    assert run_identity_of(IssuerConfig(**idp.issuer_config()), {"run_id": 42}) is None
    pod = IssuerConfig(
        name="k",
        preset="kubernetes",
        issuer="https://k8s.example",
        audiences=["broker"],
        trust={"all": [{"claim": "kubernetes.io.namespace", "equals": "agents"}]},
    )
    claims = {"kubernetes.io": {"namespace": "agents", "pod": {"uid": "1-2-3"}}}
    assert run_identity_of(pod, claims) is not None
    assert run_identity_of(pod, {"kubernetes.io": {"namespace": "agents"}}) is None


def test_subject_from_another_claim(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """The subject can come from a nested claim; a missing or non-string one is refused."""
    verifier = make_verifier(idp.issuer_config(claims={"subject": "ext.id"}))
    assert verifier.verify(tok(idp, fake_time.wall, ext={"id": "u-1"})).principal.subject == "u-1"
    for claims, reason in [({}, "missing_claim"), ({"ext": {"id": 5}}, "invalid_claim")]:
        with pytest.raises(TokenRefused) as info:
            verifier.verify(tok(idp, fake_time.wall, **claims))
        assert info.value.code == reason


# --- configuration errors ----------------------------------------------------------------------

CONFIG = """\
dev_mode: true
issuers:
  - name: corp
    issuer: https://idp.example.com
    audiences: [broker]
    trust:
      all:
        - claim: team
          equals: infra

        - {bad}
"""


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('claim: branch\n          regex: "release-(["', "invalid regular expression"),
        ('cel: "claims.team =="', "invalid CEL expression"),
        ("claim: branch\n          glob: x\n          equals: y", "exactly one of"),
    ],
)
def test_trust_rule_errors_name_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str, message: str
) -> None:
    """A trust rule that does not compile stops the broker with the file and line of the rule."""
    config = tmp_path / "broker.yaml"
    config.write_text(CONFIG.format(bad=bad))
    monkeypatch.setenv("BROKER_CONFIG", str(config))
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert f"{config}:11: issuers.0.trust.all.1" in info.value.detail
    assert message in info.value.detail


def test_preset_errors_name_the_issuer_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unpinned GitHub issuer is refused at the line of its entry."""
    config = tmp_path / "broker.yaml"
    config.write_text(
        "dev_mode: true\nissuers:\n  - name: corp\n    issuer: https://idp.example.com\n"
        "    audiences: [broker]\n  - name: gh\n    preset: github-actions\n"
        "    audiences: [broker]\n"
    )
    monkeypatch.setenv("BROKER_CONFIG", str(config))
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert f"{config}:6: issuers.1" in info.value.detail
    assert "must pin one" in info.value.detail


def test_errors_from_the_environment_do_not_blame_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When BROKER_ISSUERS overrides the file, the error names no file line."""
    config = tmp_path / "broker.yaml"
    config.write_text(CONFIG.format(bad='claim: x\n          regex: "("'))
    monkeypatch.setenv("BROKER_CONFIG", str(config))
    monkeypatch.setenv(
        "BROKER_ISSUERS",
        '[{"name": "x", "issuer": "https://i.example", "audiences": ["b"], '
        '"trust": {"all": [{"claim": "a", "regex": "("}]}}]',
    )
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert str(config) not in info.value.detail
    assert "invalid regular expression" in info.value.detail


@pytest.mark.parametrize(
    ("issuer", "message"),
    [
        ({"issuer": "http://idp.example.com"}, "not loopback"),
        ({"issuer": "https://idp.example.com?x=1"}, "without query"),
        ({"issuer": "https://user@idp.example.com"}, "user info"),
        ({"issuer": "idp.example.com"}, "absolute https URL"),
        ({"jwks_uri": "http://keys.example.com/jwks"}, "not loopback"),
        ({"leeway": 61}, "less than or equal to 60"),
        ({"algorithms": ["ES256", "none"]}, "only asymmetric"),
        ({"algorithms": ["HS256"]}, "only asymmetric"),
        ({"jwks_refresh": 600, "jwks_max_stale": 300}, "longer than jwks_refresh"),
        ({"jwks_uri": "https://k.example/jwks", "jwks_file": "/k.json"}, "not both"),
        ({"roles": ["root"]}, "roles"),
        ({"claims": {"role_rules": [{"role": "admin", "when": {}}]}}, "at least one condition"),
        ({"audiences": []}, "at least 1"),
        ({"audiences": [""]}, "non-empty"),
    ],
)
def test_issuer_settings_refused(issuer: dict[str, Any], message: str) -> None:
    """Even in dev mode: plain http only on loopback, exact URLs, asymmetric algorithms only,
    leeway at most 60 s, coherent key-cache timings, known roles, non-empty rule sets."""
    values = {"name": "corp", "issuer": "https://idp.example.com", "audiences": ["broker"]}
    with pytest.raises(ConfigurationError, match=message):
        load_settings(dev_mode=True, issuers=[{**values, **issuer}])


def test_loopback_http_issuer_is_fine_in_dev_mode() -> None:
    """A local issuer over http is accepted in dev mode (and only there)."""
    settings = load_settings(
        dev_mode=True,
        issuers=[{"name": "dev", "issuer": "http://127.0.0.1:9000", "audiences": ["broker"]}],
    )
    assert settings.issuers[0].issuer == "http://127.0.0.1:9000"
