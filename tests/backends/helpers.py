"""Small builders shared by the backend tests."""

from __future__ import annotations

import secrets
from typing import Any

from broker.backends.base import Backend, MintRequest


def mint_request(spec: Any, *, ttl: int = 900, cluster: str = "test", **kw: Any) -> MintRequest:
    """A request as the credential service builds it, with fresh ids."""
    values: dict[str, Any] = {
        "task_id": "tsk_" + secrets.token_urlsafe(12),
        "credential_id": "crd_" + secrets.token_urlsafe(12),
        "scope": "test-scope",
        "issuer": "https://issuer.example",
        "subject": "agent-1",
        "ttl": ttl,
        "spec": spec,
        "cluster": cluster,
    }
    values.update(kw)
    return MintRequest(**values)


def planned(backend: Backend, request: MintRequest) -> MintRequest:
    """The request with its plan attached, as minting does."""
    from dataclasses import replace

    return replace(request, planned=backend.plan(request))
