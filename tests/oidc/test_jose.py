"""The strict JSON parser's nesting check: right about strings, escapes and brackets.

How long it takes on hostile text is measured in bench/hostile_input.py (the old check took a
second on one 12 KB payload of escaped quotes); these tests prove it still finds what it must.
"""

from __future__ import annotations

import pytest

from broker.oidc.jose import MalformedInput, strict_json


@pytest.mark.parametrize(
    "text",
    [
        '{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[["}',  # brackets inside a string do not nest
        '{"a": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[["}',  # nor after an escaped quote
        '{"a\\\\": [[[[[[[[[[[[[[1]]]]]]]]]]]]]]}',  # an escaped backslash ends before the quote
        "[" * 16 + "]" * 16,
    ],
)
def test_what_is_not_too_deep_parses(text: str) -> None:
    """Nesting inside strings is text; sixteen levels are allowed."""
    strict_json(text.encode())


@pytest.mark.parametrize(
    "text",
    [
        "[" * 17 + "]" * 17,
        '{"a": "x", "b": ' + "[" * 17 + "]" * 17 + "}",
        '{"a\\\\": ' + "[" * 17 + "1" + "]" * 17 + "}",
        '["\\"", ' + "{" * 17,  # an escaped quote does not hide what follows the string
    ],
)
def test_deeper_nesting_is_refused_before_parsing(text: str) -> None:
    """Seventeen levels are refused, however strings and escapes are placed around them."""
    with pytest.raises(MalformedInput, match="nested deeper"):
        strict_json(text.encode())


@pytest.mark.parametrize(
    "text",
    [
        '"' + '\\"' * 6000,  # escaped quotes without a closing one (once quadratic)
        '"' * 12001,
        "\\" * 12000,
        '["' + "\\\\" * 6000,
    ],
)
def test_hostile_string_soup_is_refused_as_invalid_json(text: str) -> None:
    """Unterminated strings and quote soup are not JSON: refused, never another exception."""
    with pytest.raises(MalformedInput):
        strict_json(text.encode())


def test_non_ascii_text_around_brackets_does_not_count() -> None:
    """Characters outside ASCII between brackets are neither brackets nor nesting."""
    strict_json(("[" * 10 + "1" + "]" * 10).encode())
    strict_json(('{"a": ' + "[" * 15 + '"ü€😀"' + "]" * 15 + ', "b": "' + "é" * 50 + '"}').encode())
    with pytest.raises(MalformedInput, match="nested deeper"):
        strict_json(("[" * 17 + '"ü"' + "]" * 17).encode())
