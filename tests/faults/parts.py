"""Private copies of the parts a fault test stops: an OpenBao with storage on disk (so a restart
keeps its tokens and comes back sealed, like a real one), a PostgreSQL cluster of its own, a moto.

The session's shared OpenBao, moto and the machine's PostgreSQL server are never stopped: other
tests (and other people's test runs) rely on them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from broker.devstack import openbao as bao_provision
from broker.devstack.processes import ManagedProcess, bao_binary, free_port, start_moto, wait_http

#: Answers of /v1/sys/health that mean "the server is up" (sealed, uninitialised, standby...).
HEALTH_UP = (200, 429, 472, 473, 501, 503)


@dataclass
class DiskOpenBao:
    """A non-dev OpenBao server with file storage: initialised once, unsealed after each start."""

    state_dir: Path
    port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    root_token: str = ""
    unseal_key: str = ""
    broker_token: str = ""
    process: ManagedProcess | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        config = self.state_dir / "bao.hcl"
        data = self.state_dir / "raft"
        data.mkdir(parents=True, exist_ok=True)
        # Integrated storage (raft), one node: OpenBao 2 has no plain file storage.
        config.write_text(
            f'storage "raft" {{\n  path = "{data}"\n  node_id = "fault-test"\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n  tls_disable = true\n'
            f'  cluster_address = "127.0.0.1:{self.cluster_port}"\n}}\n'
            f'api_addr = "{self.addr}"\ncluster_addr = "http://127.0.0.1:{self.cluster_port}"\n'
        )
        return config

    def start(self) -> DiskOpenBao:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        home = self.state_dir / "bao-home"
        home.mkdir(exist_ok=True)
        env = {**os.environ, "HOME": str(home), "BAO_ADDR": self.addr}
        env.pop("VAULT_TOKEN", None)
        env.pop("BAO_TOKEN", None)
        self.process = ManagedProcess(
            "openbao-disk",
            [bao_binary(), "server", f"-config={self._config()}"],
            self.state_dir / "openbao.log",
            env=env,
            url=self.addr,
        ).start()
        wait_http(f"{self.addr}/v1/sys/health", process=self.process, ok_statuses=HEALTH_UP)
        with httpx.Client(base_url=self.addr, timeout=10) as client:
            if not client.get("/v1/sys/init").json()["initialized"]:
                body = client.put(
                    "/v1/sys/init", json={"secret_shares": 1, "secret_threshold": 1}
                ).json()
                self.unseal_key = body["keys_base64"][0]
                self.root_token = body["root_token"]
                self._unseal(client)
                self._provision(client)
            else:
                self._unseal(client)
        return self

    def _unseal(self, client: httpx.Client) -> None:
        resp = client.put("/v1/sys/unseal", json={"key": self.unseal_key})
        resp.raise_for_status()
        assert resp.json()["sealed"] is False
        wait_http(f"{self.addr}/v1/sys/health", ok_statuses=(200,))

    def _provision(self, client: httpx.Client) -> None:
        client.headers["X-Vault-Token"] = self.root_token
        client.post(
            "/v1/sys/mounts/secret", json={"type": "kv", "options": {"version": "2"}}
        ).raise_for_status()
        self.broker_token = bao_provision.provision(
            self.addr, self.root_token, self.state_dir / "bao-home"
        )

    def kill(self) -> None:
        """Stop at once (SIGKILL): what it stored survives on disk; it restarts sealed."""
        assert self.process is not None and self.process.proc is not None
        self.process.signal(signal.SIGKILL)
        self.process.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers (a hung server)."""
        assert self.process is not None
        self.process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.stop()

    def token_alive(self, accessor: str) -> bool:
        with httpx.Client(base_url=self.addr, timeout=10) as client:
            resp = client.post(
                "/v1/auth/token/lookup-accessor",
                json={"accessor": accessor},
                headers={"X-Vault-Token": self.root_token},
            )
        return resp.status_code == 200


# --- PostgreSQL --------------------------------------------------------------------------------


def pg_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL server binaries, if installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster of this test's own (trust auth on 127.0.0.1, a free port), made with
    initdb and driven with pg_ctl; as root it runs as the ``postgres`` user (initdb refuses root).

    ``base`` must be a folder the ``postgres`` user can reach: not under pytest's temporary
    root, which is private to its owner (and reset to 0700 by every new pytest session).
    """

    base: Path
    port: int = field(default_factory=free_port)

    def _run(self, *argv: str, timeout: float = 60) -> None:
        command = list(argv)
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(  # fixed binaries, arguments built here
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stdout}\n{result.stderr}")

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def init(self) -> PrivateCluster:
        bin_dir = pg_bin_dir()
        assert bin_dir is not None
        self.bin = bin_dir
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "sock").mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres")
            shutil.chown(self.base / "sock", "postgres")
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        return self

    def start(self) -> PrivateCluster:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base / 'sock'} "
            "-c fsync=off -c max_connections=100"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.base / "postgres.log"),
            "-w",
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)


def restart_moto(state_dir: Path, port: int) -> ManagedProcess:
    """moto again on ``port`` with the example roles (moto keeps nothing across restarts: the
    roles are provisioned again, as they would still exist in AWS)."""
    from broker.backends.aws_sts import provision_dev_roles

    proc = start_moto(state_dir, port)
    provision_dev_roles(f"http://127.0.0.1:{port}")
    return proc


def settle(seconds: float) -> None:
    """Let background loops (reapers, exporters) take a few turns."""
    time.sleep(seconds)
