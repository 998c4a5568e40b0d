"""Provision a dev OpenBao the way an admin would: with the ``bao`` CLI.

The broker gets its own least-privileged token: it may create child tokens only through the
``broker-child`` token role (whose allowed policies are the ones the example scopes use), revoke by
accessor, read database credentials and revoke leases. It never holds the root token.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from broker.devstack.processes import bao_binary

#: Policies the example scope templates hand out.
EXAMPLE_POLICIES = {
    "kv-read": """
path "secret/data/demo/*" { capabilities = ["read"] }
path "secret/metadata/demo/*" { capabilities = ["read", "list"] }
""",
    "kv-write": """
path "secret/data/demo/*" { capabilities = ["create", "update", "read"] }
""",
}

BROKER_POLICY = """
path "auth/token/create/broker-child" { capabilities = ["update"] }
path "auth/token/revoke-accessor" { capabilities = ["update"] }
path "auth/token/lookup-accessor" { capabilities = ["update"] }
path "auth/token/accessors" { capabilities = ["list", "sudo"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "sys/leases/lookup" { capabilities = ["update"] }
path "sys/leases/lookup/database/creds/*" { capabilities = ["list", "sudo"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "database/creds/*" { capabilities = ["read"] }
path "sys/audit-hash/*" { capabilities = ["update"] }
"""


class Bao:
    """Run ``bao`` against one server with one token."""

    def __init__(self, addr: str, token: str, home: Path) -> None:
        self.env = {**os.environ, "BAO_ADDR": addr, "BAO_TOKEN": token, "HOME": str(home)}
        self.env.pop("VAULT_TOKEN", None)

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(  # noqa: S603  # fixed binary, arguments built here
            [bao_binary(), *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"bao {args[0]} {args[1] if len(args) > 1 else ''} failed: {result.stderr.strip()}"
            )
        return result.stdout


def provision(addr: str, root_token: str, home: Path) -> str:
    """Set up policies, sample secrets and the broker's token role; return the broker's token."""
    bao = Bao(addr, root_token, home)
    for name, body in EXAMPLE_POLICIES.items():
        bao("policy", "write", name, "-", stdin=body)
    bao("policy", "write", "broker", "-", stdin=BROKER_POLICY)
    bao("kv", "put", "-mount=secret", "demo/hello", "value=world")
    bao("kv", "put", "-mount=secret", "private/key", "value=not-for-agents")
    bao(
        "write",
        "auth/token/roles/broker-child",
        f"allowed_policies={','.join(EXAMPLE_POLICIES)}",
        "disallowed_policies=root",
        "orphan=false",
        "renewable=false",
        "token_type=service",
        "token_explicit_max_ttl=43200",
    )
    created = json.loads(
        bao(
            "token",
            "create",
            "-policy=broker",
            "-orphan",
            "-period=24h",
            "-display-name=broker",
            "-format=json",
        )
    )
    token: str = created["auth"]["client_token"]
    return token
