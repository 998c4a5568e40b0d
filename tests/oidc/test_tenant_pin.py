"""`trust_mode: audit` never opens the tenant pin, and an issuer entry cannot leave it out.

The conditions that pin a multi-tenant preset's tenant (GitHub owner or repository, GitLab
namespace or project, Kubernetes namespace) are enforced in every trust mode; audit mode only
relaxes the rules on top. A configuration naming a multi-tenant issuer without its preset (so
without the pin) refuses to load. Proven on the verifier and against a real `broker serve`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.errors import ConfigurationError
from broker.oidc.errors import TokenRefused
from broker.oidc.presets import tenant_pin
from broker.settings import IssuerConfig, load_settings
from broker.store import Database, repo
from tests.oidc.conftest import MakeVerifier
from tests.oidc.test_presets import github_claims
from tests.oidc.tokens import FakeTime, forge
from tests.support.issuer import TestIssuer
from tests.support.serve import serve

pytestmark = pytest.mark.integration

#: Pinned to one owner (the tenant) and, on top, to main and push events (rolled out in audit).
GITHUB_TRUST = {
    "all": [
        {"claim": "repository_owner_id", "equals": "7"},
        {"claim": "ref", "equals": "refs/heads/main"},
    ],
    "none": [{"claim": "event_name", "equals": "pull_request"}],
}


def github_issuer(idp: TestIssuer, **kw: Any) -> dict[str, Any]:
    return idp.issuer_config(
        preset="github-actions", algorithms=["ES256"], trust=GITHUB_TRUST, **kw
    )


def test_the_pin_is_the_pinning_part_of_the_rules() -> None:
    """The pin holds the conditions that pin the tenant and nothing else: the owner id, not the
    branch; an ``any`` whose every branch pins; nothing for a generic issuer."""
    pin = IssuerConfig(
        name="gh", preset="github-actions", audiences=["broker"], trust=GITHUB_TRUST
    ).tenant_pin
    assert pin is not None
    assert [c.claim for c in pin.all] == ["repository_owner_id"] and pin.any == ()
    issuer = IssuerConfig(
        name="gl",
        preset="gitlab-ci",
        audiences=["broker"],
        trust={
            "all": [{"claim": "ref_protected", "equals": "true"}],
            "any": [
                {"claim": "namespace_id", "equals": "42"},
                {"claim": "project_path", "glob": "acme/*"},
            ],
        },
    )
    assert issuer.tenant_pin is not None
    assert issuer.tenant_pin.all == () and len(issuer.tenant_pin.any) == 2
    assert tenant_pin("generic", issuer.trust) is None


def test_audit_mode_never_admits_another_tenant(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """In audit mode a token of the pinned owner that breaks the rules on top (another branch,
    a pull request) is admitted and marked would-deny; a token of another owner is refused as
    untrusted, on the main branch too, with the pin named for the operator only."""
    verifier = make_verifier(github_issuer(idp, trust_mode="audit"))
    key = idp.keys[0]

    def tok(**over: Any) -> str:
        return forge(
            {"alg": "ES256", "kid": key.kid}, github_claims(idp, fake_time.wall, **over), key=key
        )

    assert not verifier.verify(tok()).trust.audit_only_denial
    for rule_breaker in ({"ref": "refs/heads/feature"}, {"event_name": "pull_request"}):
        verified = verifier.verify(tok(**rule_breaker))
        assert verified.trust.audit_only_denial
    for other_tenant in ({"repository_owner_id": "8"}, {"repository_owner_id": "8", "ref": "x"}):
        with pytest.raises(TokenRefused) as info:
            verifier.verify(tok(**other_tenant))
        assert info.value.code == "untrusted_token"
        assert "repository_owner_id" not in info.value.detail
        assert info.value.internal and info.value.internal.startswith("tenant pin:")


@pytest.mark.parametrize(
    ("url", "preset"),
    [
        ("https://token.actions.githubusercontent.com", "github-actions"),
        ("https://token.actions.githubusercontent.com/acme-enterprise", "github-actions"),
        ("https://gitlab.com", "gitlab-ci"),
        ("https://oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE", "kubernetes"),
    ],
)
def test_a_multi_tenant_issuer_without_its_preset_refuses_to_start(
    tmp_path: Path, url: str, preset: str
) -> None:
    """An entry for GitHub's, gitlab.com's or an EKS cluster's issuer with the generic preset
    would trust every tenant's tokens without a pin: the broker refuses to start, naming the
    preset to use; with that preset (and a pin) it starts."""
    entry = {"name": "ci", "issuer": url, "audiences": ["broker"]}
    with pytest.raises(ConfigurationError, match=f"preset: {preset}"):
        load_settings(issuers=[entry], signing_key_file=tmp_path / "k.pem")
    pins = {
        "github-actions": {"claim": "repository_owner_id", "equals": "7"},
        "gitlab-ci": {"claim": "namespace_id", "equals": "42"},
        "kubernetes": {"claim": "kubernetes.io.namespace", "equals": "agents"},
    }
    settings = load_settings(
        issuers=[{**entry, "preset": preset, "trust": {"all": [pins[preset]]}}],
        signing_key_file=tmp_path / "k.pem",
    )
    assert settings.issuers[0].tenant_pin is not None


def test_a_running_broker_in_audit_mode_refuses_another_tenant(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """Against `broker serve` with a GitHub issuer in audit mode: the pinned owner's token on a
    feature branch opens a session recorded as would-deny; another owner's token on main is
    refused (400 untrusted_token) and the refusal is audited with the pin as the reason."""
    with (
        serve(tmp_path, issuer, issuers=[github_issuer(issuer, trust_mode="audit")]) as node,
        httpx.Client(base_url=node.urls[0], timeout=30) as client,
    ):

        def exchange(**over: Any) -> httpx.Response:
            claims = github_claims(issuer, 0, **over)
            for name in ("iss", "aud", "iat", "exp", "nbf", "sub", "jti"):
                claims.pop(name, None)
            token = issuer.token("repo:acme/api:ref:refs/heads/main", **claims)
            return client.post(
                "/oauth2/token",
                data={
                    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                    "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
                    "subject_token": token,
                },
            )

        relaxed = exchange(ref="refs/heads/feature")
        assert relaxed.status_code == 200, relaxed.text
        foreign = exchange(repository_owner_id="8", repository_owner="evil")
        assert (foreign.status_code, foreign.json()["code"]) == (400, "untrusted_token")

        db = Database(f"sqlite:///{tmp_path / 'broker.db'}")
        try:
            with db.read() as conn:
                starts = repo.audit_events(conn, name="broker.session.start")
                failures = repo.audit_events(conn, name="broker.auth.failure")
        finally:
            db.dispose()
        assert [e["attributes"].get("broker.trust.would_deny") for e in starts] == [True]
        assert len(failures) == 1
        assert failures[0]["attributes"]["broker.auth.reason"] == "untrusted_token"
        assert failures[0]["attributes"]["broker.auth.detail"].startswith("tenant pin:")
