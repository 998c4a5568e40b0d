"""Validate an agent's parameters against a template before anything uses them."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from broker.domain.scope import Parameter, ParamType, ScopeTemplate
from broker.errors import ValidationFailed

#: Characters a parameter may never carry, whatever its pattern says: path traversal, globs,
#: separators and quoting that could widen a Vault path or policy.
_FORBIDDEN = re.compile(r"\.\.|[*?\[\]{},\"'`\\\x00-\x1f\x7f]")


def _fail(name: str, message: str) -> ValidationFailed:
    return ValidationFailed(
        f"parameter {name!r} {message}", code="invalid_parameter", extra={"parameter": name}
    )


def _check_string(name: str, spec: Parameter, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(name, "must be a string")
    if unicodedata.normalize("NFC", value) != value or any(
        unicodedata.category(c)[0] == "C" for c in value
    ):
        raise _fail(name, "contains control or non-normalised characters")
    if len(value) > spec.max_length or (
        spec.min_length is not None and len(value) < spec.min_length
    ):
        raise _fail(name, f"must be {spec.min_length or 0} to {spec.max_length} characters long")
    if _FORBIDDEN.search(value):
        raise _fail(
            name, "contains a character that is never allowed (globs, quotes, commas, '..')"
        )
    if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
        raise _fail(name, "does not match the pattern the template requires")
    return value


def validate_params(template: ScopeTemplate, params: dict[str, Any]) -> dict[str, Any]:
    """Return the validated parameters with defaults applied, or raise ``ValidationFailed``."""
    unknown = sorted(set(params) - set(template.parameters))
    if unknown:
        raise ValidationFailed(
            f"unknown parameters: {', '.join(repr(u) for u in unknown)}", code="unknown_parameter"
        )
    out: dict[str, Any] = {}
    for name, spec in template.parameters.items():
        if name not in params:
            if spec.default is not None:
                out[name] = spec.default
                continue
            if spec.required:
                raise _fail(name, "is required")
            continue
        value = params[name]
        if spec.type is ParamType.STRING:
            value = _check_string(name, spec, value)
        elif spec.type is ParamType.INTEGER:
            if isinstance(value, bool) or not isinstance(value, int):
                raise _fail(name, "must be an integer")
            if (spec.minimum is not None and value < spec.minimum) or (
                spec.maximum is not None and value > spec.maximum
            ):
                raise _fail(name, f"must be between {spec.minimum} and {spec.maximum}")
        elif spec.type is ParamType.BOOLEAN and not isinstance(value, bool):
            raise _fail(name, "must be true or false")
        if spec.enum is not None and value not in spec.enum:
            raise _fail(name, "is not one of the allowed values")
        out[name] = value
    return out
