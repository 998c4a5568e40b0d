"""Point configuration errors at the file and line they come from.

Pydantic reports where a value sits in the settings tree (``issuers.0.trust.all.1.regex``); an
admin needs ``/etc/broker/broker.yaml:23``. This module walks the YAML file's node tree along
that path and returns the line of the deepest node it reaches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml


def line_of(path: Path, loc: Sequence[str | int]) -> int | None:
    """The 1-based line in the YAML file ``path`` of the node at ``loc`` (or its nearest parent)."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    line: int | None = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(
                (
                    (k, v)
                    for k, v in node.value
                    if isinstance(k, yaml.ScalarNode) and k.value == str(part)
                ),
                None,
            )
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def config_location(
    loc: Sequence[str | int],
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> str | None:
    """``FILE:LINE`` of the value at ``loc`` in the file named by ``BROKER_CONFIG``, when it came
    from that file (not from a ``BROKER_*`` variable or an explicit override, which win)."""
    env = os.environ if environ is None else environ
    config = env.get("BROKER_CONFIG")
    if not config or not loc:
        return None
    top = str(loc[0])
    if overrides and top in overrides:
        return None
    prefix = f"BROKER_{top.upper()}"
    if any(k.upper() == prefix or k.upper().startswith(prefix + "__") for k in env):
        return None
    line = line_of(Path(config), loc)
    return f"{config}:{line}" if line is not None else None
