"""Load scope templates from a folder, with errors that name file, line and field.

The catalog reloads a folder when a file in it changed (checked at most once per
``check_interval`` seconds), so admins never restart the broker to publish a template.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from broker.domain.scope import ScopeTemplate
from broker.errors import NotFound

SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class LintProblem:
    """One problem in one template file."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}"


@dataclass(frozen=True, slots=True)
class LoadedTemplate:
    template: ScopeTemplate
    path: Path
    content_hash: str


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


def parse_template(
    path: Path, text: str | None = None
) -> tuple[LoadedTemplate | None, list[LintProblem]]:
    """Parse and validate one file; returns the template or the problems found."""
    raw = path.read_bytes() if text is None else text.encode()
    name = str(path)
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
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
            field = ".".join(str(p) for p in loc) or "(template)"
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(LintProblem(name, _line_of(root, loc), field, msg))
        return None, problems
    expected = path.stem
    if template.name != expected:
        return None, [
            LintProblem(
                name, _line_of(root, ("name",)), "name", f"must match the file name ({expected!r})"
            )
        ]
    digest = hashlib.sha256(raw).hexdigest()
    return LoadedTemplate(template, path, digest), []


_UNION_TAGS = {"vault_token", "vault_database", "aws_sts", "broker_jwt"}


def template_files(folder: Path) -> list[Path]:
    return (
        sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        if folder.is_dir()
        else []
    )


def load_folder(folder: Path) -> tuple[dict[str, LoadedTemplate], list[LintProblem]]:
    templates: dict[str, LoadedTemplate] = {}
    problems: list[LintProblem] = []
    if not folder.is_dir():
        return {}, [LintProblem(str(folder), None, "(folder)", "no such folder")]
    for path in template_files(folder):
        loaded, errs = parse_template(path)
        problems.extend(errs)
        if loaded is not None:
            if loaded.template.name in templates:
                problems.append(LintProblem(str(path), None, "name", "duplicate template name"))
            templates[loaded.template.name] = loaded
    return templates, problems


class ScopeCatalog:
    """The templates the broker serves, reloaded when their folder changes.

    A file that fails validation is skipped (and reported through ``problems``) so one bad edit
    cannot take the other templates down; the last good version of that file is *not* kept,
    because an admin who breaks a template must not leave an older grant silently in force.
    """

    def __init__(self, folder: Path, *, check_interval: float = 1.0) -> None:
        self.folder = folder
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._fingerprint: tuple[tuple[str, float, int], ...] | None = None
        self._checked_at = 0.0
        self._templates: dict[str, LoadedTemplate] = {}
        self.problems: list[LintProblem] = []
        self.refresh(force=True)

    def _scan(self) -> tuple[tuple[str, float, int], ...]:
        out = []
        for p in template_files(self.folder):
            st = p.stat()
            out.append((p.name, st.st_mtime, st.st_size))
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
            self._templates, self.problems = load_folder(self.folder)
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
