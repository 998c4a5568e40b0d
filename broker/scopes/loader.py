"""Load scope templates from a folder, with errors that name file, line and field.

A file is parsed with a safe YAML loader that refuses duplicate keys, validated against the
models in :mod:`broker.domain.scope`, then checked by :mod:`broker.scopes.lint`; any error keeps
it out of the catalog. The catalog reloads a folder when a file in it changed (checked at most
once per ``check_interval`` seconds), so admins never restart the broker to publish a template.

A template's **content hash** is SHA-256 over the canonical JSON of its validated content: every
change of meaning (a condition, a limit, a policy) changes it, a comment or re-indentation does
not. Tasks record it; a decision made under one hash is void under another.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import threading
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from broker.domain.audit import canonical_json
from broker.domain.scope import ScopeTemplate
from broker.domain.vault_policies import ROOT_ONLY, ForbiddenPolicies
from broker.errors import NotFound
from broker.scopes.lint import check_template

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml")
#: Template files larger than this are refused unread (a template is a page, not a data set).
MAX_FILE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class LintProblem:
    """One problem in one template file: file, line, field, message, severity and rule id."""

    file: str
    line: int | None
    field: str
    message: str
    severity: Literal["error", "warning"] = "error"
    rule: str = "schema"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.severity}: {self.field}: {self.message} [{self.rule}]"

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "message": self.message,
            "severity": self.severity,
            "rule": self.rule,
        }


#: Fields added after templates were first hashed, with the default that means what an older
#: template said by leaving them out: at that default they stay out of the hash, so an upgrade
#: changes no template's hash (and voids no approval).
_LATER_FIELDS = {"share": "session"}


def content_hash(template: ScopeTemplate) -> str:
    """SHA-256 of the template's canonical content (see the module docstring)."""
    body = template.model_dump(mode="json")
    for name, default in _LATER_FIELDS.items():
        if body.get(name) == default:
            del body[name]
    return hashlib.sha256(canonical_json(body)).hexdigest()


@dataclass(frozen=True, slots=True)
class LoadedTemplate:
    """A template that passed validation and lint, with where it came from and its hash."""

    template: ScopeTemplate
    path: Path
    content_hash: str
    warnings: tuple[LintProblem, ...] = field(default=())
    #: The Vault policies refused when this template was loaded, and again when it renders.
    forbidden_policies: ForbiddenPolicies = ROOT_ONLY


class _SafeLineLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (an easy way to hide a second value)."""


def _construct_mapping(
    loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_SafeLineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_of(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest node along ``loc`` that exists in the YAML tree."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    node = value_node
                    line = key_node.start_mark.line + 1
                    break
            else:
                return line
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _field_name(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(template)"


def parse_template(  # noqa: PLR0911  # each early return is one kind of refusal
    path: Path, text: str | None = None, *, forbidden: ForbiddenPolicies = ROOT_ONLY
) -> tuple[LoadedTemplate | None, list[LintProblem]]:
    """Parse, validate and lint one file; returns the template (None on any error) and findings.

    ``forbidden``: the Vault policies no template may name (root and ``vault.forbidden_policies``).
    """
    name = str(path)
    if text is None:
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                return None, [LintProblem(name, None, "(file)", "larger than 256 KiB")]
            raw = path.read_bytes()
        except OSError as exc:
            return None, [LintProblem(name, None, "(file)", f"cannot read: {exc.strerror}")]
    else:
        raw = text.encode()
    try:
        source = raw.decode("utf-8")
        root = yaml.compose(source, Loader=_SafeLineLoader)  # a SafeLoader subclass
        data = yaml.load(source, Loader=_SafeLineLoader)  # noqa: S506  # a SafeLoader subclass
    except UnicodeDecodeError:
        return None, [LintProblem(name, None, "(file)", "not UTF-8 text")]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        return None, [
            LintProblem(name, mark.line + 1 if mark else None, "(yaml)", str(exc.problem or exc))
        ]
    if not isinstance(data, dict):
        return None, [LintProblem(name, 1, "(file)", "a template must be a YAML mapping")]
    try:
        template = ScopeTemplate.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems = []
        for err in errors:
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
            msg = plain_message(err, errors)
            problems.append(LintProblem(name, _line_of(root, loc), _field_name(loc), msg))
        return None, problems
    problems = [
        LintProblem(name, _line_of(root, f.loc), _field_name(f.loc), f.message, f.severity, f.rule)
        for f in check_template(template, forbidden=forbidden)
    ]
    expected = path.stem
    if template.name != expected:
        problems.insert(
            0,
            LintProblem(
                name,
                _line_of(root, ("name",)),
                "name",
                f"must match the file name ({expected!r})",
                rule="name-matches-file",
            ),
        )
    if any(p.severity == "error" for p in problems):
        return None, problems
    loaded = LoadedTemplate(template, path, content_hash(template), tuple(problems), forbidden)
    return loaded, problems


_UNION_TAGS = {"vault_token", "vault_database", "aws_sts", "broker_jwt", "github_app"}


def _unwrap(tp: Any) -> list[Any]:
    """The concrete types behind ``Annotated``, ``X | None`` and unions."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(tp) for t in _unwrap(arg) if t is not type(None)]
    return [tp]


