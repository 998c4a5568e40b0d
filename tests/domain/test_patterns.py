"""Operators' regular expressions run in linear time (RE2) or are refused when they load."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from broker.domain.conditions import Condition
from broker.domain.patterns import LinearPattern
from broker.domain.scope import Parameter, glob_covers


@pytest.mark.parametrize(
    ("pattern", "value", "ok"),
    [
        ("(a+)+$", "a" * 5000 + "!", False),  # catastrophic for a backtracking engine
        ("(a|aa)+", "a" * 5000, True),
        ("(x+x+)+y", "x" * 5000, False),
        ("[a-z]+", "abc", True),
        ("[a-z]+", "abc\n", False),  # always the whole value
    ],
)
def test_matching_is_whole_value(pattern: str, value: str, ok: bool) -> None:
    """Patterns that make Python's re backtrack exponentially give the right answer."""
    assert LinearPattern(pattern).fullmatch(value) is ok


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?=a)a", r"(?!b)a", r"(?<=a)b", r"(?<!a)b"])
def test_backtracking_features_are_refused_at_load(pattern: str) -> None:
    """Backreferences and lookaround need backtracking: refused with the reason, in a trust
    condition and in a template parameter alike."""
    with pytest.raises(ValueError, match="linear-time engine"):
        LinearPattern(pattern)
    with pytest.raises(ValidationError, match="linear-time engine"):
        Condition(claim="sub", regex=pattern)
    with pytest.raises(ValidationError, match="linear-time engine"):
        Parameter(pattern=pattern)


def test_conditions_and_parameters_use_the_linear_engine() -> None:
    """A trust rule and a parameter pattern built to backtrack answer correctly on hostile
    values (conditions keep matching newlines with '.')."""
    cond = Condition(claim="sub", regex="(a+)+b")
    assert not cond.evaluate({"sub": "a" * 5000 + "c"})
    assert Condition(claim="sub", regex="a.b").evaluate({"sub": "a\nb"})
    param = Parameter(pattern="(a+)+b")
    assert not param.pattern_matches("a" * 5000 + "c")
    assert param.pattern_matches("aab")


def test_covering_globs_with_many_stars() -> None:
    """A maximum with many stars against a long rendered value that does not fit: a clean
    answer (a backtracking engine tries every split of the value between the stars)."""
    maximum = "arn:aws:s3:::" + "*:" * 20 + "x"
    assert not glob_covers(maximum, "arn:aws:s3:::" + ":" * 4000)
    assert glob_covers("s3:Get*", "S3:GETOBJECT", ignore_case=True)
    assert not glob_covers("a?", "a*")


def test_overlong_patterns_are_refused() -> None:
    """Nobody reviews a pattern of more than 4096 characters."""
    with pytest.raises(ValueError, match="longer than"):
        LinearPattern("a" * 4097)
