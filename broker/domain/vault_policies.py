"""Vault policy names as Vault itself sees them, and the policies the broker never hands out.

OpenBao/Vault normalises every policy name it is given (``policyutil.SanitizePolicies`` on token
create, the policy store on read and write): surrounding white space is trimmed with Go's
``strings.TrimSpace`` and the rest lowercased with Go's ``strings.ToLower``. Checked against
OpenBao 2.7 (``tests/backends/test_vault.py``): ``"ROOT"``, ``" root"``, ``"root\\u3000"`` and
``"\\u00a0Root"`` all arrive as ``root``, ``"\\u212av-read"`` (a Kelvin sign) as ``kv-read`` and
``"\\u0130"`` as ``i``; a zero-width space is kept.

A check that compares the name as written (``"ROOT" == "root"`` is false) lets a template or a
parameter ask for what the check meant to refuse. So the template loader, the renderer and the
Vault backend all decide with :func:`is_forbidden`, on :func:`vault_policy_name` of both sides.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: Never granted, whatever a template, a parameter or the configuration says.
ALWAYS_FORBIDDEN = frozenset({"root"})

#: Go's ``unicode.IsSpace``: the Latin-1 spaces plus Unicode's White_Space property. (Python's
#: ``str.isspace`` also counts U+001C..U+001F, which Go keeps, so it is not used.)
_GO_SPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
#: Where Go's rune-by-rune ``unicode.ToLower`` differs from Python's full case mapping.
_GO_LOWER = {"\u0130": "i"}


def _go_lower(text: str) -> str:
    out = []
    for ch in text:
        special = _GO_LOWER.get(ch)
        if special is not None:
            out.append(special)
            continue
        lowered = ch.lower()
        # Go maps one rune to one rune; a multi-character Python mapping keeps the rune.
        out.append(lowered if len(lowered) == 1 else ch)
    return "".join(out)


def vault_policy_name(name: str) -> str:
    """``name`` as Vault stores and compares it: Go's TrimSpace, then Go's ToLower."""
    start, end = 0, len(name)
    while start < end and name[start] in _GO_SPACE:
        start += 1
    while end > start and name[end - 1] in _GO_SPACE:
        end -= 1
    return _go_lower(name[start:end])


@dataclass(frozen=True, slots=True)
class ForbiddenPolicies:
    """``root`` plus the policies an administrator listed, held in Vault's normal form."""

    names: frozenset[str] = ALWAYS_FORBIDDEN

    @classmethod
    def of(cls, listed: Iterable[str] = ()) -> ForbiddenPolicies:
        names = {vault_policy_name(n) for n in listed}
        names.discard("")
        return cls(frozenset(names | ALWAYS_FORBIDDEN))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and is_forbidden(name, self)

    def first_in(self, names: Iterable[str]) -> str | None:
        """The first of ``names`` that Vault would read as a forbidden policy, as written."""
        return next((n for n in names if n in self), None)


def is_forbidden(name: str, forbidden: ForbiddenPolicies | None = None) -> bool:
    """True when Vault would read ``name`` as ``root`` or as a policy the admin forbade."""
    listed = forbidden.names if forbidden is not None else ALWAYS_FORBIDDEN
    return vault_policy_name(name) in listed


#: The default: only ``root``.
ROOT_ONLY = ForbiddenPolicies()
