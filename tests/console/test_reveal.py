"""Agent-supplied text is shown exactly: invisible characters named, look-alikes marked."""

from __future__ import annotations

import pytest

from broker.api.console.reveal import classify, looks_like, reveal, scripts, warnings


def test_plain_ascii_is_only_escaped() -> None:
    """Printable ASCII passes through, HTML-escaped, with nothing marked or warned about."""
    shown = str(reveal('deploy <b>"now"</b> & go'))
    assert shown == "deploy &lt;b&gt;&quot;now&quot;&lt;/b&gt; &amp; go"
    assert warnings("deploy-notes 42") == []


@pytest.mark.parametrize(
    ("char", "label"),
    [
        ("\u202e", "[U+202E RIGHT-TO-LEFT OVERRIDE]"),
        ("\u2066", "[U+2066 LEFT-TO-RIGHT ISOLATE]"),
        ("\u200b", "[U+200B ZERO WIDTH SPACE]"),
        ("\u200d", "[U+200D ZERO WIDTH JOINER]"),
        ("\ufeff", "[U+FEFF ZERO WIDTH NO-BREAK SPACE]"),
        ("\u00a0", "[U+00A0 NO-BREAK SPACE]"),
        ("\x07", "[U+0007]"),
        ("\n", "[U+000A]"),
    ],
)
def test_invisible_characters_never_reach_the_page(char: str, label: str) -> None:
    """Controls, bidi overrides, zero-width and unusual spaces are replaced by a visible label
    naming them; the character itself is not in the HTML (it would reorder or hide text)."""
    shown = str(reveal(f"ab{char}cd"))
    assert char not in shown
    assert label in shown
    assert classify(char).kind == "hidden"


def test_look_alikes_are_highlighted_with_code_point_and_what_they_imitate() -> None:
    """A Cyrillic ``a`` in a Latin word is shown, highlighted, with U+0430 next to it; the
    warnings say the value mixes scripts and which character imitates which."""
    value = "ex\u0430mple-data"
    shown = str(reveal(value))
    assert '<mark class="ch marked" title="U+0430 CYRILLIC SMALL LETTER A, looks like' in shown
    assert '<span class="cp">U+0430</span>' in shown
    found = warnings(value)
    assert "mixes scripts: Latin, Cyrillic" in found
    assert "look-alike characters: U+0430 CYRILLIC SMALL LETTER A looks like 'a'" in found


def test_fullwidth_and_styled_letters_are_compatibility_forms() -> None:
    """Fullwidth letters fold to ASCII under NFKC: named as look-alikes and as compatibility
    characters."""
    assert looks_like("\uff41") == "a"
    assert looks_like("\U0001d41a") == "a"  # MATHEMATICAL BOLD SMALL A
    found = warnings("p\uff41ypal")
    assert any("compatibility characters" in w for w in found)
    assert any("FULLWIDTH LATIN SMALL LETTER A looks like 'a'" in w for w in found)


def test_edges_and_mixed_scripts() -> None:
    """Leading and trailing spaces are shown as labels (inner spaces stay); Greek omicron in a
    Latin word is a mixed-script value; plain accented text is only non-ASCII."""
    shown = str(reveal(" a b "))
    assert shown.count("<mark") == 2
    assert shown.count(">[leading/trailing space]<") == 2
    assert "a b" in shown
    assert "leading or trailing spaces" in warnings(" a")
    assert scripts("g\u03bfogle") == ["LATIN", "GREEK"]
    assert warnings("caf\u00e9") == ["non-ASCII characters (highlighted)"]


def test_combining_marks_cannot_merge_with_their_neighbours() -> None:
    """A combining accent is drawn on a dotted circle inside its own mark, so it cannot
    silently change the letter before it."""
    shown = str(reveal("e\u0301"))
    assert "\u25cc\u0301" in shown
    assert shown.startswith("e<mark")


def test_none_is_empty() -> None:
    """Missing text renders as nothing (no 'None')."""
    assert str(reveal(None)) == ""
    assert warnings(None) == []
