"""Validate an agent's parameters against a template before anything uses them.

Public errors say which parameter failed and how, never the template's pattern (agents read the
parameter schema from ``GET /v1/scopes``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from broker.domain.scope import Parameter, ParamType, ScopeTemplate
from broker.errors import ValidationFailed

#: Characters a parameter may never carry, whatever its pattern says: path traversal, globs,
#: separators, quoting, template braces, IAM policy variables (``$``), URL escapes (``%``, which
#: could smuggle ``..`` or ``/`` past a check) and control characters.
FORBIDDEN = re.compile(r"\.\.|[*?\[\]{},\"'`\\$%#\x00-\x1f\x7f]")

#: Most parameters one request may carry, and the longest name echoed back in an error.
MAX_PARAMS = 64
_MAX_ECHO = 64


def _fail(name: str, message: str, code: str = "invalid_parameter") -> ValidationFailed:
    return ValidationFailed(f"parameter {name!r} {message}", code=code, extra={"parameter": name})


def _echo(name: object) -> str:
    text = str(name)
    return repr(text[:_MAX_ECHO] + ("..." if len(text) > _MAX_ECHO else ""))


def check_string(name: str, spec: Parameter, value: Any) -> str:
    """A string value that fits ``spec`` and carries nothing a backend could misread."""
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
    if FORBIDDEN.search(value):
        raise _fail(
            name,
            "contains a character that is never allowed (globs, quotes, commas, braces, '$', '%', '..')",
        )
    if not spec.pattern_matches(value):
        raise _fail(name, "does not match the pattern the template requires")
    return value


def check_value(name: str, spec: Parameter, value: Any) -> Any:
    """Validate one value of any type against its parameter spec."""
    if spec.type is ParamType.STRING:
        value = check_string(name, spec, value)
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
    return value


def validate_params(template: ScopeTemplate, params: Mapping[str, Any]) -> dict[str, Any]:
    """Return the validated parameters with defaults applied, or raise ``ValidationFailed``."""
    if not isinstance(params, Mapping):
        raise ValidationFailed("params must be an object", code="invalid_parameter")
    if len(params) > MAX_PARAMS:
        raise ValidationFailed(f"at most {MAX_PARAMS} parameters", code="unknown_parameter")
    unknown = sorted(str(k) for k in set(params) - set(template.parameters))
    if unknown:
        raise ValidationFailed(
            f"unknown parameters: {', '.join(_echo(u) for u in unknown[:5])}",
            code="unknown_parameter",
        )
    out: dict[str, Any] = {}
    for name, spec in template.parameters.items():
        if name not in params or params[name] is None:
            if spec.default is not None:
                out[name] = spec.default
                continue
            if spec.required:
                raise _fail(name, "is required", code="missing_parameter")
            continue
        out[name] = check_value(name, spec, params[name])
    return out
