"""GitHub App installation tokens: GitHub's own rules, checked by the broker before any call.

Pure functions over plain values (no I/O beyond reading the packaged permission catalog once):

- permission names and levels come from GitHub's published OpenAPI description (the
  ``app-permissions`` schema), extracted into ``github_permissions.json`` by
  ``scripts/github-permissions`` and checked against the package by the tests;
- levels are ordered ``read`` < ``write`` < ``admin``; a token may ask for at most what the
  installation holds and what the template's maximum allows;
- a token names at most 500 repositories (GitHub's limit on ``repositories``/``repository_ids``);
- owner logins and repository names have GitHub's alphabets.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

#: At most this many repositories in one installation token request (GitHub's documented limit).
MAX_REPOSITORIES = 500
#: GitHub installation tokens live one hour; the broker cannot shorten or extend that.
TOKEN_LIFETIME = 3600
#: Permission levels, weakest first.
LEVELS = ("read", "write", "admin")
_RANK = {level: i for i, level in enumerate(LEVELS, start=1)}
#: GitHub grants ``metadata: read`` with every installation token, asked for or not.
IMPLICIT_PERMISSIONS: Mapping[str, str] = {"metadata": "read"}
#: A user or organisation login: letters, digits and single inner hyphens, at most 39.
OWNER = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}")
#: A repository name (GitHub refuses ``.`` and ``..``).
REPOSITORY = re.compile(r"[A-Za-z0-9._-]{1,100}")
#: The OpenAPI schema the catalog is extracted from.
SCHEMA_POINTER = "#/components/schemas/app-permissions"
CATALOG_FILE = "github_permissions.json"


@dataclass(frozen=True, slots=True)
class PermissionCatalog:
    """Every permission an installation token may carry, with the levels GitHub accepts."""

    levels: Mapping[str, tuple[str, ...]]
    source: str

    def problems(self, permissions: Mapping[str, str]) -> list[str]:
        """Why ``permissions`` would not pass GitHub's schema (empty when they would)."""
        out = []
        for name, level in permissions.items():
            allowed = self.levels.get(name)
            if allowed is None:
                out.append(f"{name!r} is not a GitHub App permission")
            elif level not in allowed:
                out.append(f"{name!r} takes {' or '.join(allowed)}, not {level!r}")
        return out


def permissions_from_openapi(description: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{permission: [levels]}`` from GitHub's OpenAPI description (``app-permissions``)."""
    schema = description["components"]["schemas"]["app-permissions"]
    out: dict[str, list[str]] = {}
    for name, prop in sorted(schema["properties"].items()):
        levels = [str(v) for v in prop.get("enum") or []]
        if not levels or any(v not in _RANK for v in levels):
            raise ValueError(f"permission {name!r} has levels {levels} the broker does not know")
        out[str(name)] = levels
    return out


@cache
def permission_catalog() -> PermissionCatalog:
    """The packaged catalog (read once, on first use)."""
    text = resources.files("broker.domain").joinpath(CATALOG_FILE).read_text(encoding="utf-8")
    data = json.loads(text)
    return PermissionCatalog(
        levels={k: tuple(v) for k, v in data["permissions"].items()}, source=str(data["source"])
    )


def rank(level: str) -> int:
    """0 for no access, then 1 read, 2 write, 3 admin."""
    return _RANK.get(level, 0)


def exceeding(wanted: Mapping[str, str], allowed: Mapping[str, str]) -> list[str]:
    """Permissions in ``wanted`` above what ``allowed`` grants (absent in ``allowed``: none)."""
    return sorted(
        name for name, level in wanted.items() if rank(level) > rank(allowed.get(name, ""))
    )


def widened(granted: Mapping[str, str], requested: Mapping[str, str]) -> list[str]:
    """Permissions GitHub granted beyond the request (``metadata: read`` is always granted)."""
    return exceeding(granted, {**IMPLICIT_PERMISSIONS, **requested})


def owner_ok(value: str) -> bool:
    return OWNER.fullmatch(value) is not None


def repository_ok(value: str) -> bool:
    return REPOSITORY.fullmatch(value) is not None and value not in (".", "..")


def hashed_token(token: str) -> str:
    """What GitHub's audit log records as ``hashed_token``: base64 of the token's SHA-256.

    The hash of a random 40-character token is not a secret; it lets GitHub's audit log
    entries be joined to the broker's credential.
    """
    return base64.b64encode(hashlib.sha256(token.encode()).digest()).decode()
