"""`trmlx eval RUN_DIR` (or `trmlx eval RECIPE --adapter DIR`): batched generation on a split, Turkish-correct
metrics, predictions JSONL and eval_<split>.json in the run directory. The backend is imported only when it runs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from trmlx.cli.common import console, emit, json_option, set_option
from trmlx.errors import UserError

if TYPE_CHECKING:
    from trmlx.recipe import Recipe
    from trmlx.rundir import RunDir

BACKENDS = ("mlx", "cuda")


@dataclass(frozen=True)
class Target:
    """What eval and generate run: a resolved recipe, the adapter to attach (None = base model), the backend,
    and the run directory when the target was one."""

    recipe: "Recipe"
    adapter: Path | None
    backend: str
    run: "RunDir | None"


def resolve_target(target: str, adapter: str | None, backend: str | None, overrides: tuple[str, ...] = (),
                   use_adapter: bool = True) -> Target:
    """RUN_DIR (its recipe.toml, adapter/ and environment.json's backend) or RECIPE (+ optional --adapter)."""
    from trmlx.recipe import load_recipe
    from trmlx.rundir import RunDir

    path = Path(target)
    if path.is_dir():
        run = RunDir(path)
        if not run.recipe.is_file():
            raise UserError(f"{target}: not a run directory (no recipe.toml); give a run directory, or a recipe "
                            "file with --adapter DIR")
        chosen = backend or _run_backend(run)
        adapter_path = Path(adapter) if adapter else run.adapter
        if use_adapter and not (adapter_path / "adapter_config.json").is_file():
            raise UserError(f"{adapter_path}: no adapter_config.json (has training finished?); pass --adapter DIR "
                            "or evaluate the base model with the recipe file")
        return Target(load_recipe(run.recipe, overrides, chosen), adapter_path if use_adapter else None, chosen, run)
    if path.is_file():
        chosen = backend or "mlx"
        if adapter and not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"--adapter {adapter}: no adapter_config.json; expected a PEFT adapter folder")
        return Target(load_recipe(path, overrides, chosen), Path(adapter) if adapter and use_adapter else None,
                      chosen, None)
    raise UserError(f"{target}: no such run directory or recipe file")


def _run_backend(run: "RunDir") -> str:
    """The backend a run was trained with (environment.json), so eval uses the same one unless told otherwise."""
    try:
        name = json.loads(run.environment.read_text()).get("backend")
    except (OSError, ValueError):
        return "mlx"
    return name if name in BACKENDS else "mlx"


def _render(result: dict[str, Any]) -> None:
    from rich.table import Table

    out = console()
    gen = result["generation"]
    out.print(f"[bold]{result['split']}[/bold]: {result['n']} examples, {result['backend']} backend, "
              f"{gen['tokens']} tokens generated in {gen['seconds']:.1f} s ({gen['tokens_per_second'] or 0:,.1f} "
              "tokens/s)", highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("score", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, f"{value:.4f}" if key in ("loss", "perplexity") else f"{value:.2f}")
    out.print(table)
    if result["per_task"]:
        keys = list(dict.fromkeys(k for scores in result["per_task"].values() for k in scores))
        tasks = Table(title="per task (macro = headline)")
        tasks.add_column("task")
        for key in keys:
            tasks.add_column(key, justify="right")
        for task, scores in result["per_task"].items():
            tasks.add_row(task, *(f"{scores[k]:.2f}" if k in scores else "-" for k in keys))
        out.print(tasks)
    for key, sig in result["signatures"].items():
        out.print(f"[dim]{key}: {sig}[/dim]", highlight=False)
    out.print(f"predictions: {result['predictions']}\nreport: {result['report']}", highlight=False)


@click.command("eval")
@click.argument("target", metavar="RUN_DIR|RECIPE")
@click.option("--adapter", type=click.Path(file_okay=False), default=None,
              help="PEFT adapter folder (default RUN_DIR/adapter; with a RECIPE and no --adapter: the base model).")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Framework to run on (default: the run's backend from environment.json, else mlx).")
@click.option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True,
              help="Which split of the recipe's data to evaluate.")
@click.option("--max-samples", type=click.IntRange(min=0), default=None,
              help="Evaluate the first N examples; 0 = all (default eval.max_samples).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Prompts per batched generation (default eval.batch_size).")
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Folder for predictions/<split>.jsonl and eval_<split>.json (default: RUN_DIR; with a RECIPE "
                   "runs/<name>-eval-<timestamp>).")
@set_option
@json_option
def eval_command(target: str, adapter: str | None, backend: str | None, split: str, max_samples: int | None,
                 batch_size: int | None, output: str | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Generate on a split and score it: BLEU/chrF (or the recipe's metrics), loss and perplexity."""
    from trmlx.backend import get_backend
    from trmlx.data import prepare_data
    from trmlx.evaluate import evaluate_split
    from trmlx.rundir import RunDir, atomic_write, default_run_path

    resolved = resolve_target(target, adapter, backend, overrides)
    recipe = resolved.recipe
    if batch_size:
        recipe = replace(recipe, eval=replace(recipe.eval, batch_size=batch_size))
    out_dir = RunDir(Path(output) if output else resolved.run.path if resolved.run
                     else default_run_path(f"{recipe.name}-eval"))
    records = prepare_data(recipe).split(split)
    if not records:
        raise UserError(f"--split {split}: the recipe has no {split} data (set data.{split} or "
                        f"data.{split}_ratio)")
    runner = get_backend(resolved.backend)
    loaded = runner.load(recipe, resolved.adapter)
    limit = recipe.eval.max_samples if max_samples is None else max_samples
    predictions = out_dir.predictions(split)
    with _progress(disabled=as_json) as update:
        result = evaluate_split(runner, loaded, recipe, records, predictions, limit, progress=update)
    report = out_dir.path / f"eval_{split}.json"
    result = {"split": split, "backend": resolved.backend, "recipe": recipe.name,
              "adapter": str(resolved.adapter) if resolved.adapter else None, **result,
              "predictions": str(predictions), "report": str(report)}
    atomic_write(report, json.dumps(result, indent=2, ensure_ascii=False))
    emit(result, as_json, _render)


class _progress:
    """A transient progress bar on stderr while batches generate; silent for --json or when stderr is piped."""

    def __init__(self, disabled: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True,
                            disable=disabled or not sys.stderr.isatty())
        self.task = self.bar.add_task("eval", total=None)

    def __enter__(self):
        self.bar.__enter__()
        return lambda done, total: self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)
