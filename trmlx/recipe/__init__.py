"""Recipes: typed, validated TOML job descriptions. `load_recipe` is the only way in."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from trmlx.recipe.load import build_recipe, load_recipe
from trmlx.recipe.schema import Recipe

__all__ = ["Recipe", "build_recipe", "load_recipe", "recipe_to_dict", "recipe_to_toml", "field_docs"]


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (backend overrides already applied, so `backend` is dropped)."""
    data = dataclasses.asdict(recipe)
    data.pop("backend", None)
    return data


def recipe_to_toml(recipe: Recipe) -> str:
    """TOML text that `load_recipe` reads back into an equal Recipe."""
    import tomli_w

    return tomli_w.dumps(recipe_to_dict(recipe))


def field_docs(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, doc) for every field, in declaration order — what `recipe explain` prints."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list and typing.get_args(hint) else None
        if dataclasses.is_dataclass(hint):
            rows.append((f"{prefix}{f.name}", "table", "", f.metadata["doc"]))
            rows += field_docs(hint, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f"{prefix}{f.name}", _type_text(hint), repr(default), f.metadata["doc"]))
        if inner is not None and dataclasses.is_dataclass(inner):
            rows += field_docs(inner, f"{prefix}{f.name}[].")
    return rows


def _type_text(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union:
        return " | ".join(_type_text(a) for a in args)
    if origin is list:
        return f"list[{_type_text(args[0])}]"
    if origin is dict:
        return "table"
    return getattr(hint, "__name__", str(hint))
