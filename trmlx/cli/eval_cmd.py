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
from trmlx.recipe.schema import BACKEND_NAMES

if TYPE_CHECKING:
    from trmlx.recipe import Recipe
    from trmlx.rundir import RunDir



@dataclass(frozen=True)
class Target:
    """What eval and generate run: a resolved recipe, the adapter to attach (None = base model), the backend,
    and the run directory when the target was one."""

    recipe: "Recipe"
    adapter: Path | None
    backend: str
    run: "RunDir | None"
    adapter_source: Path | None = None  # the folder the user named, when `adapter` is its PEFT form (mlx-lm)


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
        hint = (f"trmlx train --resume {run.path} writes it again from the last checkpoint" if not adapter
                else "expected a complete PEFT adapter folder")
        return _with_adapter(load_recipe(run.recipe, overrides, chosen), adapter_path if use_adapter else None,
                             chosen, run, hint)
    if path.is_file():
        chosen = backend or "mlx"
        if adapter and not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"--adapter {adapter}: no adapter_config.json; expected a PEFT adapter folder or an "
                            "mlx-lm one (adapters.safetensors + adapter_config.json)")
        return _with_adapter(load_recipe(path, overrides, chosen), Path(adapter) if adapter and use_adapter else None,
                             chosen, None, "expected a complete PEFT adapter folder")
    raise UserError(f"{target}: no such run directory or recipe file")


def _with_adapter(recipe: "Recipe", adapter: Path | None, backend: str, run: "RunDir | None",
                  hint: str = "") -> Target:
    """The Target; an mlx-lm adapter is converted to its PEFT form here, once, so both backends load it as usual.
    An adapter cut off by a kill or a full disk is a one-line error here, before any model loads."""
    from trmlx import mlxlm
    from trmlx.integrity import check_adapter

    if adapter is None:
        return Target(recipe, adapter, backend, run)
    check_adapter(adapter, hint)
    if not mlxlm.is_mlxlm_adapter(adapter):
        return Target(recipe, adapter, backend, run)
    if recipe.task != "causal":
        raise UserError(f"{adapter}: an mlx-lm adapter is for a causal language model; this recipe's task is "
                        f"{recipe.task!r}")
    return Target(recipe, mlxlm.as_peft_adapter(adapter), backend, run, adapter_source=adapter)


def _run_backend(run: "RunDir") -> str:
    """The backend a run was trained with (environment.json), so eval uses the same one unless told otherwise."""
    try:
        name = json.loads(run.environment.read_text()).get("backend")
    except (OSError, ValueError):
        return "mlx"
    return name if name in BACKEND_NAMES else "mlx"


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
@click.argument("targets", nargs=-1, required=True, metavar="RUN_DIR|RECIPE...")
@click.option("--adapter", type=click.Path(file_okay=False), default=None,
              help="PEFT or mlx-lm adapter folder (default RUN_DIR/adapter; with a RECIPE and no --adapter: the base "
                   "model).")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None,
              help="Framework to run on (default: the run's backend from environment.json, else mlx).")
@click.option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True,
              help="Which split of the recipe's data to evaluate.")
@click.option("--max-samples", type=click.IntRange(min=0), default=None,
              help="Evaluate the first N examples; 0 = all (default eval.max_samples).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Prompts per batched generation (default eval.batch_size).")
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Folder for predictions/<split>.jsonl and eval_<split>.json (default: RUN_DIR; with a RECIPE "
                   "runs/<name>-eval-<timestamp>; with --compare runs/compare-<timestamp>).")
@click.option("--compare", is_flag=True,
              help="Compare RUN_A RUN_B ... on the same split: every metric side by side, with paired bootstrap "
                   "differences to the first (95% interval, p-value), as a table, JSON and PNG.")
@click.option("--base", "with_base", is_flag=True,
              help="With --compare: add the first run's base model (no adapter) as the reference system.")
@set_option
@json_option
def eval_command(targets: tuple[str, ...], adapter: str | None, backend: str | None, split: str,
                 max_samples: int | None, batch_size: int | None, output: str | None, compare: bool,
                 with_base: bool, overrides: tuple[str, ...], as_json: bool) -> None:
    """Generate on a split and score it: BLEU/chrF (or the recipe's metrics), loss and perplexity.

    Embedding recipes and runs: retrieval against the corpus of all answers (accuracy@k, MRR@10, NDCG@10, ...);
    `trmlx eval RUN_DIR --compare --base` (or `--compare base`) is the before/after table."""
    from trmlx.cli.embed_eval import eval_embedding, is_embedding_target

    if any(is_embedding_target(t) for t in targets):
        eval_embedding(targets, adapter, backend, split, max_samples, batch_size, output, compare, with_base,
                       overrides, as_json)
        return
    if compare:
        _compare(targets, backend, split, max_samples, batch_size, output, with_base, overrides, as_json)
        return
    if len(targets) != 1 or with_base:
        raise UserError("eval: give one RUN_DIR or RECIPE (several only with --compare; --base only with --compare)")
    resolved = resolve_target(targets[0], adapter, backend, overrides)
    from trmlx.rundir import RunDir, default_run_path

    out_dir = RunDir(Path(output) if output else resolved.run.path if resolved.run
                     else default_run_path(f"{resolved.recipe.name}-eval"))
    from trmlx.integrity import ensure_writable

    ensure_writable(out_dir.predictions(split).parent, "checking that eval can save its predictions")
    emit(_evaluate(resolved, split, max_samples, batch_size, out_dir, split, as_json), as_json, _render)


