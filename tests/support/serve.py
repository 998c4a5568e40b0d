"""One real `broker serve` process on its own SQLite store, for integration tests of one rule.

A thin layer over :class:`tests.replicas.cluster.Cluster` (one replica, migrated at start, on a
port chosen first so the config may name its own public URL, as the console's sign-in needs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from broker.devstack.processes import free_port
from tests.replicas.cluster import GRANT, ID_TOKEN, Cluster, Replica, base_config, scope_folder
from tests.support.issuer import TestIssuer


@contextmanager
def serve(
    base: Path,
    issuer: TestIssuer,
    *,
    scopes: dict[str, str] | None = None,
    port: int | None = None,
    **overrides: Any,
) -> Iterator[Cluster]:
    """A `broker serve` process in dev mode on ``base``, trusting ``issuer`` unless
    ``issuers=`` says otherwise; ``scopes`` adds templates to the examples."""
    port = port or free_port()
    config = base_config(
        database_url=f"sqlite:///{base / 'broker.db'}",
        issuer=issuer,
        scopes_dir=scope_folder(base, scopes),
        public_url=f"http://127.0.0.1:{port}",
        **overrides,
    )
    node = Cluster(base, config, count=1, migrate=True)
    node.replicas = [Replica(0, port, base / "replica-0")]
    try:
        node.start()
    except Exception:
        print(node.logs())
        node.stop()
        raise
    try:
        yield node
    finally:
        node.stop()


def open_session(client: httpx.Client, id_token: str) -> str:
    """Exchange ``id_token`` at ``POST /oauth2/token``; the session token."""
    resp = client.post(
        "/oauth2/token",
        data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": id_token},
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
