"""Conditions on token claims, compiled once and evaluated purely.

A condition names a claim (a dotted path into the verified claims) and exactly one test:

- ``equals``: the claim equals the string (or, for a list claim, one element does);
- ``one_of``: the claim (or one element) is in the list;
- ``glob``: shell-like, always matched against the whole value: ``*`` matches any run of
  characters except ``/``, ``**`` matches any run including ``/``, ``?`` one character except
  ``/``; every other character is literal (no classes, no braces);
- ``regex``: a regular expression that must match the *whole* value; it runs on RE2
  (:mod:`broker.domain.patterns`), in time linear in the claim, so a pattern that would need
  backtracking (backreferences, lookaround) is refused when the configuration loads;
- ``cel``: a CEL expression (cel-python) over ``claims`` that must evaluate to ``true``; it takes
  no ``claim``. In an approver rule, ``requester`` holds the requester's claims, so
  ``claims.team == requester.team`` keeps approvals inside a team.

A :class:`ConditionSet` holds ``all`` (every one must hold), ``any`` (at least one must hold) and
``none`` (none may hold). An empty set is a configuration error, never a silent pass: to admit
every authenticated caller, say so with ``cel: "true"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import celpy
from celpy.adapter import json_to_cel
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from broker.domain.patterns import LinearPattern

_MISSING = object()


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of evaluating a condition: a value carrying its reason."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def claim_value(claims: Mapping[str, Any], path: str) -> Any:
    """Follow a dotted path through nested mappings; ``_MISSING`` when any step is absent.

    A claim whose own name contains dots (Kubernetes puts its claims under ``kubernetes.io``) is
    found too: at each step the longest key that the rest of the path starts with wins, so
    ``kubernetes.io.namespace`` reads ``claims["kubernetes.io"]["namespace"]``.
    """
    value: Any = claims
    parts = path.split(".")
    i = 0
    while i < len(parts):
        if not isinstance(value, Mapping):
            return _MISSING
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if key in value:
                value = value[key]
                i = j
                break
        else:
            return _MISSING
    return value


def glob_to_regex(pattern: str) -> str:
    """Translate the documented glob dialect into an anchored regular expression."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def _strings(value: Any) -> list[str]:
    """The scalar strings a claim offers for matching (a list claim offers each element)."""
    items = value if isinstance(value, list) else [value]
    return [
        str(v).lower() if isinstance(v, bool) else str(v)
        for v in items
        if v is not None and not isinstance(v, (dict, list))
    ]


