"""Regular expressions written by operators, run on input written by strangers.

Trust rules, role rules, approver rules and template parameters carry regular expressions that
are matched against claim values and parameters an attacker chooses. Python's ``re`` backtracks:
``(a+)+$`` against a few dozen ``a``s followed by ``!`` takes longer than the universe has left.
These patterns therefore run on RE2 (``google-re2``), whose matching time is linear in the input
whatever the pattern. RE2 has no backreferences and no lookaround (exactly the features that
need backtracking); a pattern that uses them is refused when the configuration or template
loads, with the reason, never accepted and run slowly. ``\\d``, ``\\w`` and ``\\s`` are ASCII in
RE2, so a pattern matches at most what Python would have matched.
"""

from __future__ import annotations

import re2

#: Longest pattern accepted (RE2 would compile more, but nobody reviews a longer one).
MAX_PATTERN = 4096


class LinearPattern:
    """A compiled pattern that only ever matches the *whole* value, in linear time."""

    __slots__ = ("_compiled", "source")

    def __init__(self, source: str, *, dot_matches_newline: bool = False) -> None:
        if len(source) > MAX_PATTERN:
            raise ValueError(f"regular expression longer than {MAX_PATTERN} characters")
        options = re2.Options()
        options.log_errors = False
        options.dot_nl = dot_matches_newline
        try:
            self._compiled = re2.compile(source, options)
        except re2.error as exc:
            reason = exc.args[0] if exc.args else exc
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            raise ValueError(
                f"invalid regular expression for the linear-time engine (RE2: no "
                f"backreferences, no lookahead or lookbehind): {reason}"
            ) from None
        self.source = source

    def fullmatch(self, value: str) -> bool:
        """Whether the pattern matches all of ``value``."""
        return self._compiled.fullmatch(value) is not None

    def __repr__(self) -> str:
        return f"LinearPattern({self.source!r})"
