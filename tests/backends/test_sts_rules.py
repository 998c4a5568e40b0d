"""STS's rules, enforced by the broker because moto does not: one test per rule."""

from __future__ import annotations

import json

import pytest

from broker.backends import sts_rules as r
from broker.errors import Conflict, InvalidRequest

POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/*"}],
}


class _Refused:
    """Expect an InvalidRequest with this stable code."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        assert isinstance(exc, InvalidRequest), f"expected a refusal {self.code}, got {exc!r}"
        assert exc.code == self.code
        return True


# --- session policy ------------------------------------------------------------------------


def test_session_policy_is_sent_compact() -> None:
    """The text STS receives is compact JSON, so its length is what STS counts."""
    text = r.session_policy(POLICY)
    assert text == json.dumps(POLICY, separators=(",", ":"))
    assert r.session_policy(None) is None


def test_session_policy_at_2048_characters_passes_and_one_more_is_refused() -> None:
    """STS's 2,048-character limit on the plaintext, exactly."""
    base = len(
        r.session_policy({**POLICY, "Statement": [{**POLICY["Statement"][0], "Sid": ""}]}) or ""
    )
    fits = {**POLICY, "Statement": [{**POLICY["Statement"][0], "Sid": "A" * (2048 - base)}]}
    assert len(r.session_policy(fits) or "") == 2048
    over = {**POLICY, "Statement": [{**POLICY["Statement"][0], "Sid": "A" * (2049 - base)}]}
    with _Refused("sts_policy_too_large"):
        r.session_policy(over)


@pytest.mark.parametrize(
    "policy",
    [
        ["not", "an", "object"],
        {"Statement": POLICY["Statement"]},  # no Version
        {"Version": "2012-10-17"},  # no statement
        {"Version": "2012-10-17", "Statement": []},
        {"Version": "2012-10-17", "Statement": ["text"]},
        {**POLICY, "Extra": 1},
        {"Version": "2012-10-17", "Statement": [{**POLICY["Statement"][0], "Principal": "*"}]},
        {"Version": "2012-10-17", "Statement": [{**POLICY["Statement"][0], "Effect": "Maybe"}]},
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*"}]},
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*"}]},
        {"Version": "2012-10-17", "Statement": [{**POLICY["Statement"][0], "NotAction": "x"}]},
        {"Version": "2012-10-17", "Statement": [{**POLICY["Statement"][0], "Action": []}]},
        {"Version": "2012-10-17", "Statement": [{**POLICY["Statement"][0], "Action": [""]}]},
        {"Version": "2012-10-17", "Statement": [{**POLICY["Statement"][0], "Bogus": 1}]},
    ],
)
def test_malformed_session_policies_are_refused(policy: object) -> None:
    """moto accepted invalid policy JSON; real STS answers MalformedPolicyDocument."""
    with _Refused("sts_invalid_policy"):
        r.session_policy(policy)  # type: ignore[arg-type]


def test_non_ascii_is_counted_as_sent() -> None:
    """Non-ASCII is escaped (\\uXXXX) in what is sent, and the limit counts the escapes."""
    statement = {**POLICY["Statement"][0], "Sid": "é" * 10}
    text = r.session_policy({**POLICY, "Statement": [statement]})
    assert text is not None and "\\u00e9" in text and text.isascii()


def test_packed_policy_size_is_watched() -> None:
    """PackedPolicySize is a percentage; from 90 % the broker warns (STS refuses above 100)."""
    assert not r.check_packed_policy_size(None)
    assert not r.check_packed_policy_size(89)
    assert r.check_packed_policy_size(90)


def test_at_most_ten_managed_policy_arns() -> None:
    """Ten ARNs pass, eleven are refused (moto took eleven)."""
    arns = [f"arn:aws:iam::123456789012:policy/p{i}" for i in range(11)]
    assert len(r.policy_arns(arns[:10])) == 10
    with _Refused("sts_too_many_policy_arns"):
        r.policy_arns(arns)
    with _Refused("sts_invalid_policy_arn"):
        r.policy_arns(["arn:aws:s3:::not-a-policy"])


# --- duration ------------------------------------------------------------------------------


def test_duration_is_the_ttl_within_every_cap() -> None:
    """The task's TTL, capped by the template, the role's real maximum, chaining and 12 h."""
    assert r.duration(1800, template_cap=3600, role_max=None, chained=False) == 1800
    assert r.duration(7200, template_cap=3600, role_max=None, chained=False) == 3600
    assert r.duration(7200, template_cap=43_200, role_max=5400, chained=False) == 5400
    assert r.duration(7200, template_cap=43_200, role_max=43_200, chained=True) == 3600
    assert r.duration(90_000, template_cap=43_200, role_max=None, chained=False) == 43_200


def test_duration_below_900_seconds_is_refused_not_stretched() -> None:
    """STS issues 900 s at least; a task allowed less must not get a longer credential."""
    assert r.duration(900, template_cap=3600, role_max=None, chained=False) == 900
    with pytest.raises(Conflict) as refused:
        r.duration(899, template_cap=3600, role_max=None, chained=False)
    assert refused.value.code == "ttl_below_backend_minimum"


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("agent-1", "agent-1"),
        ("repo:org/app:ref:refs/heads/main", "repo-org-app-ref-refs-heads-main"),
        ("ünïcode agent", "-n-code-agent"),
        ("x", "x-"),
        ("a" * 100, "a" * 64),
    ],
)
def test_names_are_sanitised_to_the_sts_alphabet_and_length(raw: str, expected: str) -> None:
    """RoleSessionName/SourceIdentity: 2 to 64 characters of [\\w+=,.@-] (ASCII)."""
    assert r.sanitize_name(raw) == expected
    assert r.check_name(expected, "name") == expected


def test_session_name_and_source_identity_identify_the_credential_and_principal() -> None:
    """Both fit STS's rules and carry the credential id (one SourceIdentity per credential, so
    one session can be denied alone) and the subject."""
    name = r.role_session_name("crd_abc", "repo:org/app")
    assert name == "crd_abc.repo-org-app"
    identity = r.source_identity("crd_xyz", "user@example.com")
    assert identity == "crd_xyz.user@example.com"
    long = r.source_identity("crd_" + "x" * 16, "s" * 200)
    assert len(long) == 64 and long.startswith("crd_" + "x" * 16 + ".")


@pytest.mark.parametrize("bad", ["a", "x" * 65, "has space", "colon:here", ""])
def test_bad_names_are_refused(bad: str) -> None:
    """moto accepted bad session names; the broker refuses them like STS."""
    with _Refused("sts_invalid_name"):
        r.check_name(bad, "role session name")


def test_source_identity_cannot_start_with_aws() -> None:
    """STS reserves the aws: prefix."""
    with _Refused("sts_invalid_name"):
        r.check_source_identity("aws:something")
    with _Refused("sts_invalid_name"):
        r.check_source_identity("AWS:x")
    assert r.check_source_identity("awsome") == "awsome"


def test_external_id_length_and_alphabet() -> None:
    """ExternalId: 2 to 1,224 characters of [\\w+=,.@:/-]."""
    assert r.check_external_id(None) is None
    assert r.check_external_id("ab") == "ab"
    assert r.check_external_id("x" * 1224) == "x" * 1224
    for bad in ("a", "x" * 1225, "has space", "quote'"):
        with _Refused("sts_invalid_external_id"):
            r.check_external_id(bad)


# --- tags ----------------------------------------------------------------------------------


def test_fifty_tags_pass_and_fifty_one_are_refused() -> None:
    """At most 50 session tags (moto took 51)."""
    assert len(r.session_tags({f"k{i}": "v" for i in range(50)})) == 50
    with _Refused("sts_too_many_tags"):
        r.session_tags({f"k{i}": "v" for i in range(51)})


def test_tag_key_and_value_lengths() -> None:
    """Keys 1 to 128 characters, values up to 256 (moto took a 300-character value)."""
    assert r.session_tags({"k" * 128: "v" * 256}) == [{"Key": "k" * 128, "Value": "v" * 256}]
    for tags in ({"k" * 129: "v"}, {"k": "v" * 257}, {"": "v"}):
        with _Refused("sts_invalid_tag"):
            r.session_tags(tags)


def test_tag_alphabet_prefix_and_case_insensitive_uniqueness() -> None:
    """Letters, digits, spaces and _.:/=+-@ only; no aws: prefix; keys unique ignoring case."""
    assert r.session_tags({"team name": "Équipe 1", "a:b/c=d+e-f@g_h.i": "ok"})
    for tags in ({"bad*": "v"}, {"k": "semi;colon"}, {"aws:x": "v"}, {"Key": "a", "key": "b"}):
        with _Refused("sts_invalid_tag"):
            r.session_tags(tags)
    assert r.sanitize_tag_value("repo:org/app;rm -rf") == "repo:org/app-rm -rf"


def test_transitive_tag_keys_must_name_session_tags() -> None:
    assert r.transitive_tag_keys(["Team"], {"team": "x"}) == ["Team"]
    with _Refused("sts_invalid_tag"):
        r.transitive_tag_keys(["other"], {"team": "x"})
