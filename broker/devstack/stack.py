"""`broker dev`: the whole local stack in one command, no Docker.

OpenBao (dev server), moto (STS/IAM), the dev OIDC issuer and the broker on SQLite with the
example scopes. Children run in their own process groups and are all stopped on exit.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from broker.devstack import openbao
from broker.devstack.processes import (
    ManagedProcess,
    enable_socket_audit,
    free_port,
    start_moto,
    start_openbao,
    wait_http,
)


@dataclass
class Ports:
    broker: int = 8080
    openbao: int = 8200
    moto: int = 8300
    issuer: int = 8400
    #: The broker's listener for OpenBao's socket audit device (0: any free port).
    audit: int = 0


@dataclass
class DevStack:
    state_dir: Path
    scopes_dir: Path
    ports: Ports = field(default_factory=Ports)
    env_file: Path | None = None
    otlp_endpoint: str | None = None
    processes: list[ManagedProcess] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    #: A PostgreSQL superuser URL for the database secrets engine (None: no database engine).
    postgres_url: str | None = field(
        default_factory=lambda: os.environ.get(
            "BROKER_DEV_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        )
    )
    database: openbao.DemoDatabase | None = None

    def _python_child(self, name: str, args: list[str], env: dict[str, str]) -> ManagedProcess:
        proc = ManagedProcess(
            name, [sys.executable, "-m", "broker", *args], self.state_dir / f"{name}.log", env=env
        ).start()
        self.processes.append(proc)
        return proc

    def up(self) -> dict[str, str]:
        """Start everything, wait until each part answers, write the env file; returns the URLs."""
        if self.state_dir.exists():
            shutil.rmtree(
                self.state_dir
            )  # every run starts clean: OpenBao's storage is in memory too
        self.state_dir.mkdir(parents=True)
        os.chmod(self.state_dir, 0o700)
        host = "127.0.0.1"
        root_token = "dev-root-" + secrets.token_hex(8)

        bao = start_openbao(self.state_dir, self.ports.openbao, root_token)
        self.processes.append(bao)
        vault_addr = f"http://{host}:{self.ports.openbao}"
        broker_token = openbao.provision(vault_addr, root_token, self.state_dir / "bao-home")
        self._database_engine(vault_addr, root_token)

        moto = start_moto(self.state_dir, self.ports.moto)
        self.processes.append(moto)
        aws_endpoint = f"http://{host}:{self.ports.moto}"
        from broker.backends.aws_sts import provision_dev_roles

        provision_dev_roles(aws_endpoint)

        issuer_url = f"http://{host}:{self.ports.issuer}"
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        issuer = self._python_child(
            "dev-issuer",
            [
                "dev",
                "issuer",
                "--url",
                issuer_url,
                "--port",
                str(self.ports.issuer),
                "--key-file",
                str(self.state_dir / "dev-issuer-key.pem"),
            ],
            base_env,
        )
        wait_http(f"{issuer_url}/.well-known/openid-configuration", process=issuer)

        broker_url = f"http://{host}:{self.ports.broker}"
        broker_env = {
            **base_env,
            "BROKER_DEV_MODE": "true",
            "BROKER_PUBLIC_URL": broker_url,
            "BROKER_DATA_DIR": str(self.state_dir / "data"),
            "BROKER_SCOPES_DIR": str(self.scopes_dir.resolve()),
            "BROKER_ISSUERS": json.dumps(
                [
                    {
                        "name": "dev",
                        "issuer": issuer_url,
                        "audiences": ["broker"],
                        "preset": "dev",
                        "algorithms": ["ES256"],
                        "claims": {
                            "subject": "sub",
                            "display_name": "name",
                            "groups": "groups",
                            "roles": "broker_roles",
                        },
                    }
                ]
            ),
            # People sign in to the console (/ui) at the dev issuer's sign-in page.
            "BROKER_CONSOLE__ISSUER": "dev",
            "BROKER_VAULT__ADDR": vault_addr,
            "BROKER_VAULT__TOKEN": broker_token,
            "BROKER_VAULT__TOKEN_ROLE": openbao.CHILD_ROLE,
            "BROKER_VAULT__LEASE_TOKEN_ROLE": openbao.LEASE_ROLE,
            "BROKER_AWS__ENDPOINT_URL": aws_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        if self.otlp_endpoint:
            broker_env["BROKER_OTLP__ENDPOINT"] = self.otlp_endpoint
        # Uses of minted tokens: OpenBao's socket device streams to the broker; its file device
        # lets the broker catch up on what the socket dropped.
        audit_listen = f"{host}:{self.ports.audit or free_port()}"
        broker_env["BROKER_AUDIT__OPENBAO__LISTEN"] = audit_listen
        broker_env["BROKER_AUDIT__OPENBAO__FILE"] = str(self.state_dir / "bao-audit.log")
        broker = self._python_child(
            "broker",
            ["serve", "--host", host, "--port", str(self.ports.broker), "--migrate"],
            broker_env,
        )
        wait_http(f"{broker_url}/readyz", process=broker, timeout=60)
        enable_socket_audit(
            bao,
            self.state_dir / "bao.hcl",
            self.state_dir / "bao-audit.log",
            audit_listen,
            root_token,
        )

        self.urls = {
            "BROKER_URL": broker_url,
            "BROKER_CONSOLE_URL": f"{broker_url}/ui",
            "VAULT_ADDR": vault_addr,
            "AWS_ENDPOINT_URL": aws_endpoint,
            "OIDC_ISSUER_URL": issuer_url,
            "BROKER_DEV_STATE_DIR": str(self.state_dir.resolve()),
            "VAULT_DEV_ROOT_TOKEN": root_token,
        }
        if self.env_file is not None:
            self.write_env_file(self.env_file)
        return self.urls

    def write_env_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"{k}={v}" for k, v in self.urls.items()]
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(
                "# written by `broker dev` once every part answered\n" + "\n".join(lines) + "\n"
            )
        tmp.replace(path)

    def watch(self) -> str | None:
        """The name of a child that died, if any."""
        for proc in self.processes:
            if not proc.alive():
                return proc.name
        return None

    def _database_engine(self, vault_addr: str, root_token: str) -> None:
        """The database secrets engine on a database of this run's own, if PostgreSQL answers."""
        if not self.postgres_url:
            return
        try:
            self.database = openbao.create_demo_database(
                self.postgres_url, "broker_dev_" + secrets.token_hex(6)
            )
        except Exception as exc:  # no PostgreSQL here: the postgres-* scopes will not mint
            print(f"note: no database engine ({type(exc).__name__}: {exc})", file=sys.stderr)
            return
        openbao.provision_database(
            vault_addr, root_token, self.state_dir / "bao-home", self.database
        )

    def down(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        if self.database is not None:
            try:
                openbao.drop_demo_database(self.database)
            except Exception as exc:
                print(f"note: could not drop {self.database.name}: {exc}", file=sys.stderr)
            self.database = None
        if self.env_file is not None and self.env_file.exists():
            self.env_file.unlink()


class ScopeWatch:
    """Reports a scope template that fails to load, in the `broker dev` terminal, as soon as it is
    saved, and when it loads again. The broker's catalog loads the folder with the same loader,
    so what is refused here is exactly what the broker refuses to serve."""

    def __init__(self, folder: Path, report: Callable[[str], None]) -> None:
        self.folder = folder
        self.report = report
        self._fingerprint: tuple[tuple[str, int, int], ...] | None = None
        self._refused: dict[str, list[str]] = {}

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        from broker.scopes.loader import template_files

        out = []
        for path in template_files(self.folder):
            try:
                st = path.stat()
            except OSError:
                continue  # removed while we looked
            out.append((path.name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def poll(self) -> None:
        fingerprint = self._scan()
        if fingerprint == self._fingerprint:
            return
        self._fingerprint = fingerprint
        from broker.scopes.loader import load_folder

        _, problems = load_folder(self.folder)
        refused: dict[str, list[str]] = {}
        for problem in problems:
            if problem.severity == "error":
                refused.setdefault(Path(problem.file).name, []).append(str(problem))
        for name, lines in sorted(refused.items()):
            if self._refused.get(name) != lines:
                self.report(f"scopes: {name} was refused; the broker does not serve it:")
                for line in lines:
                    self.report(f"  {line}")
        for name in sorted(set(self._refused) - set(refused)):
            self.report(f"scopes: {name} loads again")
        self._refused = refused


def run_forever(
    stack: DevStack, poll: float = 0.5, *, report: Callable[[str], None] | None = None
) -> str | None:
    """Block until a child dies (returns its name) or the caller is interrupted; with
    ``report``, say in the terminal when a scope template fails to load (see :class:`ScopeWatch`)."""
    scopes = ScopeWatch(stack.scopes_dir, report) if report is not None else None
    while True:
        dead = stack.watch()
        if dead:
            return dead
        if scopes is not None:
            scopes.poll()
        time.sleep(poll)
