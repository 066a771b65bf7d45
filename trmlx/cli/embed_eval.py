"""`trmlx eval` for embedding recipes and runs: every held-out question searches the corpus of all answers;
retrieval metrics, predictions JSONL (top-k answers per question) and eval_<split>.json. With --compare: the base
model (`--base`, or the word `base` among the targets) and runs side by side, with paired bootstrap intervals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trmlx.cli.common import console, emit
from trmlx.errors import UserError
from trmlx.recipe.schema import BACKEND_NAMES


def is_embedding_target(target: str) -> bool:
    """Whether a RUN_DIR's recipe.toml or a RECIPE file is an embedding recipe: its task as the recipe loader reads
    it, the schema's default when unset (validation comes later, on the path that target takes)."""
    from trmlx.recipe.load import read_toml
    from trmlx.recipe.schema import Recipe

    path = Path(target)
    recipe = path / "recipe.toml" if path.is_dir() else path
    if recipe.suffix != ".toml" or not recipe.is_file():
        return False
    try:
        return read_toml(recipe).get("task", Recipe.task) == "embedding"
    except UserError:  # not readable as TOML: the causal path reports it, with the line
        return False


@dataclass(frozen=True)
class System:
    """One model to evaluate: the recipe it belongs to, its folder (None = the recipe's base model), the backend
    and the run directory (None for a recipe file)."""

    recipe: Any
    model: Path | None
    backend: str
    run: Path | None


def run_backend(run: Path) -> str:
    try:
        name = json.loads((run / "environment.json").read_text()).get("backend")
    except (OSError, ValueError):
        return "mlx"
    return name if name in BACKEND_NAMES else "mlx"


def resolve_system(target: str, backend: str | None, overrides: tuple[str, ...]) -> System:
    from trmlx.embedding.examples import MODEL_DIR
    from trmlx.recipe import load_recipe

    path = Path(target)
    if path.is_dir():
        if not (path / "recipe.toml").is_file():
            raise UserError(f"{target}: not a run directory (no recipe.toml)")
        chosen = backend or run_backend(path)
        model = path / MODEL_DIR
        if not (model / "modules.json").is_file():
            raise UserError(f"{model}: no modules.json (has training finished?); evaluate the base model with the "
                            "recipe file")
        return System(load_recipe(path / "recipe.toml", overrides, chosen), model, chosen, path)
    if path.is_file():
        chosen = backend or "mlx"
        return System(load_recipe(path, overrides, chosen), None, chosen, None)
    raise UserError(f"{target}: no such run directory or recipe file")


def evaluate_system(system: System, split: str, max_samples: int | None, batch_size: int | None, out_dir: Path,
                    name: str) -> dict[str, Any]:
    """Retrieval on one split; writes out_dir/predictions/<name>.jsonl and out_dir/eval_<name>.json."""
    from trmlx.data import prepare_data
    from trmlx.backend import get_embedding_backend
    from trmlx.embedding.eval import corpus_of, evaluate_retrieval, queries_of
    from trmlx.rundir import atomic_write

    recipe = system.recipe
    if batch_size:
        recipe = replace(recipe, eval=replace(recipe.eval, batch_size=batch_size))
    data = prepare_data(recipe)
    records = data.split(split)
    if not records:
        raise UserError(f"--split {split}: the recipe has no {split} data (set data.{split} or data.{split}_ratio)")
    queries = queries_of(records)
    limit = recipe.eval.max_samples if max_samples is None else max_samples
    queries = queries[:limit] if limit else queries
    model = get_embedding_backend(system.backend).load(recipe, system.model)
    predictions = out_dir / "predictions" / f"{name}.jsonl"
    result = evaluate_retrieval(model, recipe, queries, corpus_of(data), predictions)
    report = out_dir / f"eval_{name}.json"
    result = {"split": split, "backend": system.backend, "recipe": recipe.name,
              "model": str(system.model) if system.model else recipe.model.path, **result,
              "predictions": str(predictions), "report": str(report)}
    atomic_write(report, json.dumps(result, indent=2, ensure_ascii=False))
    return result


