"""Presets: defaults for GitHub Actions, GitLab CI, Kubernetes and generic issuers, tenant pinning
enforced when the configuration loads, and tokens shaped like the real ones verified end to end."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from broker.oidc.errors import TokenRefused
from broker.oidc.presets import PRESETS
from broker.settings import IssuerConfig
from tests.oidc.conftest import MakeVerifier
from tests.oidc.tokens import FakeTime, claims_for, forge
from tests.support.issuer import TestIssuer, new_key

pytestmark = pytest.mark.integration


def conf(preset: str, trust: dict[str, Any] | None, **kw: Any) -> IssuerConfig:
    values: dict[str, Any] = {"name": "x", "preset": preset, "audiences": ["broker"], **kw}
    if trust is not None:
        values["trust"] = trust
    if PRESETS[preset].issuer is None:
        values.setdefault("issuer", "https://kubernetes.example.com")
    return IssuerConfig(**values)


def test_github_defaults() -> None:
    """The GitHub preset fills in GitHub's issuer, RS256, its claim names and required claims."""
    issuer = conf("github-actions", {"all": [{"claim": "repository_owner", "equals": "acme"}]})
    assert issuer.issuer == "https://token.actions.githubusercontent.com"
    assert issuer.algorithms == ["RS256"]
    assert issuer.claims.display_name == "job_workflow_ref"
    assert issuer.claims.groups is None
    assert "repository_owner_id" in issuer.required_claims
    assert issuer.roles == ["agent"]


def test_presets_name_the_run_and_the_person() -> None:
    """GitHub's run is run_id + run_attempt and its person the actor; GitLab's run is the
    pipeline's job and its person the user; a Kubernetes run is the pod; a generic issuer names
    neither unless told. An entry's own claim mapping keeps the preset's run and person."""
    pin = {"all": [{"claim": "repository_owner", "equals": "acme"}]}
    github = conf("github-actions", pin, claims={"roles": "broker_roles"})
    assert github.claims.run_identity == ["run_id", "run_attempt"]
    assert github.claims.person == ["actor"]
    gitlab = conf("gitlab-ci", {"all": [{"claim": "namespace_id", "equals": "1"}]})
    assert (gitlab.claims.run_identity, gitlab.claims.person) == (
        ["pipeline_id", "job_id"],
        ["user_login"],
    )
    k8s = conf("kubernetes", {"all": [{"claim": "kubernetes.io.namespace", "equals": "a"}]})
    assert (k8s.claims.run_identity, k8s.claims.person) == (["kubernetes.io.pod.uid"], [])
    generic = conf("generic", None, issuer="https://idp.example.com", claims={"person": "email"})
    assert (generic.claims.run_identity, generic.claims.person) == ([], ["email"])


def test_explicit_values_win_over_the_preset() -> None:
    """What the entry says wins: a GitHub Enterprise issuer URL, another display claim."""
    issuer = conf(
        "github-actions",
        {"all": [{"claim": "repository_owner", "equals": "acme"}]},
        issuer="https://token.actions.githubusercontent.com/acme-enterprise",
        claims={"display_name": "repository"},
    )
    assert issuer.issuer.endswith("/acme-enterprise")
    assert issuer.claims.display_name == "repository"
    assert issuer.claims.subject == "sub"  # the rest of the preset's mapping stays


PINNED = [
    ("github-actions", {"all": [{"claim": "repository_owner", "equals": "acme"}]}),
    ("github-actions", {"all": [{"claim": "repository_owner_id", "one_of": ["1", "2"]}]}),
    ("github-actions", {"all": [{"claim": "repository", "glob": "acme/*"}]}),
    ("github-actions", {"all": [{"claim": "repository", "regex": "acme/(api|web)"}]}),
    ("github-actions", {"all": [{"claim": "sub", "glob": "repo:acme/*:ref:refs/heads/main"}]}),
    (
        "github-actions",
        {
            "any": [
                {"claim": "repository", "equals": "acme/api"},
                {"claim": "repository_id", "equals": "42"},
            ]
        },
    ),
    ("gitlab-ci", {"all": [{"claim": "namespace_path", "equals": "acme"}]}),
    ("gitlab-ci", {"all": [{"claim": "project_path", "glob": "acme/**"}]}),
    ("gitlab-ci", {"all": [{"claim": "sub", "glob": "project_path:acme/*:**"}]}),
    ("kubernetes", {"all": [{"claim": "kubernetes.io.namespace", "equals": "agents"}]}),
    ("kubernetes", {"all": [{"claim": "sub", "glob": "system:serviceaccount:agents:*"}]}),
]

