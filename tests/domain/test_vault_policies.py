"""Vault's normal form of policy names, and the one forbidden-policy check built on it.

What OpenBao itself does to these spellings is checked against the real server in
``tests/backends/test_vault.py::test_policy_names_normalise_as_openbao_does``."""

from __future__ import annotations

import pytest

from broker.domain.vault_policies import (
    ROOT_ONLY,
    ForbiddenPolicies,
    is_forbidden,
    vault_policy_name,
)

#: Spellings Vault reads as ``root``.
ROOT_SPELLINGS = [
    "root",
    "ROOT",
    "Root",
    " root",
    "root ",
    "\troot\n",
    "\u00a0root",
    "root\u3000",
    "\u2028Root\u2029",
    "\x85ROOT\x0b",
]


@pytest.mark.parametrize("spelling", ROOT_SPELLINGS)
def test_every_spelling_vault_reads_as_root_is_forbidden(spelling: str) -> None:
    """Case and surrounding white space (Go's definition) do not hide root."""
    assert vault_policy_name(spelling) == "root"
    assert is_forbidden(spelling)
    assert spelling in ROOT_ONLY


@pytest.mark.parametrize(
    "spelling",
    ["ro ot", "r00t", "\u200broot", "\x1croot", "\ufeffroot", "roots", "root-ish", ""],
)
def test_names_vault_keeps_distinct_are_not_root(spelling: str) -> None:
    """Characters Go does not trim (zero-width space, U+001C, BOM) keep the name distinct."""
    assert vault_policy_name(spelling) != "root"
    assert not is_forbidden(spelling)


def test_lowercasing_follows_go_rune_by_rune() -> None:
    """Go lowers each rune alone: the Kelvin sign becomes k, dotted capital I becomes i,
    and a final capital sigma is a plain sigma (Python's str.lower would write ς and i̇)."""
    assert vault_policy_name("\u212av-admin") == "kv-admin"
    assert vault_policy_name("\u0130") == "i"
    assert vault_policy_name("\u03a3\u03a3") == "\u03c3\u03c3"
    assert vault_policy_name("\u1e9e") == "\u00df"


def test_the_admins_list_is_compared_in_the_same_form() -> None:
    """Listed names are normalised once; a request in any spelling of them is refused, and
    root stays forbidden whatever the list says."""
    forbidden = ForbiddenPolicies.of([" KV-Admin ", "Broker"])
    assert forbidden.names == frozenset({"root", "kv-admin", "broker"})
    for spelling in ("kv-admin", "KV-ADMIN", "\u212av-admin", " broker", "ROOT"):
        assert spelling in forbidden
    assert "kv-read" not in forbidden
    assert forbidden.first_in(["default", "kv-read", "BROKER "]) == "BROKER "
    assert ForbiddenPolicies.of([]).names == frozenset({"root"})
