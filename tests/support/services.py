"""Start the real services once per test session: OpenBao, moto, PostgreSQL databases, a live broker."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from broker.api.app import create_app
from broker.devstack import openbao as bao_provision
from broker.devstack.processes import ManagedProcess, free_port, start_moto, start_openbao
from broker.settings import Settings, VaultSettings
from broker.wiring import Broker, build_broker

PG_ADMIN_URL = os.environ.get("BROKER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass
class OpenBao:
    process: ManagedProcess
    addr: str
    root_token: str
    broker_token: str
    state_dir: Path
    #: The PostgreSQL database behind the ``database`` secrets engine (None without PostgreSQL).
    database: bao_provision.DemoDatabase | None = None

    def vault_settings(self, **overrides: Any) -> VaultSettings:
        """How a broker reaches this server: its own token and both token roles."""
        values: dict[str, Any] = {
            "addr": self.addr,
            "token": self.broker_token,
            "token_role": bao_provision.CHILD_ROLE,
            "lease_token_role": bao_provision.LEASE_ROLE,
        }
        values.update(overrides)
        return VaultSettings(**values)

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "bao-audit.log"

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.addr, headers={"X-Vault-Token": token or self.root_token}, timeout=10
        )


def start_test_openbao(
    state_dir: Path, *, socket_address: str | None = None, with_database: bool = False
) -> OpenBao:
    """A provisioned OpenBao; ``with_database`` also configures the database secrets engine on
    a fresh PostgreSQL database (dropped by :func:`stop_test_openbao`)."""
    port = free_port()
    root = "test-root-" + secrets.token_hex(8)
    proc = start_openbao(state_dir, port, root, socket_address=socket_address)
    addr = f"http://127.0.0.1:{port}"
    broker_token = bao_provision.provision(addr, root, state_dir / "bao-home")
    bao = OpenBao(proc, addr, root, broker_token, state_dir)
    if with_database:
        bao.database = bao_provision.create_demo_database(
            PG_ADMIN_URL, "broker_bao_" + secrets.token_hex(6)
        )
        bao_provision.provision_database(addr, root, state_dir / "bao-home", bao.database)
    return bao


def stop_test_openbao(bao: OpenBao) -> None:
    bao.process.stop()
    if bao.database is not None:
        bao_provision.drop_demo_database(bao.database)


@dataclass
class Moto:
    process: ManagedProcess
    endpoint: str


def start_test_moto(state_dir: Path) -> Moto:
    """moto with the example scopes' IAM roles (broker-s3-read, broker-deploy)."""
    from broker.backends.aws_sts import provision_dev_roles

    port = free_port()
    proc = start_moto(state_dir, port)
    endpoint = f"http://127.0.0.1:{port}"
    provision_dev_roles(endpoint)
    return Moto(proc, endpoint)


def pg_available() -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@contextmanager
def pg_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (or test session); dropped afterwards."""
    import psycopg

    name = "broker_t_" + secrets.token_hex(6)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class LiveServer:
    """The broker's real ASGI app on a real socket, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the broker did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@contextmanager
def live_broker(settings: Settings, **build: Any) -> Iterator[tuple[LiveServer, Broker]]:
    broker = build_broker(settings, **build)
    with LiveServer(create_app(settings, broker=broker)) as server:
        yield server, broker
