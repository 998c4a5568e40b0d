"""The broker's agent client: short-lived credentials for one task, in one line.

    from broker.client import credentials

    with credentials("vault-kv-read", purpose="read the demo secret") as grant:
        token = grant.env["VAULT_TOKEN"]          # revoked when the block ends

The client finds the agent's ID token where its platform puts it (GitHub Actions, a Kubernetes
projected token, a file or a command; see :mod:`broker.client.tokens`), exchanges it for a
broker session, requests the task, waits for approval, mints the credential and completes the
task when the block ends: normally, on an exception, or on SIGINT/SIGTERM/SIGHUP.

Configuration comes from the environment: ``BROKER_URL`` (required), ``BROKER_AUDIENCE``,
``BROKER_ID_TOKEN_FILE`` / ``BROKER_ID_TOKEN_COMMAND`` / ``BROKER_ID_TOKEN``, ``TRACEPARENT``,
``BROKER_CONVERSATION_ID``. This package needs only ``httpx`` and the standard library.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.client.aio import (
        AsyncBrokerClient,
    )
    from broker.client.config import (
        ClientConfig,
        SessionCache,
    )
    from broker.client.errors import (
        ApprovalPending,
        AuthenticationError,
        BrokerClientError,
        BrokerUnreachable,
        CompletionFailed,
        ConfigurationError,
        Conflict,
        Forbidden,
        IdTokenUnavailable,
        InvalidRequest,
        NotFound,
        RateLimited,
        RequestDenied,
        ScopeMisconfigured,
        ServiceUnavailable,
        TaskEnded,
        TaskExpired,
    )
    from broker.client.models import (
        Credential,
        Grant,
        Identity,
        Session,
        Task,
    )
    from broker.client.sync import (
        BrokerClient,
        OnWait,
    )
    from broker.client.tokens import (
        CommandIdToken,
        FileIdToken,
        GitHubActionsIdToken,
        IdTokenSource,
        KubernetesIdToken,
        StaticIdToken,
    )

#: Public names and the module that defines each. They are imported on first use (PEP 562), so
#: ``import broker.client.sync`` (the CLI) does not pay for the async client and its imports.
_LAZY = {
    "ApprovalPending": "errors",
    "AsyncBrokerClient": "aio",
    "AuthenticationError": "errors",
    "BrokerClient": "sync",
    "BrokerClientError": "errors",
    "BrokerUnreachable": "errors",
    "ClientConfig": "config",
    "CommandIdToken": "tokens",
    "CompletionFailed": "errors",
    "ConfigurationError": "errors",
    "Conflict": "errors",
    "Credential": "models",
    "FileIdToken": "tokens",
    "Forbidden": "errors",
    "GitHubActionsIdToken": "tokens",
    "Grant": "models",
    "IdTokenSource": "tokens",
    "IdTokenUnavailable": "errors",
    "Identity": "models",
    "InvalidRequest": "errors",
    "KubernetesIdToken": "tokens",
    "NotFound": "errors",
    "OnWait": "sync",
    "RateLimited": "errors",
    "RequestDenied": "errors",
    "ScopeMisconfigured": "errors",
    "ServiceUnavailable": "errors",
    "Session": "models",
    "SessionCache": "config",
    "StaticIdToken": "tokens",
    "Task": "models",
    "TaskEnded": "errors",
    "TaskExpired": "errors",
}

__all__ = [
    "ApprovalPending",
    "AsyncBrokerClient",
    "AuthenticationError",
    "BrokerClient",
    "BrokerClientError",
    "BrokerUnreachable",
    "ClientConfig",
    "CommandIdToken",
    "CompletionFailed",
    "ConfigurationError",
    "Conflict",
    "Credential",
    "FileIdToken",
    "Forbidden",
    "GitHubActionsIdToken",
    "Grant",
    "IdTokenSource",
    "IdTokenUnavailable",
    "Identity",
    "InvalidRequest",
    "KubernetesIdToken",
    "NotFound",
    "RateLimited",
    "RequestDenied",
    "ScopeMisconfigured",
    "ServiceUnavailable",
    "Session",
    "SessionCache",
    "StaticIdToken",
    "Task",
    "TaskEnded",
    "TaskExpired",
    "acredentials",
    "credentials",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'broker.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"broker.client.{module}"), name)
    globals()[name] = value
    return value


@contextlib.contextmanager
def credentials(
    scope: str,
    *,
    purpose: str,
    params: Mapping[str, Any] | None = None,
    ttl: int | None = None,
    wait_timeout: float | None = None,
    on_wait: OnWait | None = None,
) -> Iterator[Grant]:
    """Credentials for ``scope`` for the length of a ``with`` block (client from the environment)."""
    from broker.client.sync import BrokerClient

    with (
        BrokerClient.from_env() as client,
        client.task(
            scope,
            purpose=purpose,
            params=params,
            ttl=ttl,
            wait_timeout=wait_timeout,
            on_wait=on_wait,
        ) as grant,
    ):
        yield grant


@contextlib.asynccontextmanager
async def acredentials(
    scope: str,
    *,
    purpose: str,
    params: Mapping[str, Any] | None = None,
    ttl: int | None = None,
    wait_timeout: float | None = None,
) -> AsyncIterator[Grant]:
    """The ``async with`` form of :func:`credentials`."""
    from broker.client.aio import AsyncBrokerClient

    async with (
        AsyncBrokerClient() as client,
        client.task(
            scope, purpose=purpose, params=params, ttl=ttl, wait_timeout=wait_timeout
        ) as grant,
    ):
        yield grant
