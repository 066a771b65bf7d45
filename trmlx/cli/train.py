"""`trmlx train RECIPE --backend mlx|cuda`: fine-tune with a live progress bar; Ctrl-C checkpoints and exits."""

from __future__ import annotations

import sys

import click

from trmlx.cli.common import console, emit, json_option, set_option
from trmlx.recipe.schema import BACKEND_NAMES


@click.command("train")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default="mlx", show_default=True,
              help="Framework to train with: mlx (Apple silicon, MLX CPU/CUDA builds) or cuda (torch).")
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Run directory (default runs/<recipe-name>-<timestamp>).")
@click.option("--resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue the run in this directory from its latest checkpoint.")
@click.option("--adapter", type=click.Path(file_okay=False), default=None,
              help="Start from this LoRA/DoRA adapter's weights (PEFT or mlx-lm folder; = --set peft.init_adapter, "
                   "relative to here): its rank, alpha, targets and layers replace the recipe's; fresh optimizer.")
@click.option("--fit-budget", default=None, metavar="SIZE",
              help="Fit a memory budget, e.g. 16GB: choose micro-batch, grad_accum (same effective batch) and "
                   "checkpointing (= --set train.memory_budget=SIZE; see trmlx plan).")
@set_option
@json_option
def train(recipe: str | None, backend: str, output: str | None, resume: str | None, adapter: str | None,
          fit_budget: str | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Fine-tune the model of RECIPE; writes metrics, checkpoints, the adapter and a loss plot to the run dir."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from trmlx import run as runner
    from trmlx.distributed import is_main
    from trmlx.errors import TrainingInterrupted

    if fit_budget:
        overrides += (f"train.memory_budget={fit_budget!r}",)
    setup = runner.resolve_run(recipe, backend, overrides, output, resume, adapter)
    out = console() if not as_json else console().__class__(file=sys.stderr)
    progress = Progress(TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=out, transient=False, disable=as_json or not is_main())
    task = progress.add_task("train", total=None, info="loading model and data…")
    valid = ""

    def on_start(info: dict) -> None:
        progress.update(task, total=info["steps"])
        if is_main():
            out.print(f"run {info['run']}: {info['train_examples']} training examples, {info['valid_examples']} "
                      f"validation, {info['steps']} steps on {info['device']} ({info['truncated']} truncated, "
                      f"{info['dropped_too_long']} dropped at max_length)")

    def on_report(report, steps: int) -> None:
        nonlocal valid
        if report.kind == "eval":
            valid = f" | valid {report.loss:.3f}"
            return
        progress.update(task, completed=report.step, info=(
            f"loss {report.loss:.3f}{valid} | lr {report.learning_rate:.2e} | {report.tokens_per_second:,.0f} "
            f"tok/s | peak {report.peak_memory_gb:.2f} GB"))

    try:
        with progress:
            summary = runner.train(setup, backend, on_report, on_start)
    except TrainingInterrupted as stop:
        click.echo(f"interrupted: checkpoint saved at {stop.checkpoint}; continue with "
                   f"trmlx train --resume {setup.run.path} --backend {backend}", err=True)
        sys.exit(130)
    if not is_main():
        return  # in a data-parallel launch rank 0 reports for everyone
    emit(summary, as_json, lambda s: out.print(
        f"done: {'model' if 'model' in s else 'adapter'} {s.get('model') or s['adapter']}, loss plot {s['plot']}, "
        f"final train loss {s['final_train_loss']:.4f}"
        + (f", validation loss {s['final_valid_loss']:.4f}" if s["final_valid_loss"] is not None else "")))