UNPINNED = [
    ("github-actions", None),
    ("github-actions", {"all": [{"claim": "ref", "equals": "refs/heads/main"}]}),
    ("github-actions", {"all": [{"claim": "repository", "glob": "*"}]}),
    ("github-actions", {"all": [{"claim": "repository", "glob": "acme*"}]}),
    ("github-actions", {"all": [{"claim": "repository", "regex": ".*"}]}),
    ("github-actions", {"all": [{"claim": "repository", "regex": "acme/.*|.*"}]}),
    ("github-actions", {"all": [{"claim": "repository_owner", "glob": "ac*"}]}),
    ("github-actions", {"all": [{"cel": "claims.repository_owner == 'acme'"}]}),
    ("github-actions", {"all": [{"claim": "job_workflow_ref", "glob": "acme/**"}]}),
    ("github-actions", {"all": [{"claim": "sub", "glob": "repo:*"}]}),
    (
        "github-actions",
        {
            "any": [
                {"claim": "repository", "equals": "acme/api"},
                {"claim": "ref", "equals": "refs/heads/main"},
            ]
        },
    ),
    ("gitlab-ci", {"all": [{"claim": "namespace_path", "glob": "acme*"}]}),
    ("gitlab-ci", {"all": [{"claim": "sub", "glob": "project_path:*"}]}),
    ("kubernetes", None),
    ("kubernetes", {"all": [{"claim": "kubernetes.io.serviceaccount.name", "equals": "agent"}]}),
    ("kubernetes", {"all": [{"claim": "sub", "glob": "system:serviceaccount:*"}]}),
]


@pytest.mark.parametrize(("preset", "trust"), PINNED)
def test_trust_rules_that_pin_the_tenant_load(preset: str, trust: dict[str, Any]) -> None:
    """Equals/one_of on a tenant claim, or a glob/regex whose literal start names the tenant."""
    conf(preset, trust)


@pytest.mark.parametrize(("preset", "trust"), UNPINNED)
def test_trust_rules_that_do_not_pin_the_tenant_refuse_to_load(
    preset: str, trust: dict[str, Any] | None
) -> None:
    """A multi-tenant issuer without a pinned tenant would admit strangers: refused at load,
    including wildcard tricks, top-level alternation, CEL-only rules and reusable-workflow refs."""
    with pytest.raises(ValidationError, match="must pin one"):
        conf(preset, trust)


def test_generic_issuers_need_no_pinning() -> None:
    """A generic issuer is one organisation's identity provider: no trust rules required."""
    assert conf("generic", None, issuer="https://idp.example.com").trust is None


# --- tokens shaped like the real ones ------------------------------------------------------


def github_claims(idp: TestIssuer, now: float, **over: Any) -> dict[str, Any]:
    claims = claims_for(
        idp,
        now,
        sub="repo:acme/api:ref:refs/heads/main",
        aud="broker",
        ref="refs/heads/main",
        ref_type="branch",
        sha="0" * 40,
        repository="acme/api",
        repository_id="42",
        repository_owner="acme",
        repository_owner_id="7",
        run_id="1",
        actor="octocat",
        event_name="push",
        workflow_ref="acme/api/.github/workflows/agent.yml@refs/heads/main",
        job_workflow_ref="acme/api/.github/workflows/agent.yml@refs/heads/main",
        runner_environment="github-hosted",
        nbf=...,
    )
    claims.update(over)
    return claims


