"""Several real broker processes (`python -m broker serve`) on one PostgreSQL database.

Used by the replica races (tests/replicas), the fault tests (tests/faults), the load test and the
benchmarks (bench/). Each replica is a child process on its own port with its own data folder
(its own signing keys, as separate machines would have), all reading one config file; the test
talks to them over HTTP like agents behind a load balancer would.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from broker.backends.vault import VaultBackend
from broker.devstack import openbao as bao_provision
from broker.devstack.processes import ManagedProcess, free_port, wait_http
from broker.settings import VaultSettings
from tests.support.issuer import TestIssuer

REPO = Path(__file__).resolve().parents[2]
SCOPES = REPO / "scopes"
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"

T = TypeVar("T")

#: Test scopes every cluster serves besides the repository's examples.
REPLICA_SCOPES: dict[str, str] = {
    # Auto-approved OpenBao child tokens, many open tasks allowed (races, load, benchmarks).
    "replica-kv": """\
name: replica-kv
description: Read the demo secrets (replica and load tests).
owner: platform-team
backend:
  type: vault_token
  policies: [kv-read]
requester:
  all:
    - claim: sub
      regex: "[A-Za-z0-9._:/@-]{1,128}"
ttl:
  default: 600
  max: 3600
max_active_tasks: 1000
risk: low
approval:
  mode: auto
""",
    # Two distinct reviewers must approve.
    "replica-kv-two": """\
name: replica-kv-two
description: Read the demo secrets after two reviewers approved.
owner: platform-team
backend:
  type: vault_token
  policies: [kv-read]
requester:
  all:
    - claim: sub
      regex: "[A-Za-z0-9._:/@-]{1,128}"
ttl:
  default: 600
  max: 900
max_active_tasks: 1000
risk: high
approval:
  mode: manual
  count: 2
  approvers:
    all:
      - claim: groups
        equals: reviewers
  request_ttl: 600
  approval_ttl: 300
""",
    # One open task per principal.
    "replica-kv-single": """\
name: replica-kv-single
description: One open task at a time.
owner: platform-team
backend:
  type: vault_token
  policies: [kv-read]
requester:
  all:
    - claim: sub
      regex: "[A-Za-z0-9._:/@-]{1,128}"
ttl:
  default: 600
  max: 900
max_active_tasks: 1
risk: low
approval:
  mode: auto
""",
    # Everyone together: five requests a day.
    "replica-kv-limited": """\
name: replica-kv-limited
description: A scope with a shared quota.
owner: platform-team
backend:
  type: vault_token
  policies: [kv-read]
requester:
  all:
    - claim: sub
      regex: "[A-Za-z0-9._:/@-]{1,128}"
ttl:
  default: 600
  max: 900
max_active_tasks: 1000
risk: low
approval:
  mode: auto
limits:
  scope:
    - {requests: 5, per: 86400}
""",
    # Broker-signed JWTs (benchmarks: the broker's own signature as the backend).
    "replica-jwt": """\
name: replica-jwt
description: A broker-signed token for the demo API.
owner: platform-team
backend:
  type: broker_jwt
  audience: https://demo-api.example
requester:
  all:
    - claim: sub
      regex: "[A-Za-z0-9._:/@-]{1,128}"
ttl:
  default: 600
  max: 3600
max_active_tasks: 1000
risk: low
approval:
  mode: auto
""",
    # Broker-signed JWTs with a per-principal rate limit (load tests: 429s are expected).
    "replica-jwt-limited": """\
name: replica-jwt-limited
description: A broker-signed token, at most one request per principal a minute.
owner: platform-team
backend:
  type: broker_jwt
  audience: https://demo-api.example
requester:
  all:
    - claim: sub
      regex: "[A-Za-z0-9._:/@-]{1,128}"
ttl:
  default: 600
  max: 3600
max_active_tasks: 1000
risk: low
approval:
  mode: auto
limits:
  principal:
    # One a minute: an agent's second request for it in a short load run is refused however
    # slowly the machine runs (the load test asserts 429s are part of the load).
    - {requests: 1, per: 60}
""",
    # AWS STS through moto.
    "replica-sts": """\
