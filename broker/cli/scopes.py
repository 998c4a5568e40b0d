"""``broker scopes``: the admin's tools for scope templates (no running broker needed).

- ``broker scopes schema``: the JSON Schema of a template file (for editors and CI);
- ``broker scopes lint [DIR|FILE ...]``: every problem, as ``file:line: severity: field: message``;
- ``broker scopes test CASES.yaml ... --dir DIR``: policy tests (see docs/scopes.md), or one
  ad-hoc evaluation with ``--scope NAME --claim k=v --param k=v [--approver k=v]``.

Exit status: 0 clean, 1 problems found (or a failing case), 2 usage errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # template models pull in pydantic and CEL; commands import them when they run
    from broker.scopes.loader import LintProblem, LoadedTemplate

scopes_app = typer.Typer(no_args_is_help=True, help="Scope templates: schema, lint, test.")

SCHEMA_ID = "https://broker.dev/schemas/scope-template.json"


def template_schema() -> dict[str, Any]:
    """The published JSON Schema of a scope template file."""
    from broker.domain.scope import ScopeTemplate

    schema = ScopeTemplate.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


@scopes_app.command("schema")
def schema(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of standard output.")
    ] = None,
) -> None:
    """Print the JSON Schema of scope template files."""
    text = json.dumps(template_schema(), indent=2, sort_keys=True) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)


def _collect(
    paths: list[Path], forbidden_policies: list[str] | None = None
) -> tuple[dict[str, LoadedTemplate], list[LintProblem]]:
    from broker.domain.vault_policies import ForbiddenPolicies
    from broker.scopes.loader import LintProblem, load_folder, parse_template

    forbidden = ForbiddenPolicies.of(forbidden_policies or ())
    templates: dict[str, LoadedTemplate] = {}
    problems: list[LintProblem] = []
    for path in paths:
        if path.is_dir():
            found, errs = load_folder(path, forbidden=forbidden)
            templates.update(found)
            problems.extend(errs)
        elif path.is_file():
            loaded, errs = parse_template(path, forbidden=forbidden)
            problems.extend(errs)
            if loaded is not None:
                templates[loaded.template.name] = loaded
        else:
            problems.append(LintProblem(str(path), None, "(path)", "no such file or folder"))
    return templates, problems


@scopes_app.command("lint")
def lint(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Template folders or files (default: scopes/).")
    ] = None,
    strict: Annotated[bool, typer.Option(help="Fail on warnings too.")] = False,
    output_format: Annotated[
        str, typer.Option("--format", help="text, or json (one object per problem).")
    ] = "text",
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also list each valid template and its hash.")
    ] = False,
    forbidden_policy: Annotated[
        list[str] | None,
        typer.Option(
            "--forbidden-policy",
            help="A Vault policy no template may grant besides root (the broker's "
            "vault.forbidden_policies); repeatable.",
        ),
    ] = None,
) -> None:
    """Check templates: schema, what each backend can enforce, placeholders, maximums."""
    if output_format not in ("text", "json"):
        typer.echo("error: --format is text or json", err=True)
        raise typer.Exit(2)
    templates, problems = _collect(paths or [Path("scopes")], forbidden_policy)
    if output_format == "json":
        typer.echo(json.dumps([p.as_dict() for p in problems], indent=2))
    else:
        for problem in problems:
            typer.echo(str(problem))
        if verbose:
            for name, loaded in sorted(templates.items()):
                typer.echo(f"ok {name} {loaded.content_hash[:16]} {loaded.path}")
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    typer.echo(
        f"{len(templates)} valid template(s), {errors} error(s), {warnings} warning(s)", err=True
    )
    if errors or (strict and warnings):
        raise typer.Exit(1)


def _pairs(items: list[str] | None, what: str) -> dict[str, Any]:
    """key=value (a string) or key:=JSON (typed); a repeated key becomes a list."""
    out: dict[str, Any] = {}
    for item in items or []:
        if ":=" in item:
            key, raw = item.split(":=", 1)
            try:
                value: Any = json.loads(raw)
            except json.JSONDecodeError:
                typer.echo(f"error: {what} {item!r}: not JSON after ':='", err=True)
                raise typer.Exit(2) from None
        elif "=" in item:
            key, value = item.split("=", 1)
        else:
            typer.echo(f"error: {what} takes key=value or key:=JSON, not {item!r}", err=True)
            raise typer.Exit(2)
        if key in out:
            prev = out[key]
            out[key] = [*prev, value] if isinstance(prev, list) else [prev, value]
        else:
            out[key] = value
    return out


@scopes_app.command("test")
def run_tests(
    cases: Annotated[
        list[Path] | None, typer.Argument(help="Policy test files (YAML with a 'cases' list).")
    ] = None,
    folder: Annotated[Path, typer.Option("--dir", help="The templates under test.")] = Path(
        "scopes"
    ),
    scope: Annotated[
        str | None, typer.Option(help="Evaluate one request for this scope instead.")
    ] = None,
    claim: Annotated[
        list[str] | None,
        typer.Option(help="A requester claim key=value or key:=JSON (repeat a key for a list)."),
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option(help="A parameter key=value or key:=JSON.")
    ] = None,
    approver: Annotated[
        list[str] | None, typer.Option(help="An approver claim key=value or key:=JSON.")
    ] = None,
    ttl: Annotated[int | None, typer.Option(help="The TTL to ask for.")] = None,
) -> None:
    """Evaluate templates against sample claims and parameters, as the broker would decide."""
    from broker.scopes.evaluate import evaluate, load_cases, run_cases
    from broker.scopes.loader import load_folder

    templates, problems = load_folder(folder)
    for problem in problems:
        if problem.severity == "error":
            typer.echo(str(problem), err=True)
    if scope is not None:
        loaded = templates.get(scope)
        if loaded is None:
            typer.echo(f"error: no valid template named {scope!r} in {folder}", err=True)
            raise typer.Exit(1)
        result = evaluate(
            loaded,
            _pairs(claim, "--claim"),
            _pairs(param, "--param"),
            ttl=ttl,
            approver=_pairs(approver, "--approver") if approver else None,
        )
        typer.echo(json.dumps(result.as_dict(), indent=2, sort_keys=True))
        return
    if not cases:
        typer.echo("error: give policy test files, or --scope for one evaluation", err=True)
        raise typer.Exit(2)
    failed = total = 0
    for path in cases:
        try:
            parsed = load_cases(path)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        for res in run_cases(parsed, templates):
            total += 1
            if res.passed:
                typer.echo(f"PASS {path}: {res.case.name}")
            else:
                failed += 1
                typer.echo(f"FAIL {path}: {res.case.name}: {'; '.join(res.failures)}")
    typer.echo(f"{total - failed} passed, {failed} failed", err=True)
    if failed or any(p.severity == "error" for p in problems):
        raise typer.Exit(1)
