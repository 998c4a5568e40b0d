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
