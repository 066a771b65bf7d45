"""Load a TOML recipe strictly: every unknown key, wrong type and out-of-range value is reported at once,
each naming the file, the key path, what was expected and the closest valid key.

Precedence, implemented only here: command line (--set) > [backend.NAME] overrides > recipe > default.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal, Union

from trmlx.errors import UserError
from trmlx.recipe.schema import BACKEND_NAMES, Recipe


def load_recipe(path: str | Path, overrides: typing.Iterable[str] = (), backend: str | None = None) -> Recipe:
    """Parse, merge overrides and validate a recipe file; raise UserError listing every problem."""
    path = Path(path)
    raw = read_toml(path)
    return build_recipe(raw, source=str(path), base_dir=path.parent, overrides=overrides, backend=backend,
                        default_name=path.stem)


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; syntax errors name the line and column."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # Windows Notepad starts files with a BOM
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: recipe is not valid UTF-8 (byte 0x{err.object[err.start]:02x})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib's message ends with "(at line L, column C)"; move the position to the front like a compiler.
        msg = str(err)
        pos = msg.rfind(" (at line ")
        if pos >= 0:
            where = msg[pos + 10 : -1].replace(", column ", ":")
            raise UserError(f"{path}:{where}: invalid TOML: {msg[:pos]}") from None
        raise UserError(f"{path}: invalid TOML: {msg}") from None


def build_recipe(
    raw: dict[str, Any],
    source: str,
    base_dir: Path,
    overrides: typing.Iterable[str] = (),
    backend: str | None = None,
    default_name: str = "recipe",
) -> Recipe:
    """Validate a parsed recipe dict (plus overrides) into a Recipe with paths resolved against base_dir."""
    from trmlx.recipe.checks import check_combinations, resolve_paths

    errors: list[str] = []
    raw = dict(raw)
    per_backend = raw.pop("backend", {})
    origins: dict[str, str] = {}
    if not isinstance(per_backend, dict):
        errors.append(f"{source}: backend: expected a table like [backend.mlx], got {_describe(per_backend)}")
        per_backend = {}
    for name, table in per_backend.items():
        if name not in BACKEND_NAMES:
            errors.append(f"{source}: backend.{name}: unknown backend{_suggest(name, BACKEND_NAMES, 'backend.')}; "
                          f"expected one of {', '.join(BACKEND_NAMES)}")
        elif not isinstance(table, dict):
            errors.append(f"{source}: backend.{name}: expected a table, got {_describe(table)}")
        else:  # validate every backend's overrides, not only the chosen one's, so all problems show at once
            _validate(Recipe, {k: v for k, v in table.items() if k != "backend"}, f"backend.{name}.",
                      f"{source}", errors, partial=True)
            if "backend" in table:
                errors.append(f"{source}: backend.{name}.backend: backend overrides cannot nest")
    if backend is not None and backend in per_backend and isinstance(per_backend[backend], dict):
        overlay = per_backend[backend]
        _merge(raw, overlay, "", origins, f"{source} [backend.{backend}]")
    cli = parse_overrides(overrides, errors)
    _merge(raw, cli, "", origins, "--set")
    raw.setdefault("name", default_name)
    recipe = _validate(Recipe, raw, "", source, errors, origins=origins)
    if errors:
        raise UserError(errors)
    recipe = resolve_paths(recipe, base_dir)
    problems = check_combinations(recipe, backend)
    if problems:
        raise UserError([f"{_origin(origins, key, source)}: {key}: {msg}" for key, msg in problems])
    return recipe


def parse_overrides(overrides: typing.Iterable[str], errors: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=2e-4", ...] into a nested dict; values are parsed as TOML, else taken as text."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            errors.append(f"--set {item}: expected KEY=VALUE, e.g. --set train.lr=2e-4")
            continue
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # bare words like --set peft.method=dora
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                errors.append(f"--set {item}: {part} is set twice with different shapes")
                break
        else:
            node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], overlay: dict[str, Any], prefix: str, origins: dict[str, str], label: str) -> None:
    """Deep-merge overlay into base, remembering where each overridden key came from for error messages."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = dict(base[key])
            _merge(base[key], value, f"{prefix}{key}.", origins, label)
        else:
            base[key] = value
            origins[f"{prefix}{key}"] = label


def _origin(origins: dict[str, str], key: str, default: str) -> str:
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return default


def _validate(cls: type, table: Any, prefix: str, source: str, errors: list[str], *, partial: bool = False,
              origins: dict[str, str] | None = None) -> Any:
    """Check `table` against dataclass `cls`, appending one message per problem; return the instance."""
    origins = origins or {}
    if not isinstance(table, dict):
        errors.append(f"{_origin(origins, prefix[:-1], source)}: {prefix[:-1]}: expected a table, "
                      f"got {_describe(table)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        where = _origin(origins, path, source)
        if key not in fields:
            errors.append(f"{where}: {path}: unknown key{_suggest(key, fields, prefix)}")
            continue
        if key == "backend" and cls is Recipe:
            continue
        converted = _convert(value, hints[key], path, where, errors, origins, partial)
        meta = fields[key].metadata
        if isinstance(converted, (int, float)) and not isinstance(converted, bool):
            low, high = meta.get("min"), meta.get("max")
            if (low is not None and converted < low) or (high is not None and converted > high):
                bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
                errors.append(f"{where}: {path}: expected a value {bounds}, got {value!r}")
        values[key] = converted
    if partial:
        return None
    try:
        return cls(**values)
    except TypeError as err:  # only reachable when a conversion above failed and left a wrong value
        errors.append(f"{source}: {prefix or 'recipe'}: {err}")
        return cls()


def _convert(value: Any, hint: Any, path: str, where: str, errors: list[str], origins: dict[str, str],
             partial: bool) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _validate(hint, value, f"{path}.", where, errors, partial=partial, origins=origins)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        choices = ", ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
        close = difflib.get_close_matches(value, [str(a) for a in args], n=1) if isinstance(value, str) else []
        tail = f"; did you mean {close[0]!r}?" if close else ""
        errors.append(f"{where}: {path}: expected one of {choices}, got {_describe(value)}{tail}")
        return args[0]
    if origin is Union:
        for alternative in args:
            trial: list[str] = []
            result = _convert(value, alternative, path, where, trial, origins, partial)
            if not trial:
                return result
        errors.append(f"{where}: {path}: expected {' or '.join(_type_name(a) for a in args)}, got {_describe(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{where}: {path}: expected {_type_name(hint)}, got {_describe(value)}")
            return []
        return [_convert(v, args[0], f"{path}[{i}]", where, errors, origins, partial) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: {path}: expected a table, got {_describe(value)}")
            return {}
        if args and args[1] is str:
            for k, v in value.items():
                if not isinstance(v, str):
                    errors.append(f"{where}: {path}.{k}: expected a string, got {_describe(v)}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    errors.append(f"{where}: {path}: expected {_type_name(hint)}, got {_describe(value)}")
    return value


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0]).split(' ', 1)[-1]}s"
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return "a table"
    return str(hint)


def _describe(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    return f"{value!r} ({kinds.get(type(value), type(value).__name__)})"


def _suggest(key: str, candidates: typing.Iterable[str], prefix: str) -> str:
    """`; did you mean `train.grad_accum`?` for the closest valid key, or the list of valid keys."""
    candidates = list(candidates)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return f"; did you mean `{prefix}{close[0]}`?"
    return f"; valid keys: {', '.join(candidates)}"