name: replica-sts
description: Read the demo bucket through an assumed role.
owner: platform-team
backend:
  type: aws_sts
  role_arn: arn:aws:iam::123456789012:role/broker-s3-read
  role_max_session: 3600
requester:
  all:
    - claim: sub
      regex: "[A-Za-z0-9._:/@-]{1,128}"
ttl:
  default: 900
  max: 3600
max_active_tasks: 1000
risk: low
approval:
  mode: auto
""",
}


def scope_folder(base: Path, extra: dict[str, str] | None = None) -> Path:
    """The repository's example scopes plus :data:`REPLICA_SCOPES` (and ``extra``)."""
    folder = base / "scopes"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(SCOPES, folder, ignore=shutil.ignore_patterns("tests"))
    for name, text in {**REPLICA_SCOPES, **(extra or {})}.items():
        (folder / f"{name}.yaml").write_text(text)
    return folder


def vault_config(
    addr: str, token: str, *, token_role: str | None = None, lease_role: str | None = None
) -> dict[str, Any]:
    """The ``vault`` settings of a replica (the broker's token and both token roles)."""
    return {
        "addr": addr,
        "token": token,
        "token_role": token_role or bao_provision.CHILD_ROLE,
        "lease_token_role": lease_role or bao_provision.LEASE_ROLE,
        "timeout": 3.0,
    }


