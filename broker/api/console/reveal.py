"""Show text exactly as it is: invisible, control and look-alike characters made visible.

An approver must see what they approve. Agent-supplied text (parameters, purpose, names, reasons)
could hide a bidirectional override that reorders what is displayed, a zero-width character that
splits a word, or a Cyrillic ``a`` (U+0430) inside ``example-data``. :func:`reveal` renders such text as HTML
in which

* characters that display nothing or move other characters (controls, format characters such as
  bidi overrides and zero-width joiners, unusual spaces) never reach the page: each is replaced by
  a visible label ``[U+202E RIGHT-TO-LEFT OVERRIDE]``;
* every other non-ASCII character is highlighted with its code point (and, for common look-alikes,
  the ASCII letter it imitates);

and :func:`warnings` summarises what a value contains (mixed scripts, invisible characters,
compatibility forms) in words. Everything else is HTML-escaped.
"""

from __future__ import annotations

import html
import unicodedata
from dataclasses import dataclass

from markupsafe import Markup

#: Frequent confusables of ASCII letters and digits (from Unicode's confusables.txt): Cyrillic,
#: Greek, Armenian and other letters that most fonts draw like a Latin one.
LOOKALIKES: dict[str, str] = {
    # Cyrillic
    "а": "a", "в": "B", "е": "e", "ѕ": "s", "і": "i", "ј": "j", "о": "o", "р": "p", "с": "c",  # noqa: RUF001
    "у": "y", "х": "x", "һ": "h", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ɡ": "g",  # noqa: RUF001
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C",  # noqa: RUF001
    "Т": "T", "Х": "X", "Ѕ": "S", "І": "I", "Ј": "J", "Ԁ": "D", "Ԛ": "Q", "Ԝ": "W", "Ү": "Y",  # noqa: RUF001
    # Greek
    "α": "a", "ο": "o", "ν": "v", "ρ": "p", "τ": "t", "υ": "u", "ι": "i", "κ": "k",  # noqa: RUF001
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",  # noqa: RUF001
    "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",  # noqa: RUF001
    # Armenian, Latin extensions and others
    "օ": "o", "ս": "u", "ց": "g", "ı": "i", "ȷ": "j", "ℓ": "l", "ǀ": "l", "Ɩ": "l",  # noqa: RUF001
    "٠": "0", "۰": "0", "〇": "O",  # noqa: RUF001
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Char:
    """How one character is shown."""

    kind: str  # "plain", "hidden" (replaced by a label) or "marked" (shown, highlighted)
    label: str


def describe(char: str) -> str:
    """``U+0430 CYRILLIC SMALL LETTER A``."""
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" {name}" if name else "")


def looks_like(char: str) -> str | None:
    """The ASCII character ``char`` is commonly mistaken for, if any."""
    if char in LOOKALIKES:
        return LOOKALIKES[char]
    folded = unicodedata.normalize("NFKC", char)
    if len(folded) == 1 and folded.isascii() and folded.isprintable() and folded != char:
        return folded  # fullwidth and mathematical letters, superscripts, ...
    return None


def classify(char: str, *, edge: bool = False) -> Char:
    """How to show ``char``; ``edge`` marks a character at the start or end of the value."""
    if char == " ":
        return Char("hidden", "[leading/trailing space]") if edge else Char("plain", char)
    if char.isascii() and char.isprintable():
        return Char("plain", char)
    category = unicodedata.category(char)
    if category[0] in "CZ":  # controls, format (bidi, zero-width), unassigned, separators
        return Char("hidden", f"[{describe(char)}]")
    hint = looks_like(char)
    label = describe(char) + (f", looks like '{hint}'" if hint else "")
    return Char("marked", label)


