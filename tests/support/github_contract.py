"""GitHub's API, offline: GitHub's own OpenAPI description served by a contract-checking mock.

github.com cannot be reached from these machines. The stand-in is the npm package
``@octokit/openapi`` (GitHub's official description) served by ``@stoplight/prism-cli`` with
``--errors``: every request the broker sends is validated against GitHub's schema and an
invalid one is answered 422 (a path the description does not list, 404), so a request the
broker gets wrong fails the test. Answers are the description's static examples.

Both packages are installed once into a cache folder outside the repository
(``BROKER_TEST_NPM_CACHE``, default ``~/.cache/broker-test/npm/<versions>``) with
``npm install --prefix``; a clean machine with npm installs them on the first test run.

What is served is a copy of the description that differs from the published one in two ways,
both said in docs/backends.md:

1. only the paths the broker calls are kept (verbatim, with every component they reference),
   which starts prism in about 2 s instead of 20 s;
2. three example *answers* (never a schema) are adjusted so that a successful mint is
   possible at all: the installation token's ``expires_at`` (2016 in the description) becomes
   an hour from now, its ``permissions`` become those of the "push a branch and open a pull
   request" scope, the example installation's ``permissions`` hold those and administration
   (for the two-approver example), and the example installation's
   ``repository_selection`` becomes ``selected`` so the broker's repository check runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.devstack.processes import ManagedProcess, free_port, wait_http

OPENAPI_VERSION = "23.0.2"
PRISM_VERSION = "5.16.0"
#: The paths the broker calls (GitHubAppBackend); anything else is a 404 from the stand-in.
BROKER_PATHS = (
    "/app",
    "/app/installations/{installation_id}/access_tokens",
    "/installation/token",
    "/installation/repositories",
    "/orgs/{org}/installation",
    "/users/{username}/installation",
)
#: The one token the static example answers with, and the repository it names.
EXAMPLE_TOKEN = "ghs_16C7e42F292c6912E7710c838347Ae178B4a"  # GitHub's documentation example
EXAMPLE_REPOSITORY = "Hello-World"
EXAMPLE_REPOSITORY_ID = 1296269
EXAMPLE_INSTALLATION_ID = 1
#: What the adjusted examples grant: the token, and the installation it comes from.
TOKEN_PERMISSIONS = {"contents": "write", "pull_requests": "write", "metadata": "read"}
INSTALLATION_PERMISSIONS = {
    "administration": "write",
    "checks": "write",
    "contents": "write",
    "issues": "write",
    "metadata": "read",
    "pull_requests": "write",
}


class NpmUnavailable(RuntimeError):
    """npm is missing or could not install the packages."""


def cache_dir() -> Path:
    root = os.environ.get("BROKER_TEST_NPM_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "broker-test" / "npm"
    return base / f"octokit-openapi-{OPENAPI_VERSION}-prism-{PRISM_VERSION}"


def install_packages() -> Path:
    """Install both packages into the cache once (a file lock keeps parallel sessions apart)."""
    folder = cache_dir()
    prism = folder / "node_modules" / ".bin" / "prism"
    description = folder / "node_modules" / "@octokit" / "openapi" / "generated"
    if prism.exists() and (description / "api.github.com.json").exists():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise NpmUnavailable("npm is not installed (apt-get install npm)")
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not prism.exists() or not (description / "api.github.com.json").exists():
            done = subprocess.run(  # fixed arguments
                [
                    npm,
                    "install",
                    "--prefix",
                    str(folder),
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    f"@octokit/openapi@{OPENAPI_VERSION}",
                    f"@stoplight/prism-cli@{PRISM_VERSION}",
                ],
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            if done.returncode != 0:
                raise NpmUnavailable(f"npm install failed: {done.stderr[-2000:]}")
    return folder


def description_path() -> Path:
    """GitHub's published description (api.github.com), installed on demand."""
    return (
        install_packages()
        / "node_modules"
        / "@octokit"
        / "openapi"
        / "generated"
        / "api.github.com.json"
    )


def _refs(value: Any, out: set[str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str):
                out.add(item)
            else:
                _refs(item, out)
    elif isinstance(value, list):
        for item in value:
            _refs(item, out)


def contract_description(published: dict[str, Any], *, token_expires_at: float) -> dict[str, Any]:
    """The served copy: the broker's paths with what they reference, and adjusted examples."""
    paths = {p: published["paths"][p] for p in BROKER_PATHS}
    wanted: set[str] = set()
    _refs(paths, wanted)
    seen: set[str] = set()
    components: dict[str, dict[str, Any]] = {}
    while wanted:
        ref = wanted.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _, _, kind, name = ref.split("/", 3)
        node = published["components"][kind][name]
        components.setdefault(kind, {})[name] = node
        _refs(node, wanted)
    copy = json.loads(json.dumps({**published, "paths": paths, "components": components}))
    copy.pop("x-webhooks", None)
    examples = copy["components"]["examples"]
    token = examples["installation-token"]["value"]
    token["expires_at"] = datetime.fromtimestamp(int(token_expires_at), UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    token["permissions"] = dict(TOKEN_PERMISSIONS)
    installation = examples["installation"]["value"]
    installation["permissions"] = dict(INSTALLATION_PERMISSIONS)
    installation["repository_selection"] = "selected"
    return copy


@dataclass
class GitHubStandIn:
    """A running prism serving the contract copy."""

    process: ManagedProcess
    url: str
    description: Path
    token_expires_at: float
    #: The published description (for tests comparing against it).
    published: Path

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")


@contextlib.contextmanager
def github_stand_in(state_dir: Path) -> Iterator[GitHubStandIn]:
    """Start prism on a free loopback port; stopped on exit."""
    folder = install_packages()
    published = description_path()
    expires = time.time() + 3600
    served = state_dir / "github-contract.json"
    served.write_text(
        json.dumps(
            contract_description(
                json.loads(published.read_text(encoding="utf-8")), token_expires_at=expires
            )
        )
    )
    port = free_port()
    process = ManagedProcess(
        "prism",
        [
            str(folder / "node_modules" / ".bin" / "prism"),
            "mock",
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "--errors",
            str(served),
        ],
        state_dir / "prism.log",
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        # /app answers 200 with the example app once prism has loaded the description.
        wait_http(f"{url}/app", timeout=120, process=process)
        yield GitHubStandIn(process, url, served, expires, published)
    finally:
        process.stop()
