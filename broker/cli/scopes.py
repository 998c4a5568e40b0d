"""`broker scopes`: the admin's tools for scope templates.

- `broker scopes schema`: the JSON Schema of a template file (for editors and CI);
- `broker scopes lint [DIR|FILE ...]`: every problem, as `file:line: severity: field: message`;
- `broker scopes test CASES.yaml ... --dir DIR`: policy tests (see docs/scopes.md), or one ad-hoc
  evaluation with `--scope NAME --claim k=v --param k=v [--approver k=v] [--expect OUTCOME]`;
- `broker scopes check [DIR|FILE ...]`: lint, and what each template needs at its backend;
  `--live` asks the backends whether it is there (the running broker's, signed in as an admin, or
  with `--local` the backends of the local settings), and says exactly what to create.

Exit status: 0 clean, 1 problems found (a failing case, a missing prerequisite), 2 usage errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from broker.cli import signin
from broker.cli.output import Json, Quiet, emit_json, fail, note
from broker.cli.signin import IdTokenFile, SessionToken, Url

if TYPE_CHECKING:  # template models pull in pydantic and CEL; commands import them when they run
    from broker.scopes.loader import LintProblem, LoadedTemplate

scopes_app = typer.Typer(
    no_args_is_help=True,
    help="Scope templates: schema, lint, test, check.",
    rich_markup_mode=None,
)

Paths = Annotated[
    list[Path] | None,
    typer.Argument(help="Template folders or files (default: scopes/).", metavar="[PATH]..."),
]

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
    as_json: Annotated[
        bool, typer.Option("--json", help="Accepted for uniformity: the schema is JSON.")
    ] = False,
    quiet: Quiet = False,
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
    paths: Paths = None,
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
    as_json: Annotated[bool, typer.Option("--json", help="The same as --format json.")] = False,
    quiet: Quiet = False,
) -> None:
    """Check templates: schema, what each backend can enforce, placeholders, maximums."""
    if as_json:
        output_format = "json"
    if output_format not in ("text", "json"):
        fail("--format is text or json")
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
    note(
        f"{len(templates)} valid template(s), {errors} error(s), {warnings} warning(s)",
        quiet=quiet,
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
        list[Path] | None,
        typer.Argument(help="Policy test files (YAML with a 'cases' list).", metavar="[CASES]..."),
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
    expect: Annotated[
        str | None,
        typer.Option(
            help="With --scope: the outcome you expect (approved, pending, denied or invalid); "
            "exit 1 when it differs."
        ),
    ] = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Evaluate templates against sample claims and parameters, as the broker would decide."""
    from broker.scopes.loader import load_folder

    if expect is not None and expect not in OUTCOMES:
        fail(f"--expect is one of {', '.join(OUTCOMES)}")
    templates, problems = load_folder(folder)
    for problem in problems:
        if problem.severity == "error":
            note(str(problem), quiet=quiet)
    if scope is not None:
        loaded = templates.get(scope)
        if loaded is None:
            fail(f"no valid template named {scope!r} in {folder}", 1)
        _evaluate_one(loaded, claim, param, approver, ttl, expect, as_json)
        return
    if expect is not None:
        fail("--expect goes with --scope (a cases file states its own expectations)")
    if not cases:
        fail("give policy test files, or --scope for one evaluation")
    failed = _run_case_files(cases, templates, as_json, quiet)
    if failed or any(p.severity == "error" for p in problems):
        raise typer.Exit(1)


OUTCOMES = ("approved", "pending", "denied", "invalid")


def _evaluate_one(
    loaded: LoadedTemplate,
    claim: list[str] | None,
    param: list[str] | None,
    approver: list[str] | None,
    ttl: int | None,
    expect: str | None,
    as_json: bool,
) -> None:
    from broker.scopes.evaluate import evaluate

    result = evaluate(
        loaded,
        _pairs(claim, "--claim"),
        _pairs(param, "--param"),
        ttl=ttl,
        approver=_pairs(approver, "--approver") if approver else None,
    )
    if as_json:
        emit_json(result.as_dict())
    else:
        _print_evaluation(result.as_dict())
    if expect is not None and result.outcome != expect:
        note(f"FAIL: expected {expect}, got {result.outcome}")
        raise typer.Exit(1)


def _run_case_files(
    cases: list[Path], templates: dict[str, LoadedTemplate], as_json: bool, quiet: bool
) -> int:
    """Run every case of every file; returns how many failed."""
    from broker.scopes.evaluate import load_cases, run_cases

    failed = total = 0
    results: list[dict[str, Any]] = []
    for path in cases:
        try:
            parsed = load_cases(path)
        except ValueError as exc:
            fail(str(exc))
        for res in run_cases(parsed, templates):
            total += 1
            failed += not res.passed
            results.append(
                {
                    "file": str(path),
                    "case": res.case.name,
                    "passed": res.passed,
                    "failures": res.failures,
                }
            )
            if as_json:
                continue
            if res.passed:
                typer.echo(f"PASS {path}: {res.case.name}")
            else:
                typer.echo(f"FAIL {path}: {res.case.name}: {'; '.join(res.failures)}")
    if as_json:
        emit_json(results)
    note(f"{total - failed} passed, {failed} failed", quiet=quiet)
    return failed