class Condition(BaseModel):
    """One test on one claim (or one CEL expression)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    claim: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_:\-]+(\.[A-Za-z0-9_:\-]+)*$")
    equals: str | None = None
    one_of: list[str] | None = Field(default=None, min_length=1)
    glob: str | None = None
    regex: str | None = None
    cel: str | None = None

    _test: Callable[[Mapping[str, Any], Mapping[str, Any]], bool] = PrivateAttr()

    @model_validator(mode="after")
    def _compile(self) -> Condition:
        tests = {
            k: v
            for k, v in (
                ("equals", self.equals),
                ("one_of", self.one_of),
                ("glob", self.glob),
                ("regex", self.regex),
                ("cel", self.cel),
            )
            if v is not None
        }
        if len(tests) != 1:
            raise ValueError("a condition needs exactly one of equals, one_of, glob, regex, cel")
        kind = next(iter(tests))
        if kind == "cel":
            if self.claim is not None:
                raise ValueError(
                    "a cel condition takes no 'claim'; use claims.NAME in the expression"
                )
            self._test = _compile_cel(str(self.cel))
            return self
        if self.claim is None:
            raise ValueError(f"a {kind} condition needs 'claim'")
        path = self.claim
        if kind == "equals":
            expected = str(self.equals)
            self._test = lambda c, _: any(s == expected for s in _strings(claim_value(c, path)))
        elif kind == "one_of":
            allowed = frozenset(self.one_of or ())
            self._test = lambda c, _: any(s in allowed for s in _strings(claim_value(c, path)))
        else:
            source = glob_to_regex(str(self.glob)) if kind == "glob" else str(self.regex)
            compiled = LinearPattern(source, dot_matches_newline=True)
            self._test = lambda c, _: any(
                compiled.fullmatch(s) for s in _strings(claim_value(c, path))
            )
        return self

    def evaluate(
        self, claims: Mapping[str, Any], requester: Mapping[str, Any] | None = None
    ) -> Verdict:
        """Test the claims; ``requester`` (the requester's claims) is visible to CEL only."""
        try:
            ok = self._test(claims, requester or {})
        except Exception:  # a CEL runtime error (missing claim, wrong type) is a non-match
            ok = False
        return Verdict(ok, "" if ok else f"claim condition not met: {self.describe()}")

    def describe(self) -> str:
        """A short human description, e.g. ``groups one_of ['dba']``."""
        if self.cel is not None:
            return f"cel({self.cel})"
        kind, value = next(
            (k, v)
            for k, v in (
                ("equals", self.equals),
                ("one_of", self.one_of),
                ("glob", self.glob),
                ("regex", self.regex),
            )
            if v is not None
        )
        return f"{self.claim} {kind} {value!r}"


#: CEL macros and methods on a map: an expression calling one on ``claims`` reads all of it.
_WHOLE_MAP_METHODS = frozenset({"all", "exists", "exists_one", "map", "filter", "size"})
_FIELD = re.compile(r"\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\()?")


def referenced_keys(expression: str, variable: str) -> frozenset[str] | None:
    """The top-level keys of ``variable`` a CEL expression can read, or None for all of them.

    Handing CEL only the claims an expression names keeps its cost in proportion to what the
    rule reads: converting every claim of a large token into CEL values is slow (pure Python),
    and the claims are the token holder's choice. Any use other than ``variable.name`` (an
    index, a macro on the map itself, the map passed whole) means every key.
    """
    keys: set[str] = set()
    for found in re.finditer(rf"\b{variable}\b", expression):
        field = _FIELD.match(expression, found.end())
        if field is None or field.group(2) or field.group(1) in _WHOLE_MAP_METHODS:
            return None
        keys.add(field.group(1))
    return frozenset(keys)


def _cel_map(values: Mapping[str, Any], keys: frozenset[str] | None) -> Any:
    picked = dict(values) if keys is None else {k: values[k] for k in keys if k in values}
    return json_to_cel(picked)


def _compile_cel(expression: str) -> Callable[[Mapping[str, Any], Mapping[str, Any]], bool]:
    env = celpy.Environment()
    try:
        program = env.program(env.compile(expression))
    except Exception as exc:
        raise ValueError(f"invalid CEL expression: {str(exc).splitlines()[0]}") from None
    claim_keys = referenced_keys(expression, "claims")
    requester_keys = referenced_keys(expression, "requester")

    def test(claims: Mapping[str, Any], requester: Mapping[str, Any]) -> bool:
        result = program.evaluate(
            {
                "claims": _cel_map(claims, claim_keys),
                "requester": _cel_map(requester, requester_keys),
            }
        )
        return isinstance(result, celpy.celtypes.BoolType) and bool(result)

    return test


class ConditionSet(BaseModel):
    """``all`` must all hold, at least one of ``any`` when given, and none of ``none``.

    Never empty, and never made of ``none`` alone (that would admit everyone not excluded).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    all: list[Condition] = Field(default_factory=list)
    any: list[Condition] = Field(default_factory=list)
    none: list[Condition] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> ConditionSet:
        if not self.all and not self.any:
            raise ValueError("a condition set needs at least one condition in 'all' or 'any'")
        return self

    def evaluate(
        self, claims: Mapping[str, Any], requester: Mapping[str, Any] | None = None
    ) -> Verdict:
        """The first failing condition's reason, or a pass."""
        for cond in self.all:
            verdict = cond.evaluate(claims, requester)
            if not verdict:
                return verdict
        if self.any and not any(c.evaluate(claims, requester) for c in self.any):
            return Verdict(False, "none of the 'any' conditions was met")
        for cond in self.none:
            if cond.evaluate(claims, requester):
                return Verdict(False, f"an excluding condition matched: {cond.describe()}")
        return Verdict(True, "all conditions met")

    def describe(self) -> dict[str, list[str]]:
        """The rule in words, for discovery (``GET /v1/scopes``) and approver listings."""
        out: dict[str, list[str]] = {}
        for key, conds in (("all", self.all), ("any", self.any), ("none", self.none)):
            if conds:
                out[key] = [c.describe() for c in conds]
        return out