def eval_embedding(targets: tuple[str, ...], adapter: str | None, backend: str | None, split: str,
                   max_samples: int | None, batch_size: int | None, output: str | None, compare: bool,
                   with_base: bool, overrides: tuple[str, ...], as_json: bool) -> None:
    from trmlx.rundir import default_run_path

    if adapter:
        raise UserError("--adapter: an embedding run keeps its whole model in RUN_DIR/model; give the run directory")
    names = list(targets)
    if compare and "base" in names and not Path("base").exists():  # `eval RUN --compare base`
        names.remove("base")
        with_base = True
    if not compare:
        if len(names) != 1 or with_base:
            raise UserError("eval: give one RUN_DIR or RECIPE (several only with --compare; --base only with "
                            "--compare)")
        system = resolve_system(names[0], backend, overrides)
        out = Path(output) if output else system.run or default_run_path(f"{system.recipe.name}-eval")
        emit(evaluate_system(system, split, max_samples, batch_size, out, split), as_json, _render)
        return
    _compare(names, backend, split, max_samples, batch_size, output, with_base, overrides, as_json)


def _compare(targets: list[str], backend: str | None, split: str, max_samples: int | None, batch_size: int | None,
             output: str | None, with_base: bool, overrides: tuple[str, ...], as_json: bool) -> None:
    from trmlx.compare import plot_comparison, read_predictions, system_names
    from trmlx.embedding.eval import compare_retrieval, retrieval_metrics
    from trmlx.rundir import atomic_write, default_run_path

    if len(targets) + with_base < 2:
        raise UserError("--compare: give at least two run directories, or one with --base")
    resolved = [resolve_system(t, backend, overrides) for t in targets]
    if any(s.run is None for s in resolved):
        raise UserError("--compare: every target must be a run directory (trmlx train's output)")
    systems: dict[str, list[dict[str, Any]]] = {}
    reports: dict[str, dict[str, Any]] = {}
    if with_base:
        first = resolved[0]
        base = System(first.recipe, None, first.backend, first.run)
        reports["base"] = evaluate_system(base, split, max_samples, batch_size, first.run, f"{split}-base")
        systems["base"] = read_predictions(Path(reports["base"]["predictions"]))
    for name, system in zip(system_names(targets), resolved):
        reports[name] = evaluate_system(system, split, max_samples, batch_size, system.run, split)
        systems[name] = read_predictions(Path(reports[name]["predictions"]))
    result = compare_retrieval(systems, retrieval_metrics(resolved[0].recipe))
    result.update(split=split, corpus_size=reports[result["reference"]]["corpus_size"],
                  backends={name: r["backend"] for name, r in reports.items()})
    out = Path(output) if output else default_run_path("compare")
    percent = {**result, "rows": [{k: v * 100 if k in ("score", "diff", "ci_low", "ci_high") else v
                                   for k, v in r.items()} for r in result["rows"]]}
    result["png"] = str(plot_comparison(percent, out / "compare.png"))  # bars in percentage points
    result["report"] = str(out / "compare.json")
    atomic_write(out / "compare.json", json.dumps(result, indent=2, ensure_ascii=False))
    emit(result, as_json, _render_comparison)


def _render(result: dict[str, Any]) -> None:
    from rich.table import Table

    out = console()
    out.print(f"[bold]{result['split']}[/bold]: {result['n']} questions against a corpus of {result['corpus_size']} "
              f"answers, {result['backend']} backend, encoded in {result['encoding_seconds']:.1f} s", highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("score", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, f"{value:.4f}")
    out.print(table)
    out.print(f"predictions: {result['predictions']}\nreport: {result['report']}", highlight=False)


def _render_comparison(result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{result['split']}: {result['rows'][0]['n']} questions, corpus of {result['corpus_size']} "
                        f"answers; vs {result['reference']} (paired bootstrap, {result['n_resamples']} resamples)")
    for column in ("metric", "system", "score", "diff", "95% interval", "p"):
        table.add_column(column, justify="left" if column in ("metric", "system") else "right")
    for r in result["rows"]:
        extra = ("", "", "") if "diff" not in r else (f"{r['diff']:+.4f}", f"[{r['ci_low']:+.4f}, "
                                                      f"{r['ci_high']:+.4f}]", f"{r['p_value']:.3f}")
        table.add_row(r["metric"], r["system"], f"{r['score']:.4f}", *extra)
    out = console()
    out.print(table)
    out.print(f"chart: {result['png']}\nreport: {result['report']}", highlight=False)
