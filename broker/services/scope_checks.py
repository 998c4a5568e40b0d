"""Would each scope mint now? Its backend prerequisites, asked of the backends themselves.

``broker scopes check --live`` (and ``GET /v1/admin/scopes/check``) runs this: for each template,
the backend that serves its type checks what the template needs (``Backend.check``, see
:class:`broker.backends.base.Checkable`): policies and token roles in OpenBao, database roles, IAM
roles and their trust. A backend without a live check, or one the broker has not configured, is
reported as such: nothing is silently skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.backends.base import Backend, Checkable
from broker.scopes.loader import LoadedTemplate
from broker.scopes.prerequisites import Names, Requirement, requirements
from broker.services.credentials import BACKEND_FOR_TYPE

#: How to configure each backend, for a scope whose backend is missing.
CONFIGURE = {
    "vault": "set BROKER_VAULT__ADDR, its authentication and BROKER_VAULT__TOKEN_ROLE (docs/backends.md)",
    "aws_sts": "set BROKER_AWS__REGION and give the broker AWS credentials (docs/backends.md)",
    "broker_jwt": "give the broker a signing key (BROKER_SIGNING_KEY_FILE)",
}


@dataclass
class ScopeCheck:
    """One template's prerequisites, each with its status."""

    scope: str
    kind: str
    file: str
    requirements: list[Requirement] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status == "ok" for r in self.requirements)

    @property
    def broken(self) -> bool:
        return any(r.status == "missing" for r in self.requirements)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "type": self.kind,
            "file": self.file,
            "ok": self.ok,
            "requirements": [r.as_dict() for r in self.requirements],
        }


def check_template(
    loaded: LoadedTemplate, backends: Mapping[str, Backend], names: Names
) -> ScopeCheck:
    """Ask the template's backend whether each of its prerequisites holds."""
    template = loaded.template
    kind = template.backend.type
    result = ScopeCheck(template.name, kind, str(loaded.path))
    backend_name = BACKEND_FOR_TYPE.get(kind, kind)
    backend = backends.get(backend_name)
    if backend is None:
        result.requirements.append(
            Requirement(
                template.name,
                f"the broker has its {backend_name} backend configured",
                CONFIGURE.get(backend_name, "configure the backend"),
                status="missing",
                found="not configured",
            )
        )
        return result
    if not isinstance(backend, Checkable):
        result.requirements.extend(
            r.checked("unknown", f"the {backend_name} backend has no live check")
            for r in requirements(template, names)
        )
        return result
    result.requirements.extend(backend.check(template))
    return result


def check_scopes(
    templates: Iterable[LoadedTemplate], backends: Mapping[str, Backend], names: Names
) -> list[ScopeCheck]:
    """:func:`check_template` for every template, by name."""
    return [
        check_template(t, backends, names) for t in sorted(templates, key=lambda t: t.template.name)
    ]