def test_a_github_actions_token(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """A GitHub-shaped RS256 token of the pinned owner on main is trusted and named by its
    workflow; one from another owner, another branch, or lacking a GitHub claim is refused."""
    idp.keys = [new_key(alg="RS256")]
    verifier = make_verifier(
        idp.issuer_config(
            preset="github-actions",
            algorithms=["RS256"],
            trust={
                "all": [
                    {"claim": "repository_owner_id", "equals": "7"},
                    {"claim": "ref", "glob": "refs/heads/**"},
                ]
            },
        )
    )
    key = idp.keys[0]

    def tok(**over: Any) -> str:
        return forge(
            {"alg": "RS256", "kid": key.kid}, github_claims(idp, fake_time.wall, **over), key=key
        )

    principal = verifier.verify(tok()).principal
    assert principal.subject == "repo:acme/api:ref:refs/heads/main"
    assert principal.display_name == "acme/api/.github/workflows/agent.yml@refs/heads/main"
    assert principal.roles == frozenset({"agent"})
    for over, reason in [
        ({"repository_owner_id": "8", "repository_owner": "acme"}, "untrusted_token"),
        ({"ref": "refs/tags/v1"}, "untrusted_token"),
        ({"repository_owner_id": None}, "missing_claim"),
        ({"job_workflow_ref": ...}, "missing_claim"),
    ]:
        claims = {k: v for k, v in over.items() if v is not ...}
        body = github_claims(idp, fake_time.wall, **claims)
        if ... in over.values():
            body.pop(next(k for k, v in over.items() if v is ...))
        with pytest.raises(TokenRefused) as info:
            verifier.verify(forge({"alg": "RS256", "kid": key.kid}, body, key=key))
        assert info.value.code == reason


def test_a_gitlab_ci_token(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """A GitLab-shaped token: trusted for the pinned group's protected branches only."""
    idp.keys = [new_key(alg="RS256")]
    verifier = make_verifier(
        idp.issuer_config(
            preset="gitlab-ci",
            algorithms=["RS256"],
            trust={
                "all": [
                    {"claim": "namespace_path", "equals": "acme"},
                    {"claim": "ref_protected", "equals": "true"},
                ]
            },
        )
    )
    key = idp.keys[0]

    def tok(**over: Any) -> str:
        claims = claims_for(
            idp,
            fake_time.wall,
            sub="project_path:acme/api:ref_type:branch:ref:main",
            namespace_id="3",
            namespace_path="acme",
            project_id="22",
            project_path="acme/api",
            user_login="alice",
            pipeline_source="push",
            ref="main",
            ref_type="branch",
            ref_protected="true",
        )
        claims.update(over)
        return forge({"alg": "RS256", "kid": key.kid}, claims, key=key)

    assert verifier.verify(tok()).principal.display_name == "acme/api"
    with pytest.raises(TokenRefused, match="trust rules"):
        verifier.verify(tok(ref_protected="false"))
    with pytest.raises(TokenRefused, match="trust rules"):
        verifier.verify(tok(namespace_path="acme-evil", project_path="acme-evil/api"))


def test_a_kubernetes_service_account_token(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """A projected service-account token: the dotted claim path reaches into "kubernetes.io";
    another namespace is refused; a legacy token without exp is refused."""
    idp.keys = [new_key(alg="RS256")]
    verifier = make_verifier(
        idp.issuer_config(
            preset="kubernetes",
            algorithms=["RS256"],
            trust={
                "all": [
                    {"claim": "kubernetes.io.namespace", "equals": "agents"},
                    {"cel": 'claims["kubernetes.io"].serviceaccount.name.startsWith("agent-")'},
                ]
            },
        )
    )
    key = idp.keys[0]

    def tok(namespace: str = "agents", sa: str = "agent-ci", **over: Any) -> str:
        claims = claims_for(
            idp,
            fake_time.wall,
            sub=f"system:serviceaccount:{namespace}:{sa}",
            **{
                "kubernetes.io": {
                    "namespace": namespace,
                    "serviceaccount": {"name": sa, "uid": "b8c9"},
                    "pod": {"name": "runner-1", "uid": "a1b2"},
                }
            },
        )
        claims.update(over)
        return forge({"alg": "RS256", "kid": key.kid}, claims, key=key)

    assert verifier.verify(tok()).principal.subject == "system:serviceaccount:agents:agent-ci"
    for bad in (tok(namespace="default"), tok(sa="builder")):
        with pytest.raises(TokenRefused) as info:
            verifier.verify(bad)
        assert info.value.code == "untrusted_token"
    with pytest.raises(TokenRefused) as info:
        verifier.verify(tok(exp=None))
    assert info.value.code == "missing_claim"


def test_the_documented_examples_load() -> None:
    """Every issuer example in docs/authentication.md is a valid configuration."""
    import re
    import textwrap
    from pathlib import Path

    import yaml

    doc = (Path(__file__).resolve().parents[2] / "docs" / "authentication.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.DOTALL)
    entries = []
    for block in map(textwrap.dedent, blocks):
        if not block.startswith(("issuers:", "- name:")):
            continue  # another setting's example (auth_limits)
        text = block if block.startswith("issuers:") else "issuers:\n" + block
        entries.extend(yaml.safe_load(text)["issuers"])
    assert len(entries) == 7
    for entry in entries:
        IssuerConfig(**entry)