def reveal(text: str | None) -> Markup:
    """``text`` as safe HTML with every unusual character visible (see the module docstring)."""
    if text is None:
        return Markup("")
    out: list[str] = []
    last = len(text) - 1
    for i, char in enumerate(text):
        shown = classify(char, edge=i in (0, last))
        if shown.kind == "plain":
            out.append(html.escape(char))
        elif shown.kind == "hidden":
            out.append(
                f'<mark class="ch hidden" title="{html.escape(shown.label)}">'
                f"{html.escape(shown.label)}</mark>"
            )
        else:
            # The character itself is shown, highlighted, with its code point beside it; a
            # combining mark gets a dotted circle to sit on so it cannot merge with its neighbour.
            base = "\u25cc" + char if unicodedata.combining(char) else char
            out.append(
                f'<mark class="ch marked" title="{html.escape(shown.label)}">'
                f'{html.escape(base)}<span class="cp">U+{ord(char):04X}</span></mark>'
            )
    return Markup("".join(out))  # noqa: S704  # every piece above is escaped


#: Script names as they appear in Unicode character names (``FULLWIDTH LATIN SMALL LETTER A``).
_SCRIPTS = frozenset(
    [
        "LATIN",
        "CYRILLIC",
        "GREEK",
        "ARMENIAN",
        "HEBREW",
        "ARABIC",
        "SYRIAC",
        "THAANA",
        "DEVANAGARI",
        "BENGALI",
        "GURMUKHI",
        "GUJARATI",
        "TAMIL",
        "TELUGU",
        "KANNADA",
        "MALAYALAM",
        "THAI",
        "LAO",
        "TIBETAN",
        "GEORGIAN",
        "HANGUL",
        "ETHIOPIC",
        "CHEROKEE",
        "CANADIAN",
        "OGHAM",
        "RUNIC",
        "KHMER",
        "MONGOLIAN",
        "HIRAGANA",
        "KATAKANA",
        "BOPOMOFO",
        "CJK",
        "COPTIC",
        "GLAGOLITIC",
        "TIFINAGH",
        "NKO",
        "VAI",
        "LISU",
    ]
)


def _script(char: str) -> str | None:
    """The script of a letter, from its Unicode name (LATIN, CYRILLIC, GREEK, ...)."""
    if not char.isalpha():
        return None
    words = unicodedata.name(char, "").split()
    return next((w for w in words if w in _SCRIPTS), words[0] if words else None)


def scripts(text: str) -> list[str]:
    """The scripts of the letters in ``text``, in order of appearance."""
    seen: list[str] = []
    for char in text:
        script = _script(char)
        if script and script not in seen:
            seen.append(script)
    return seen


def warnings(text: str | None) -> list[str]:
    """What an approver should know about ``text``, in words (empty: plain ASCII)."""
    if not text:
        return []
    found: list[str] = []
    used = scripts(text)
    if len(used) > 1:
        found.append("mixes scripts: " + ", ".join(s.title() for s in used))
    alike = [(c, hint) for c in dict.fromkeys(text) if (hint := looks_like(c)) is not None]
    if alike:
        found.append(
            "look-alike characters: "
            + "; ".join(f"{describe(c)} looks like '{hint}'" for c, hint in alike[:3])
            + ("; ..." if len(alike) > 3 else "")
        )
    bidi = [c for c in text if unicodedata.bidirectional(c) in {"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"} or c in "\u200e\u200f\u061c"]  # fmt: skip
    if bidi:
        found.append("bidirectional control characters (they reorder what is displayed)")
    invisible = [c for c in text if c not in bidi and unicodedata.category(c) in {"Cf", "Cc", "Co", "Cn"}]  # fmt: skip
    if invisible:
        found.append("invisible or control characters")
    spaces = [c for c in text if unicodedata.category(c) in {"Zs", "Zl", "Zp"} and c != " "]
    if spaces:
        found.append("unusual space characters")
    if text != text.strip(" "):
        found.append("leading or trailing spaces")
    if unicodedata.normalize("NFKC", text) != text:
        found.append("compatibility characters (fullwidth or styled forms)")
    if not found and not text.isascii():
        found.append("non-ASCII characters (highlighted)")
    return found
