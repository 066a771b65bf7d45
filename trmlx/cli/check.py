"""`trmlx check RECIPE...`: validate recipes and their data, print a summary table per recipe."""

from __future__ import annotations

from typing import Any

import click

from trmlx.cli.common import console as common_console
from trmlx.cli.common import emit, json_option, set_option
from trmlx.errors import UserError
from trmlx.recipe.schema import BACKEND_NAMES


@click.command("check")
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None,
              help="Also check the settings against this backend and apply its [backend.NAME] overrides.")
@click.option("--no-tokenizer", is_flag=True, help="Skip token-length statistics even if the tokenizer is local.")
@set_option
@json_option
def check(recipes: tuple[str, ...], backend: str | None, no_tokenizer: bool, overrides: tuple[str, ...],
          as_json: bool) -> None:
    """Validate RECIPES and their data: rows per split and task, dropped and duplicate rows, length percentiles.

    Every problem is reported at once, each naming the file, line or key. Exit code 2 if any recipe is invalid.
    """
    from trmlx import continued
    from trmlx.data import prepare_data
    from trmlx.data.summary import load_local_tokenizer, summarize
    from trmlx.recipe import load_recipe

    results, problems = [], []
    for path in recipes:
        try:
            recipe = load_recipe(path, overrides, backend)
            start = continued.resolve(recipe)  # the start adapter is read now, as `trmlx train` will read it
            data = prepare_data(recipe)
            tokenizer, why = (None, "skipped (--no-tokenizer)") if no_tokenizer else load_local_tokenizer(
                recipe.model.path)
            summary = summarize(recipe, data, tokenizer)
            summary["path"] = path
            if start is not None and start.replaced:
                summary["warnings"].append(f"peft.init_adapter: the adapter's own settings replace the recipe's "
                                           f"{', '.join(start.replaced)}")
            summary["tokenizer"] = recipe.model.path if tokenizer is not None else why
            results.append(summary)
        except UserError as err:
            problems += err.problems
    emit(results, as_json, _render)
    if problems:
        raise UserError(problems)


def _render(results: list[dict[str, Any]]) -> None:
    from rich.table import Table

    console = common_console()
    for s in results:
        table = Table(title=f"{s['path']} — {s['task']}, model {s['model']}", title_justify="left")
        for column in ("split", "task", "rows", "input chars p50/p90/max", "target chars p50/p90/max",
                       "tokens p50/p90/p99/max"):
            table.add_column(column, justify="right" if column != "task" else "left")
        for split, per_task in s["rows"].items():
            for task, rows in per_task.items():
                lengths = s.get("task_lengths", {}).get(split, {}).get(task) or s["lengths"].get(split, {})
                table.add_row(split, task or "-", str(rows), _fmt(lengths.get("input_chars"), 3),
                              _fmt(lengths.get("target_chars"), 3), _fmt(lengths.get("tokens"), 4))
        console.print(table)
        if s.get("dataset"):
            ds = s["dataset"]
            taken = ", ".join(f"{ours} ← {v['split']} ({v['rows']:,} rows)" for ours, v in ds["splits"].items())
            config = f" ({ds['config']})" if ds["config"] else ""
            console.print(f"  dataset {ds['name']}{config}: {taken}; splits present: {', '.join(ds['available'])}",
                          highlight=False)
        for m in s["mixture"]:
            console.print(f"  mixture: {m['task']}: {m['rows']} rows × {m['upsample']:g} upsample → {m['drawn']} "
                          f"drawn ({m['share']:.1%} of training)")
        for split, t in s["too_long"].items():
            if t["truncated"] or t["dropped"]:
                console.print(f"  [yellow]{split}: {t['truncated']} truncated, {t['dropped']} dropped at max_length "
                              f"{t['max_length']} (of {t['rows_checked']} rows checked)[/]")
        if s.get("batches"):
            b, on = s["batches"], s["batches"]["packing"]
            console.print(f"  train batches of {b['batch_size']}: bucketed {b['bucketed']['batches']} a pass, "
                          f"{b['bucketed']['padding']:.0%} padding{' (in use)' if not on else ''}; packed "
                          f"{b['packed']['batches']} of {b['packed']['width']}-position rows, "
                          f"{b['packed']['padding']:.0%} padding{' (in use)' if on else ' (data.packing = true)'}",
                          highlight=False)
        for warning in s["warnings"]:
            console.print(f"  [yellow]warning:[/] {warning}")
        console.print(f"  tokenizer: {s['tokenizer']}\n")


def _fmt(p: dict[str, int] | None, n: int) -> str:
    if not p:
        return "-"
    keys = ("p50", "p90", "max") if n == 3 else ("p50", "p90", "p99", "max")
    return "/".join(str(p[k]) for k in keys)
