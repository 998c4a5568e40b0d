"""A git server over HTTP of the tests' own: git's ``git http-backend`` (CGI) behind a small
threaded HTTP server that demands HTTP Basic auth and accepts exactly one password, the token
the broker minted. Each request's user and password are recorded for the test to check."""

from __future__ import annotations

import base64
import hmac
import os
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


def http_backend() -> str:
    exec_path = subprocess.run(
        ["git", "--exec-path"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return os.path.join(exec_path, "git-http-backend")


@dataclass
class GitHttpServer:
    """Serves the bare repositories under ``root``; only ``username:password`` gets in."""

    root: Path
    username: str
    password: str
    #: (method, path, user, password or None, status) of every request, in order.
    seen: list[tuple[str, str, str | None, str | None, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self
        backend = http_backend()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # stdlib's name
                pass

            def _credentials(self) -> tuple[str | None, str | None]:
                header = self.headers.get("Authorization", "")
                scheme, _, value = header.partition(" ")
                if scheme.lower() != "basic":
                    return None, None
                user, _, password = base64.b64decode(value).decode().partition(":")
                return user, password

            def _handle(self) -> None:
                user, password = self._credentials()
                ok = (
                    user == server.username
                    and password is not None
                    and hmac.compare_digest(password.encode(), server.password.encode())
                )
                if not ok:
                    server.seen.append((self.command, self.path, user, password, 401))
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="test git"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._cgi(user)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _cgi(self, user: str | None) -> None:
                parts = urlsplit(self.path)
                body = self._body()
                env = {
                    "PATH": os.environ.get("PATH", ""),
                    "GIT_PROJECT_ROOT": str(server.root),
                    "GIT_HTTP_EXPORT_ALL": "1",
                    "REQUEST_METHOD": self.command,
                    "PATH_INFO": parts.path,
                    "QUERY_STRING": parts.query,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                    "CONTENT_LENGTH": str(len(body)),
                    "REMOTE_USER": user or "",
                    "REMOTE_ADDR": "127.0.0.1",
                    "GIT_CONFIG_NOSYSTEM": "1",
                    "HOME": str(server.root),
                }
                for key, value in self.headers.items():
                    env["HTTP_" + key.upper().replace("-", "_")] = value
                done = subprocess.run(
                    [backend], input=body, env=env, capture_output=True, check=False, timeout=60
                )
                head, _, payload = done.stdout.partition(b"\r\n\r\n")
                if not _:
                    head, _, payload = done.stdout.partition(b"\n\n")
                status = 200
                headers: list[tuple[str, str]] = []
                for line in head.decode("latin-1").splitlines():
                    key, _, value = line.partition(":")
                    if key.lower() == "status":
                        status = int(value.strip().split()[0])
                    elif key:
                        headers.append((key, value.strip()))
                server.seen.append((self.command, self.path, user, server.password, status))
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = _handle  # the stdlib's dispatch names
            do_POST = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> GitHttpServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def git(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout


def bare_repository(root: Path, name: str, scratch: Path) -> Path:
    """``root/name`` as a bare repository holding one commit on ``main``."""
    env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    work = scratch / "seed"
    git("init", "-q", "-b", "main", str(work), env=env)
    (work / "README.md").write_text("hello\n")
    git("add", "README.md", cwd=work, env=env)
    git("commit", "-q", "-m", "first", cwd=work, env=env)
    target = root / name
    target.parent.mkdir(parents=True, exist_ok=True)
    git("clone", "-q", "--bare", str(work), str(target), env=env)
    return target
