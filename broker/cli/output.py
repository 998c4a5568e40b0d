"""How every command speaks: human text by default, ``--json`` for machines, ``-q`` for silence.

Standard output carries what a command is asked to produce (a table, a report, JSON, a credential),
so it can be piped; notes and progress go to standard error and ``-q`` drops them. Tables have a
header row and columns sized to their content. Only the standard library and Typer here, so the
CLI starts fast.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn

import typer

Json = Annotated[bool, typer.Option("--json", help="Print JSON on standard output.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No notes or progress on stderr.")]


def emit_json(data: Any) -> None:
    """``data`` as JSON on standard output (one document)."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def note(message: str, *, quiet: bool = False) -> None:
    """A note for people, on standard error (dropped with ``-q``)."""
    if not quiet:
        typer.echo(message, err=True)


def fail(message: str, code: int = 2, *, hint: str | None = None) -> NoReturn:
    """Print ``error: message`` (and ``next: hint``) on standard error and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"next: {hint}", err=True)
    raise typer.Exit(code)


def when(ts: Any) -> str:
    """A time as ``2026-11-26 12:00:01Z`` (``-`` when unknown)."""
    try:
        return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (TypeError, ValueError, OverflowError):
        return "-"


def shorten(text: Any, limit: int) -> str:
    value = "" if text is None else str(text)
    value = " ".join(value.split())
    return value if len(value) <= limit else value[: limit - 1] + "…"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str = "nothing to show"
) -> None:
    """Rows under a header, each column as wide as its widest cell (the last one is free)."""
    if not rows:
        note(empty)
        return
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(headers[i]), *(len(r[i]) for r in cells)]) for i in range(len(headers) - 1)]
    for row in [list(headers), *cells]:
        line = "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True))
        typer.echo(f"{line}  {row[-1]}".rstrip() if widths else row[-1])


def facts(rows: Sequence[tuple[str, Any]]) -> None:
    """``key  value`` lines with the keys aligned (one record, for people)."""
    if not rows:
        return
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key.ljust(width)}  {value}")


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