def _evaluate(resolved: Target, split: str, max_samples: int | None, batch_size: int | None, out_dir: "RunDir",
              name: str, quiet: bool) -> dict[str, Any]:
    """Evaluate one target; writes out_dir/predictions/<name>.jsonl and out_dir/eval_<name>.json."""
    from trmlx.backend import get_backend
    from trmlx.data import prepare_data
    from trmlx.evaluate import evaluate_split
    from trmlx.rundir import atomic_write

    recipe = resolved.recipe
    if batch_size:
        recipe = replace(recipe, eval=replace(recipe.eval, batch_size=batch_size))
    records = prepare_data(recipe).split(split)
    if not records:
        raise UserError(f"--split {split}: the recipe has no {split} data (set data.{split} or "
                        f"data.{split}_ratio)")
    runner = get_backend(resolved.backend)
    loaded = runner.load(recipe, resolved.adapter)
    limit = recipe.eval.max_samples if max_samples is None else max_samples
    predictions = out_dir.predictions(name)
    with _progress(disabled=quiet) as update:
        result = evaluate_split(runner, loaded, recipe, records, predictions, limit, progress=update)
    report = out_dir.path / f"eval_{name}.json"
    result = {"split": split, "backend": resolved.backend, "recipe": recipe.name,
              "adapter": str(resolved.adapter_source or resolved.adapter) if resolved.adapter else None, **result,
              "predictions": str(predictions), "report": str(report)}
    atomic_write(report, json.dumps(result, indent=2, ensure_ascii=False))
    return result


def _compare(targets: tuple[str, ...], backend: str | None, split: str, max_samples: int | None,
             batch_size: int | None, output: str | None, with_base: bool, overrides: tuple[str, ...],
             as_json: bool) -> None:
    from trmlx.compare import compare_systems, plot_comparison, read_predictions, system_names
    from trmlx.rundir import RunDir, atomic_write, default_run_path

    if len(targets) + with_base < 2:
        raise UserError("--compare: give at least two run directories, or one with --base")
    resolved = [resolve_target(t, None, backend, overrides) for t in targets]
    if any(r.run is None for r in resolved):
        raise UserError("--compare: every target must be a run directory (trmlx train's output)")
    systems: dict[str, list[dict[str, Any]]] = {}
    names = system_names(targets)
    if with_base:
        first = resolved[0]
        base = Target(first.recipe, None, first.backend, first.run)
        _evaluate(base, split, max_samples, batch_size, first.run, f"{split}-base", True)
        systems["base"] = read_predictions(first.run.predictions(f"{split}-base"))
    for name, target in zip(names, resolved):
        _evaluate(target, split, max_samples, batch_size, target.run, split, True)
        systems[name] = read_predictions(target.run.predictions(split))
    result = compare_systems(resolved[0].recipe, systems)
    out = RunDir(Path(output) if output else default_run_path("compare"))
    result["png"] = str(plot_comparison(result, out.path / "compare.png"))
    result["report"] = str(out.path / "compare.json")
    atomic_write(out.path / "compare.json", json.dumps(result, indent=2, ensure_ascii=False))
    emit(result, as_json, _render_comparison)


def _render_comparison(result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"vs {result['reference']} (paired bootstrap, {result['n_resamples']} resamples)")
    for column in ("task", "metric", "system", "score", "diff", "95% interval", "p"):
        table.add_column(column, justify="left" if column in ("task", "metric", "system") else "right")
    for r in result["rows"]:
        extra = ("", "", "") if "diff" not in r else (f"{r['diff']:+.2f}", f"[{r['ci_low']:+.2f}, "
                                                      f"{r['ci_high']:+.2f}]", f"{r['p_value']:.3f}")
        table.add_row(r["task"], r["metric"], r["system"], f"{r['score']:.2f}", *extra)
    out = console()
    out.print(table)
    out.print(f"chart: {result['png']}\nreport: {result['report']}", highlight=False)


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
