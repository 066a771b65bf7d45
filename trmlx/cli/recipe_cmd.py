"""`trmlx recipe explain` (every field with type, default and doc) and `trmlx recipe show` (the resolved recipe)."""

from __future__ import annotations

import click

from trmlx.cli.common import console as common_console
from trmlx.cli.common import emit, json_option, set_option
from trmlx.recipe.schema import BACKEND_NAMES


@click.group("recipe")
def recipe() -> None:
    """Inspect recipe fields and resolved recipes."""


@recipe.command("explain")
@click.argument("section", required=False)
@json_option
def explain(section: str | None, as_json: bool) -> None:
    """List every recipe field (or those under SECTION, e.g. train) with its type, default and meaning."""
    from trmlx.errors import UserError
    from trmlx.recipe import field_docs

    rows = [r for r in field_docs() if section is None or r[0] == section or r[0].startswith(f"{section}.")
            or r[0].startswith(f"{section}[")]
    if not rows:
        sections = sorted({r[0].split(".")[0] for r in field_docs()})
        raise UserError(f"recipe explain: no section {section!r}; sections: {', '.join(sections)}")

    def render(rows: list[tuple[str, str, str, str]]) -> None:
        from rich.table import Table

        table = Table("key", "type", "default", "meaning", show_lines=False)
        for key, kind, default, doc in rows:
            table.add_row(key, kind, default, doc)
        common_console().print(table)

    emit([dict(zip(("key", "type", "default", "doc"), r)) for r in rows] if as_json else rows, as_json, render)


@recipe.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None, help="Apply this backend's overrides.")
@set_option
@json_option
def show(path: str, backend: str | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the resolved recipe: defaults, then the recipe, its [backend.NAME] overrides and --set, in that order."""
    from trmlx.recipe import load_recipe, recipe_to_dict, recipe_to_toml

    resolved = load_recipe(path, overrides, backend)
    emit(recipe_to_dict(resolved), as_json, lambda _: click.echo(recipe_to_toml(resolved), nl=False))
