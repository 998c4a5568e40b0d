"""Conditions on claims: every test kind, all/any/none, CEL with the requester, no silent pass."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from broker.domain.conditions import Condition, ConditionSet


def cond(**kw: object) -> Condition:
    return Condition.model_validate(kw)


@pytest.mark.parametrize(
    ("spec", "claims", "ok"),
    [
        ({"claim": "sub", "equals": "a"}, {"sub": "a"}, True),
        ({"claim": "sub", "equals": "a"}, {"sub": "ab"}, False),
        ({"claim": "groups", "equals": "dba"}, {"groups": ["dev", "dba"]}, True),
        ({"claim": "groups", "one_of": ["x", "dba"]}, {"groups": ["dba"]}, True),
        ({"claim": "groups", "one_of": ["x"]}, {}, False),
        ({"claim": "repo", "glob": "org/*"}, {"repo": "org/app"}, True),
        ({"claim": "repo", "glob": "org/*"}, {"repo": "org/app/sub"}, False),
        ({"claim": "repo", "glob": "org/**"}, {"repo": "org/app/sub"}, True),
        ({"claim": "repo", "glob": "org/?pp"}, {"repo": "org/app"}, True),
        ({"claim": "repo", "glob": "org/[a]pp"}, {"repo": "org/app"}, False),
        ({"claim": "sub", "regex": "ci-[0-9]+"}, {"sub": "ci-12"}, True),
        ({"claim": "sub", "regex": "ci-[0-9]+"}, {"sub": "xci-12"}, False),  # always anchored
        ({"claim": "sub", "regex": "ci-[0-9]+"}, {"sub": "ci-12\nroot"}, False),
        ({"claim": "k8s.ns", "equals": "prod"}, {"k8s": {"ns": "prod"}}, True),
        ({"claim": "admin", "equals": "true"}, {"admin": True}, True),
        ({"cel": "claims.level > 3"}, {"level": 4}, True),
        ({"cel": "claims.level > 3"}, {}, False),  # a runtime error is a non-match
        ({"cel": "claims.sub"}, {"sub": "x"}, False),  # not a boolean: no pass
    ],
)
def test_condition_kinds(spec: dict[str, object], claims: dict[str, object], ok: bool) -> None:
    """Each kind matches exactly as documented (anchored, list claims, nested paths)."""
    assert bool(cond(**spec).evaluate(claims)) is ok


@pytest.mark.parametrize(
    "spec",
    [
        {"claim": "sub"},
        {"claim": "sub", "equals": "a", "regex": "a"},
        {"cel": "true", "claim": "sub"},
        {"equals": "a"},
        {"claim": "sub", "regex": "("},
        {"cel": "claims.("},
        {"claim": "bad claim", "equals": "a"},
    ],
)
def test_malformed_conditions_are_refused(spec: dict[str, object]) -> None:
    """Exactly one test, a claim where needed, compilable expressions: else a load error."""
    with pytest.raises(ValidationError):
        cond(**spec)


def test_sets_all_any_none() -> None:
    """all must all hold, any one of any, none of none; the failing reason is named."""
    rule = ConditionSet.model_validate(
        {
            "all": [{"claim": "sub", "regex": ".+"}],
            "any": [{"claim": "groups", "equals": "a"}, {"claim": "groups", "equals": "b"}],
            "none": [{"claim": "groups", "equals": "contractors"}],
        }
    )
    assert rule.evaluate({"sub": "x", "groups": ["b"]})
    missing_any = rule.evaluate({"sub": "x", "groups": ["c"]})
    assert not missing_any and "any" in missing_any.reason
    excluded = rule.evaluate({"sub": "x", "groups": ["a", "contractors"]})
    assert not excluded and "contractors" in excluded.reason
    assert rule.describe() == {
        "all": ["sub regex '.+'"],
        "any": ["groups equals 'a'", "groups equals 'b'"],
        "none": ["groups equals 'contractors'"],
    }


def test_an_empty_set_or_none_alone_is_an_error() -> None:
    """Nothing passes by omission: an empty set, or only exclusions, refuses to load."""
    with pytest.raises(ValidationError):
        ConditionSet.model_validate({})
    with pytest.raises(ValidationError):
        ConditionSet.model_validate({"none": [{"claim": "sub", "equals": "x"}]})


def test_cel_sees_the_requester_in_approver_rules() -> None:
    """An approver rule can compare the approver with the requester (same team)."""
    rule = ConditionSet.model_validate({"all": [{"cel": "claims.team == requester.team"}]})
    assert rule.evaluate({"team": "a"}, {"team": "a"})
    assert not rule.evaluate({"team": "a"}, {"team": "b"})
    assert not rule.evaluate({"team": "a"})  # no requester: no match


@pytest.mark.parametrize(
    ("expression", "keys"),
    [
        ("claims.level >= 2", {"level"}),
        ("claims.groups.exists(g, g == 'x') && has(claims.team)", {"groups", "team"}),
        ("claims.team == requester.team", {"team"}),
        ("claims['level'] >= 2", None),  # an index: any key
        ("claims.exists(k, k == 'x')", None),  # a macro on the map itself
        ("size(claims) > 2", None),
        ("'x' in claims", None),
    ],
)
def test_cel_gets_only_the_claims_it_names(expression: str, keys: set[str] | None) -> None:
    """A CEL rule is handed the claims it reads (so a token's other, possibly huge, claims
    cost nothing); any other use of the map hands it every claim."""
    from broker.domain.conditions import referenced_keys

    found = referenced_keys(expression, "claims")
    assert (None if found is None else set(found)) == keys


def test_cel_answers_alike_with_only_the_named_claims() -> None:
    """Rules reading some claims, or the whole map, decide as before on a token with a large
    unrelated claim; a missing claim is still an error, hence false."""
    claims = {"level": 3, "team": "a", "noise": [[["x"] * 50] * 50] * 5}
    for expression, ok in [
        ("claims.level >= 2", True),
        ("claims.missing == 1", False),
        ("has(claims.team) && claims.team == 'a'", True),
        ("claims.exists(k, k == 'noise')", True),
        ("size(claims) == 3", True),
    ]:
        assert bool(Condition(cel=expression).evaluate(claims)) is ok, expression