def _step(tp: Any, part: int | str) -> list[Any]:
    """The types found one step down ``tp`` along ``part`` (a field, a list index, a dict key or a
    union's tag)."""
    out: list[Any] = []
    for t in _unwrap(tp):
        origin = typing.get_origin(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            if isinstance(part, str) and part in t.model_fields:
                out.append(t.model_fields[part].annotation)
            elif isinstance(part, str) and part in _UNION_TAGS:
                tag = t.model_fields.get("type")
                if tag is not None and part in typing.get_args(tag.annotation):
                    out.append(t)
        elif origin in (list, tuple) and isinstance(part, int):
            out.extend(typing.get_args(t)[:1])
        elif origin is dict:
            out.extend(typing.get_args(t)[1:2])
    return out


def known_fields(loc: tuple[int | str, ...]) -> list[str]:
    """The field names a template may have at ``loc`` (pydantic's location, union tags kept)."""
    current: list[Any] = [ScopeTemplate]
    for part in loc:
        current = [t for tp in current for t in _step(tp, part)]
    names: list[str] = []
    for tp in current:
        for t in _unwrap(tp):
            if isinstance(t, type) and issubclass(t, BaseModel):
                names.extend(n for n in t.model_fields if n not in names)
    return names


def plain_message(err: Any, errors: list[Any]) -> str:
    """A schema error said plainly, with "did you mean" for a misspelled field."""
    loc = tuple(err["loc"])
    kind = err.get("type")
    field = str(loc[-1]) if loc else ""
    if kind == "extra_forbidden":
        known = known_fields(loc[:-1])
        close = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listed = f" (known here: {', '.join(known)})" if known and not close else ""
        return f"unknown field {field!r}{hint}{listed}"
    if kind == "missing":
        siblings = [
            str(e["loc"][-1])
            for e in errors
            if e.get("type") == "extra_forbidden" and tuple(e["loc"][:-1]) == loc[:-1]
        ]
        close = difflib.get_close_matches(field, siblings, n=1, cutoff=0.6)
        hint = f" (is {close[0]!r} a misspelling of it?)" if close else ""
        return f"the field {field!r} is required but missing{hint}"
    message = str(err["msg"]).removeprefix("Value error, ")
    return message[:1].lower() + message[1:] if message[:2] != message[:2].upper() else message


def template_files(folder: Path) -> list[Path]:
    return (
        sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        if folder.is_dir()
        else []
    )


def load_folder(
    folder: Path, *, forbidden: ForbiddenPolicies = ROOT_ONLY
) -> tuple[dict[str, LoadedTemplate], list[LintProblem]]:
    templates: dict[str, LoadedTemplate] = {}
    problems: list[LintProblem] = []
    if not folder.is_dir():
        return {}, [LintProblem(str(folder), None, "(folder)", "no such folder")]
    for path in template_files(folder):
        loaded, errs = parse_template(path, forbidden=forbidden)
        problems.extend(errs)
        if loaded is not None:
            if loaded.template.name in templates:
                # foo.yaml and foo.yml: neither wins silently.
                problems.append(
                    LintProblem(
                        str(path), None, "name", "duplicate template name", rule="name-unique"
                    )
                )
                del templates[loaded.template.name]
                continue
            templates[loaded.template.name] = loaded
    return templates, problems


class ScopeCatalog:
    """The templates the broker serves, reloaded when their folder changes.

    A file that fails validation is skipped (and reported through ``problems``) so one bad edit
    cannot take the other templates down; the last good version of that file is *not* kept,
    because an admin who breaks a template must not leave an older grant silently in force.
    """

    def __init__(
        self,
        folder: Path,
        *,
        check_interval: float = 1.0,
        forbidden_policies: ForbiddenPolicies = ROOT_ONLY,
    ) -> None:
        self.folder = folder
        self.check_interval = check_interval
        self.forbidden_policies = forbidden_policies
        self._lock = threading.Lock()
        self._fingerprint: tuple[tuple[str, int, int, int], ...] | None = None
        self._checked_at = 0.0
        self._templates: dict[str, LoadedTemplate] = {}
        self.problems: list[LintProblem] = []
        self.refresh(force=True)

    def _scan(self) -> tuple[tuple[str, int, int, int], ...]:
        out = []
        for p in template_files(self.folder):
            try:
                st = p.stat()
            except OSError:
                continue  # removed while we looked
            out.append((p.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self.check_interval:
            return
        with self._lock:
            self._checked_at = now
            fingerprint = self._scan()
            if fingerprint == self._fingerprint and not force:
                return
            templates, problems = load_folder(self.folder, forbidden=self.forbidden_policies)
            if self._fingerprint is not None:
                changed = sorted(
                    n
                    for n in set(templates) | set(self._templates)
                    if (templates.get(n) and templates[n].content_hash)
                    != (self._templates.get(n) and self._templates[n].content_hash)
                )
                if changed:
                    log.info("scope templates reloaded; changed: %s", ", ".join(changed))
            for problem in problems:
                if problem.severity == "error":
                    log.warning("scope template refused: %s", problem)
            self._templates, self.problems = templates, problems
            self._fingerprint = fingerprint

    def get(self, name: str) -> LoadedTemplate:
        self.refresh()
        loaded = self._templates.get(name)
        if loaded is None:
            raise NotFound(f"no scope template named {name!r}", code="unknown_scope")
        return loaded

    def all(self) -> list[LoadedTemplate]:
        self.refresh()
        return sorted(self._templates.values(), key=lambda t: t.template.name)
