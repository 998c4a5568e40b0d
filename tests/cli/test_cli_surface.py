"""The CLI's surface: every command takes --json and -q, and its help reads cleanly."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import typer
from typer.testing import CliRunner

from broker.cli.main import app

runner = CliRunner()
#: Internal commands started by `broker dev` itself, not by people.
#: Commands other programs run, speaking their own protocol on stdout (git's credential helper).
INTERNAL = {("dev", "issuer"), ("git-credential",)}


def commands() -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command people run, with its path under `broker` (Typer's own click objects)."""
    root = typer.main.get_command(app)

    def walk(path: tuple[str, ...], cmd: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
        if hasattr(cmd, "commands"):
            if cmd.invoke_without_command and path:
                yield path, cmd
            ctx = typer.Context(cmd)
            for name in cmd.list_commands(ctx):  # the groups built on demand included
                sub = cmd.get_command(ctx, name)
                if not sub.hidden:
                    yield from walk((*path, name), sub)
        else:
            yield path, cmd

    yield from walk((), root)


def test_every_command_takes_json_and_quiet() -> None:
    """--json and -q/--quiet on every command (a group run on its own counts as a command)."""
    missing = []
    for path, cmd in commands():
        if path in INTERNAL:
            continue
        names = {n for p in cmd.params for n in p.opts}
        for wanted in ("--json", "-q", "--quiet"):
            if wanted not in names:
                missing.append((" ".join(path), wanted))
    assert not missing, missing
    assert len(list(commands())) > 30


def test_help_has_no_markup_artefacts() -> None:
    """No reStructuredText backticks, Rich markup or type labels on flags in any help text,
    and no line wider than the terminal."""
    for path, _ in commands():
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "100"}, terminal_width=100)
        assert result.exit_code == 0, (path, result.output)
        text = result.output
        assert "``" not in text, (path, text)
        assert not re.search(r"\[/?(bold|dim|red|green|cyan|yellow|magenta)\]", text), path
        assert "<bool>" not in text, (path, text)
        assert "╭" not in text, path  # plain help, no Rich panels
        too_wide = [line for line in text.splitlines() if len(line) > 110]
        assert not too_wide, (path, too_wide)
        split = [line for line in text.splitlines() if re.search(r"\w-$", line)]
        assert not split, (path, split)  # a word split at its hyphen


def test_version_in_both_forms() -> None:
    """`broker version` prints the bare version; --json an object."""
    plain = runner.invoke(app, ["version"])
    assert plain.exit_code == 0 and re.fullmatch(r"\d+\.\d+\.\d+\S*\n", plain.output)
    assert json.loads(runner.invoke(app, ["version", "--json"]).output)["version"] == (
        plain.output.strip()
    )