def _print_evaluation(result: dict[str, Any]) -> None:
    rows = [
        ("scope", result["scope"]),
        ("outcome", result["outcome"]),
    ]
    for key in (
        "rule",
        "reason",
        "code",
        "ttl",
        "approvals_required",
        "approver",
        "approver_reason",
    ):
        if result.get(key) not in (None, ""):
            rows.append((key.replace("_", " "), result[key]))
    if result.get("params"):
        rows.append(("params", json.dumps(result["params"], sort_keys=True)))
    if result.get("rendered"):
        rows.append(("grants", json.dumps(result["rendered"], sort_keys=True)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key.ljust(width)}  {value}")


# --- check: prerequisites at the backends -------------------------------------------------------

_MARK = {"ok": "ok", "missing": "MISSING", "unknown": "UNKNOWN", "unchecked": "needs"}


@scopes_app.command("check")
def check(
    paths: Paths = None,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="Ask the backends whether each prerequisite holds (the running broker's, "
            "as an admin; or the local settings' with --local).",
        ),
    ] = False,
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="With --live: check the given files against the backends of the local "
            "settings (BROKER_*), not the running broker's catalog.",
        ),
    ] = False,
    scope: Annotated[str | None, typer.Option(help="Only this scope.")] = None,
    strict: Annotated[
        bool, typer.Option(help="Fail on prerequisites that could not be checked too.")
    ] = False,
    url: Url = None,
    token: SessionToken = None,
    id_token_file: IdTokenFile = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Before trouble: lint, then what each template needs at its backend, and exactly what to
    create. Offline it lists the prerequisites; --live checks them.

    \b
        broker scopes check                  lint and list what scopes/ needs
        broker scopes check --live           ask the running broker (admin role)
        broker scopes check --live --local   ask the backends of the local settings
    """
    if live and not local and not paths and signin.broker_url(url):
        body = _remote_check(url, token, id_token_file, scope)
        checks, refused = body["checks"], body.get("refused") or []
        problems_text = [
            f"{p['file']}: {p['severity']}: {p['field']}: {p['message']}" for p in refused
        ]
        misconfigured = body.get("misconfigured") or {}
    else:
        checks, problems_text, misconfigured = _local_check(paths, live, scope, quiet)
    if as_json:
        emit_json({"checks": checks, "refused": problems_text, "misconfigured": misconfigured})
    else:
        _print_checks(checks, problems_text, misconfigured, live)
    missing = sum(r["status"] == "missing" for c in checks for r in c["requirements"])
    unknown = sum(r["status"] == "unknown" for c in checks for r in c["requirements"])
    if live:
        note(
            f"{len(checks)} scope(s): {missing} prerequisite(s) missing, {unknown} not checkable",
            quiet=quiet,
        )
    if problems_text or missing or (strict and unknown):
        raise typer.Exit(1)


def _local_check(
    paths: list[Path] | None, live: bool, scope: str | None, quiet: bool
) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    from broker.scopes.prerequisites import Names, requirements

    templates, problems = _collect(paths or [Path("scopes")])
    if scope is not None:
        templates = {k: v for k, v in templates.items() if k == scope}
        if not templates:
            fail(f"no valid template named {scope!r}", 1)
    refused = [str(p) for p in problems if p.severity == "error"]
    if not live:
        checks = [
            {
                "scope": name,
                "type": loaded.template.backend.type,
                "file": str(loaded.path),
                "ok": False,
                "requirements": [r.as_dict() for r in requirements(loaded.template)],
            }
            for name, loaded in sorted(templates.items())
        ]
        return checks, refused, {}
    settings = _local_settings()
    from broker.services.scope_checks import check_scopes
    from broker.wiring import default_backends

    # No key ring here: building one may create keys; the running broker checks its own.
    backends = default_backends(settings, keyring=None)
    vault = settings.vault
    names = Names(vault.token_role if vault else None, vault.lease_token_role if vault else None)
    results = [c.as_dict() for c in check_scopes(templates.values(), backends, names)]
    for result in results:
        if result["type"] == "broker_jwt":
            result["requirements"] = [
                {
                    **r.as_dict(),
                    "status": "unknown",
                    "found": "only the running broker can check its signing key (--live without --local)",
                }
                for r in requirements(templates[result["scope"]].template)
            ]
    return results, refused, {}


def _local_settings() -> Any:
    from broker.errors import ConfigurationError
    from broker.settings import load_settings

    try:
        return load_settings()
    except ConfigurationError as exc:
        fail(exc.detail)


def _remote_check(
    url: str | None, token: str | None, id_token_file: Path | None, scope: str | None
) -> dict[str, Any]:
    with signin.errors(), signin.client(url, token, id_token_file) as client:
        body: dict[str, Any] = client.request(
            "GET", "/v1/admin/scopes/check", params={"scope": scope}
        )
    return body


def _print_checks(
    checks: list[dict[str, Any]], refused: list[str], misconfigured: dict[str, Any], live: bool
) -> None:
    for line in refused:
        typer.echo(f"refused  {line}")
    for check in checks:
        typer.echo(f"{check['scope']}  ({check['type']}, {check['file']})")
        for req in check["requirements"]:
            mark = _MARK.get(req["status"], req["status"])
            typer.echo(f"  {mark:<8} {req['what']}")
            if req.get("found") and req["status"] != "ok":
                typer.echo(f"  {'':<8} found: {req['found']}")
            if req["status"] in ("missing", "unchecked") or (
                req["status"] == "unknown" and req.get("fix")
            ):
                typer.echo(
                    f"  {'':<8} {'create' if req['status'] != 'unknown' else 'to check'}: {req['fix']}"
                )
        seen = misconfigured.get(check["scope"])
        if seen:
            typer.echo(f"  last mint on the broker failed: {seen.get('cause')}")
    if not live and checks:
        note("offline: these are what each scope needs; `broker scopes check --live` checks them")
