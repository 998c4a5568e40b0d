"""Provision a dev OpenBao the way an admin would: with the ``bao`` CLI.

The broker gets its own least-privileged token. It may create child tokens only through two token
roles, both ``orphan=true`` (so what it mints does not die with the broker's own token when that
is replaced by a fresh login):

- ``broker-child``: the tokens agents receive; allowed policies are the ones the example scopes
  use, ``root`` is disallowed;
- ``broker-lease``: broker-internal tokens that own database leases (policy ``broker-leases``,
  which may only read ``*/creds/*``); they never leave the broker.

It may also read ACL policies (to refuse any that grants ``sudo``), list and look up token
accessors (the orphan scan), revoke by accessor and lease id, renew leases (to shorten them to a
task's TTL), read database roles and connections (where agents connect) and read its token roles
(`broker scopes check --live` tells whether they allow a scope's policies). It never holds the
root token. :func:`provision_database` adds the database secrets engine on a PostgreSQL database.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
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

#: The policy of the broker-internal tokens that own dynamic database leases.
LEASE_POLICY = """
path "+/creds/*" { capabilities = ["read"] }
"""

BROKER_POLICY = """
path "auth/token/create/broker-child" { capabilities = ["update"] }
path "auth/token/create/broker-lease" { capabilities = ["update"] }
path "auth/token/revoke-accessor" { capabilities = ["update"] }
path "auth/token/lookup-accessor" { capabilities = ["update"] }
path "auth/token/roles/*" { capabilities = ["read"] }
path "auth/token/accessors" { capabilities = ["list", "sudo"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "sys/policies/acl/*" { capabilities = ["read"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "sys/leases/lookup" { capabilities = ["update"] }
path "sys/leases/lookup/database/creds/*" { capabilities = ["list", "sudo"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "database/creds/*" { capabilities = ["read"] }
path "database/roles/*" { capabilities = ["read"] }
path "database/config/*" { capabilities = ["read"] }
path "sys/audit-hash/*" { capabilities = ["update"] }
"""

CHILD_ROLE = "broker-child"
LEASE_ROLE = "broker-lease"
#: The database secrets engine roles the example scopes use, and what each may do on ``demo``.
DATABASE_ROLES = {
    "readonly": 'GRANT SELECT ON ALL TABLES IN SCHEMA demo TO "{{name}}";',
    "readwrite": (
        'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA demo TO "{{name}}";'
    ),
}


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
    """Set up policies, sample secrets and the broker's token roles; return the broker's token."""
    bao = Bao(addr, root_token, home)
    for name, body in EXAMPLE_POLICIES.items():
        bao("policy", "write", name, "-", stdin=body)
    bao("policy", "write", "broker-leases", "-", stdin=LEASE_POLICY)
    bao("policy", "write", "broker", "-", stdin=BROKER_POLICY)
    bao("kv", "put", "-mount=secret", "demo/hello", "value=world")
    bao("kv", "put", "-mount=secret", "private/key", "value=not-for-agents")
    bao(
        "write",
        f"auth/token/roles/{CHILD_ROLE}",
        f"allowed_policies={','.join(EXAMPLE_POLICIES)}",
        "disallowed_policies=root,broker,broker-leases",
        "orphan=true",
        "renewable=false",
        "token_type=service",
        "token_explicit_max_ttl=43200",
    )
    bao(
        "write",
        f"auth/token/roles/{LEASE_ROLE}",
        "allowed_policies=broker-leases",
        "disallowed_policies=root,broker",
        "orphan=true",
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


@dataclass(frozen=True)
class DemoDatabase:
    """A PostgreSQL database the database secrets engine hands out logins to."""

    admin_url: str  # a superuser URL of the server (the engine's own login)
    name: str  # the database (created for one test session or dev run)

    @property
    def url(self) -> str:
        return f"{self.admin_url.rsplit('/', 1)[0]}/{self.name}"


def create_demo_database(admin_url: str, name: str) -> DemoDatabase:
    """Create ``name`` with a ``demo.items`` table; only what the roles grant is reachable."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db = DemoDatabase(admin_url, name)
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(f'REVOKE ALL ON DATABASE "{name}" FROM PUBLIC')
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        conn.execute("CREATE SCHEMA demo")
        conn.execute("CREATE TABLE demo.items (id integer PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO demo.items VALUES (1, 'first'), (2, 'second')")
        conn.execute("CREATE TABLE public.secrets (value text)")
        conn.execute("INSERT INTO public.secrets VALUES ('not-for-agents')")
    return db


def drop_demo_database(db: DemoDatabase) -> None:
    import psycopg

    with psycopg.connect(db.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')


def provision_database(
    addr: str, root_token: str, home: Path, db: DemoDatabase, *, mount: str = "database"
) -> None:
    """Enable the database secrets engine on ``mount`` with roles ``readonly`` and ``readwrite``.

    Each login is a PostgreSQL role valid until its lease ends; revoking the lease ends the
    role's sessions and drops it.
    """
    from urllib.parse import urlsplit

    bao = Bao(addr, root_token, home)
    bao("secrets", "enable", f"-path={mount}", "database")
    admin = urlsplit(db.admin_url)
    host = admin.hostname or "127.0.0.1"
    port = admin.port or 5432
    user = admin.username or "postgres"
    bao(
        "write",
        f"{mount}/config/demo",
        "plugin_name=postgresql-database-plugin",
        f"connection_url=postgresql://{{{{username}}}}:{{{{password}}}}@{host}:{port}/{db.name}"
        "?sslmode=disable",
        f"username={user}",
        # Trust authentication on this machine ignores it; a real server needs the real one.
        f"password={admin.password or 'unused-with-trust-auth'}",
        f"allowed_roles={','.join(DATABASE_ROLES)}",
        "verify_connection=true",
    )
    for role, grants in DATABASE_ROLES.items():
        body = {
            "db_name": "demo",
            "creation_statements": [
                "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
                "VALID UNTIL '{{expiration}}';",
                f'GRANT CONNECT ON DATABASE "{db.name}" TO "{{{{name}}}}";',
                'GRANT USAGE ON SCHEMA demo TO "{{name}}";',
                grants,
            ],
            "revocation_statements": [
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE usename = '{{name}}';",
                'REVOKE ALL ON ALL TABLES IN SCHEMA demo FROM "{{name}}";',
                'REVOKE ALL ON SCHEMA demo FROM "{{name}}";',
                f'REVOKE ALL ON DATABASE "{db.name}" FROM "{{{{name}}}}";',
                'DROP ROLE IF EXISTS "{{name}}";',
            ],
            "default_ttl": "1h",
            "max_ttl": "1h",
        }
        bao("write", f"{mount}/roles/{role}", "-", stdin=json.dumps(body))