def base_config(
    *,
    database_url: str,
    issuer: TestIssuer,
    scopes_dir: Path,
    cluster_name: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Dev-mode settings for replicas trusting ``issuer`` (roles from ``broker_roles``)."""
    values: dict[str, Any] = {
        "dev_mode": True,
        "public_url": "http://broker.replicas.test",
        "database_url": database_url,
        "scopes_dir": str(scopes_dir),
        "scopes_reload_interval": 0,
        "session_max_ttl": 86_400,
        "issuers": [issuer.issuer_config(claims={"roles": "broker_roles"})],
        "cluster_name": cluster_name or "rep-" + secrets.token_hex(4),
        "log_level": "warning",
        "reaper_interval": 1.0,
        "audit": {"checkpoint_interval": 1.0},
        "otlp": {"interval": 0.1, "max_backoff": 1.0, "timeout": 10.0},
        # Every test client connects from 127.0.0.1: a budget no test reaches by accident, and
        # short windows so a test waiting for a flood's summary waits seconds.
        "auth_limits": {"per_address": 100_000, "window": 2, "flush_interval": 0.2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


@dataclass
class Replica:
    """One broker process."""

    index: int
    port: int
    data_dir: Path
    process: ManagedProcess | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()


@dataclass
class Cluster:
    """``count`` replicas sharing one config file (so one store, one OpenBao, one issuer)."""

    base: Path
    config: dict[str, Any]
    count: int = 2
    #: Extra environment per replica index (e.g. ``BROKER_DEV_FAULT`` on one of them).
    replica_env: dict[int, dict[str, str]] = field(default_factory=dict)
    replicas: list[Replica] = field(default_factory=list)
    migrate: bool = False

    @property
    def config_file(self) -> Path:
        return self.base / "broker.yaml"

    def write_config(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        # YAML is a superset of JSON: the settings loader reads this as is.
        self.config_file.write_text(json.dumps(self.config, indent=2))
        os.chmod(self.config_file, 0o600)

    def start(self, *, wait: str = "/readyz", timeout: float = 60.0) -> Cluster:
        """Start every replica at once and wait until each answers ``wait``."""
        self.write_config()
        if not self.replicas:
            self.replicas = [
                Replica(i, free_port(), self.base / f"replica-{i}") for i in range(self.count)
            ]
        for replica in self.replicas:
            self._spawn(replica)
        for replica in self.replicas:
            self.wait(replica, wait, timeout=timeout)
        return self

    def _spawn(self, replica: Replica) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update(
            {
                "BROKER_CONFIG": str(self.config_file),
                "BROKER_DATA_DIR": str(replica.data_dir),
                "PYTHONUNBUFFERED": "1",
                "AWS_ACCESS_KEY_ID": env.get("AWS_ACCESS_KEY_ID", "testing"),
                "AWS_SECRET_ACCESS_KEY": env.get("AWS_SECRET_ACCESS_KEY", "testing"),
                "AWS_DEFAULT_REGION": env.get("AWS_DEFAULT_REGION", "us-east-1"),
                **self.replica_env.get(replica.index, {}),
                **replica.env,
            }
        )
        argv = [sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(replica.port)]
        if self.migrate:
            argv.append("--migrate")
        replica.process = ManagedProcess(
            f"broker-{replica.index}", argv, replica.data_dir.with_suffix(".log"), env=env
        ).start()

    def wait(self, replica: Replica, path: str = "/readyz", *, timeout: float = 60.0) -> None:
        assert replica.process is not None
        wait_http(f"{replica.url}{path}", process=replica.process, timeout=timeout)

    def kill(self, index: int) -> None:
        """SIGKILL one replica (no clean shutdown: nothing it held in memory survives)."""
        replica = self.replicas[index]
        assert replica.process is not None and replica.process.proc is not None
        replica.process.signal(signal.SIGKILL)
        replica.process.proc.wait(timeout=10)

    def restart(self, index: int, *, wait: str = "/readyz", **env: str) -> Replica:
        """Start a stopped or killed replica again on the same port and data folder."""
        replica = self.replicas[index]
        if replica.alive():
            assert replica.process is not None
            replica.process.stop()
        replica.env = dict(env)
        self._spawn(replica)
        self.wait(replica, wait)
        return replica

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.process is not None:
                replica.process.stop(timeout=15)

    def logs(self) -> str:
        return "\n".join(
            f"--- broker-{r.index} ---\n{r.process.tail(40)}" for r in self.replicas if r.process
        )

    def clients(self, timeout: float = 30.0) -> list[httpx.Client]:
        return [httpx.Client(base_url=r.url, timeout=timeout) for r in self.replicas]

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]


# --- people ---------------------------------------------------------------------------------


@dataclass
class Agent:
    """A principal holding a session (valid on every replica: the store is shared)."""

    token: str
    subject: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def exchange(client: httpx.Client, id_token: str) -> httpx.Response:
    return client.post(
        "/oauth2/token",
        data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": id_token},
    )


def login(client: httpx.Client, issuer: TestIssuer, sub: str, **claims: Any) -> Agent:
    resp = exchange(client, issuer.token(sub, ttl=20_000, **claims))
    assert resp.status_code == 200, resp.text
    return Agent(resp.json()["access_token"], sub)


def request_task(
    client: httpx.Client,
    agent: Agent,
    scope: str,
    params: dict[str, Any] | None = None,
    *,
    key: str | None = None,
    purpose: str = "a replica test",
) -> httpx.Response:
    headers = dict(agent.auth)
    if key:
        headers["Idempotency-Key"] = key
    return client.post(
        "/v1/tasks",
        json={"scope": scope, "params": params or {}, "purpose": purpose},
        headers=headers,
    )


def mint(
    client: httpx.Client, agent: Agent, task_id: str, key: str | None = None
) -> httpx.Response:
    headers = dict(agent.auth)
    if key:
        headers["Idempotency-Key"] = key
    return client.post(f"/v1/tasks/{task_id}/credentials", headers=headers)


def complete(client: httpx.Client, agent: Agent, task_id: str) -> httpx.Response:
    return client.post(f"/v1/tasks/{task_id}/complete", headers=agent.auth)


# --- races ----------------------------------------------------------------------------------


def race(calls: Sequence[Callable[[], T]], timeout: float = 60.0) -> list[T]:
    """Run every call at the same moment (one thread each, released by a barrier); results in
    the order of ``calls``. An exception in a call is re-raised here."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int, call: Callable[[], T]) -> None:
        try:
            barrier.wait(timeout)
            results[i] = call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    if errors:
        raise errors[0]
    return results


# --- OpenBao ---------------------------------------------------------------------------------


def live_tokens(addr: str, root_token: str, cluster: str) -> dict[str, str]:
    """Credential id -> accessor of every live OpenBao token carrying ``cluster``'s metadata."""
    backend = VaultBackend(VaultSettings(addr=addr, token=root_token), cluster=cluster)
    return {o.credential_id: o.handle for o in backend.inventory(cluster)}


def wait_until(
    check: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll ``check`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(interval)
