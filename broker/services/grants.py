"""The grant of a task for its approvers: the template version it was requested under, rendered
for its parameters (:func:`broker.scopes.grant.grant_preview`).

The version is the one recorded with the task (``template_versions``), not the file as it is
now, so an approver sees what was asked for even after an edit (which voids the approval
anyway); without that record, the catalog's template when its hash still matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.domain.records import Task
from broker.domain.scope import ScopeTemplate
from broker.domain.vault_policies import ForbiddenPolicies
from broker.errors import NotFound
from broker.scopes.grant import grant_preview
from broker.scopes.loader import ScopeCatalog
from broker.settings import Settings
from broker.store import Tx, repo


@dataclass(frozen=True, slots=True)
class TaskGrant:
    """The backend settings as the requested template version wrote them, and rendered."""

    template_backend: dict[str, Any] | None
    grant: dict[str, Any]


def requested_template(conn: Tx, task: Task, catalog: ScopeCatalog) -> ScopeTemplate | None:
    """The template version ``task`` was requested under (see the module docstring)."""
    row = repo.get_template_version(conn, task.template_hash)
    if row is not None:
        return ScopeTemplate.model_validate(row["body"])
    try:
        loaded = catalog.get(task.scope)
    except NotFound:
        return None
    return loaded.template if loaded.content_hash == task.template_hash else None


def task_grant(conn: Tx, task: Task, catalog: ScopeCatalog, settings: Settings) -> TaskGrant:
    """What ``task``'s credential will grant, rendered for its parameters; no secret."""
    template = requested_template(conn, task, catalog)
    if template is None:
        return TaskGrant(
            None, {"error": "the template version this task was requested under is not on record"}
        )
    return TaskGrant(
        template.backend.model_dump(mode="json"),
        preview(template, task, settings, catalog.forbidden_policies),
    )


def preview(
    template: ScopeTemplate, task: Task, settings: Settings, forbidden: ForbiddenPolicies
) -> dict[str, Any]:
    return grant_preview(
        template,
        task.params,
        ttl=task.ttl,
        ttl_cap=settings.credential_max_ttl,
        subject=task.subject,
        task_id=task.id,
        cluster=settings.cluster_name,
        forbidden=forbidden,
    )
