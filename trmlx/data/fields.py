"""Columns by dotted path, as hub datasets nest them: `translation.en` (wmt16), `answers.text` (SQuAD). The same
lookup serves `data.columns`, template placeholders and error messages, so a path that works in one works in all.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MISSING = object()  # a path that does not resolve (distinct from a null value, which is an empty field)
_INDEX = re.compile(r"\[([^\]]*)\]")


@dataclass(frozen=True)
class Row:
    """One raw row and its origin, e.g. 'data/train.jsonl:12'."""

    values: dict[str, Any]
    origin: str


def dotted(name: str) -> str:
    """`answers[text][0]` (str.format's item syntax) → `answers.text.0`, the one spelling paths are compared in."""
    return _INDEX.sub(r".\1", name)


def get_path(values: Mapping[str, Any], path: str) -> Any:
    """The value at `path`, or MISSING. A key spelled with the dot wins (a CSV column may be named `a.b`);
    otherwise walk nested objects by the dotted parts, lists by numeric parts (or by a key all their objects
    have)."""
    if path in values:
        return values[path]
    current: Any = values
    for part in dotted(path).split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        elif isinstance(current, list) and current and all(isinstance(v, Mapping) and part in v for v in current):
            current = [v[part] for v in current]  # answers = [{"text": ...}, ...]: answers.text lists every text
        else:
            return MISSING
    return current


def columns_of(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Top-level columns followed by their nested paths: translation, translation.en, translation.tr (a list of
    objects shows its first object's keys, which get_path collects over the whole list)."""
    out = []
    for key, value in values.items():
        out.append(prefix + key)
        if isinstance(value, list) and value and isinstance(value[0], Mapping):
            value = value[0]
        if isinstance(value, Mapping):
            out += columns_of(value, f"{prefix}{key}.")
    return out


def placeholders(template: str) -> list[str]:
    """The column paths a template fills, in order of first use (`{}` and `{0}` are rejected by the recipe check)."""
    names = [dotted(name) for _, name, _, _ in string.Formatter().parse(template) if name]
    return list(dict.fromkeys(names))


def is_empty(value: Any) -> bool:
    """Null, blank text and empty lists are empty fields: dropped and counted, or an error (data.on_empty)."""
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)


class _PathFormatter(string.Formatter):
    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        # str.format would read `{translation.en}` as an attribute of a dict and fail; resolve it as a path.
        value = get_path(kwargs, field_name)
        if value is MISSING:
            raise KeyError(field_name)
        return value, field_name


_FORMATTER = _PathFormatter()


def render(template: str, fields: Mapping[str, Any]) -> str:
    """Fill {column} and {nested.path} placeholders; the data layer has checked that every one resolves."""
    return _FORMATTER.vformat(template, (), fields)
