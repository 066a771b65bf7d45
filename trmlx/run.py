"""`trmlx train` as a function: recipe → data → examples → backend loop → metrics log, adapter, plot.

Everything here is backend-agnostic; the backend is imported by name only when the run starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from trmlx.backend import get_backend
from trmlx.data import prepare_data
from trmlx.data.examples import tokenize
from trmlx.distributed import is_main, world_size
from trmlx.errors import UserError
from trmlx.plan.tasks import resolve_batch
from trmlx.recipe import Recipe, load_recipe, recipe_to_toml
from trmlx.report import MetricsLogger, StepReport, plot_losses
from trmlx.rundir import RunDir, create_run_dir, default_run_path, environment_record
from trmlx.schedule import total_steps


@dataclass
class TrainSetup:
    recipe: Recipe
    run: RunDir
    resume: bool


def resolve_run(recipe_path: str | None, backend: str, overrides: Sequence[str], output: str | None,
                resume: str | None) -> TrainSetup:
    """A new run from a recipe, or the saved resolved recipe of the run being resumed."""
    if resume:
        run = RunDir(Path(resume))
        if not run.recipe.is_file():
            raise UserError(f"--resume {resume}: not a run directory (no recipe.toml)")
        if overrides:
            raise UserError("--set cannot change a run being resumed; its saved recipe.toml is used as it is")
        return TrainSetup(load_recipe(run.recipe, backend=backend), run, True)
    if not recipe_path:
        raise UserError("train: give a RECIPE, or --resume RUN_DIR")
    recipe = load_recipe(recipe_path, overrides, backend)
    recipe = resolve_batch(recipe, backend)  # batch_size = "auto" / memory_budget -> integers, saved with the run
    return TrainSetup(recipe, RunDir(Path(output) if output else default_run_path(recipe.name)), False)


def train(setup: TrainSetup, backend_name: str, on_report: Callable[[StepReport, int], None] | None = None,
          on_start: Callable[[dict], None] | None = None) -> dict:
    """Run training to the end (or to Ctrl-C, which the backend checkpoints); returns the run summary."""
    if setup.recipe.task == "embedding":  # contrastive training of an encoder: its own flow, same run directory
        from trmlx.embedding.flow import train_embedding

        return train_embedding(setup, backend_name, on_report, on_start)
    recipe, run = setup.recipe, setup.run
    backend = get_backend(backend_name)
    data = prepare_data(recipe)
    loaded = backend.load(recipe)
    train_set, train_stats = tokenize(data.train, recipe, loaded.tokenizer)
    valid_set, _ = tokenize(data.valid, recipe, loaded.tokenizer, split="valid")
    steps = total_steps(recipe.train, math.ceil(len(train_set) / recipe.train.batch_size / world_size()))
    if setup.resume and _checkpoint_step(run) >= steps:
        raise UserError(f"--resume {run.path}: the run already finished all {steps} steps; evaluate it with "
                        f"trmlx eval {run.path}")
    device = backend.memory().device
    main = is_main()  # in a data-parallel launch only rank 0 writes files
    if main:
        env = environment_record(backend=backend_name, device={"name": device})
        create_run_dir(run.path, recipe_to_toml(recipe), env, resume=setup.resume)
    logger = MetricsLogger(run.metrics, enabled=main)
    if setup.resume:
        logger.truncate_after(_checkpoint_step(run))
    if on_start:
        on_start({"run": str(run.path), "steps": steps, "train_examples": len(train_set),
                  "valid_examples": len(valid_set), "truncated": train_stats["truncated"],
                  "dropped_too_long": train_stats["dropped_too_long"], "device": device})
    last: dict[str, StepReport] = {}
    reports = backend.train(loaded, recipe, train_set, valid_set, run.path, setup.resume)
    try:
        for report in reports:
            logger.log(report)
            last[report.kind] = report
            if on_report:
                on_report(report, steps)
    except KeyboardInterrupt:
        # Ctrl-C landed outside the backend's loop: hand it in at its yield point, where the last step is
        # complete, so it checkpoints that step and raises TrainingInterrupted.
        reports.throw(KeyboardInterrupt())
        raise
    if main:
        backend.save_adapter(loaded, run.adapter)
        plot_losses(run.metrics, run.plots / "loss.png", title=f"{recipe.name} ({backend_name})")
    return {"run": str(run.path), "steps": steps, "adapter": str(run.adapter),
            "final_train_loss": last["train"].loss if "train" in last else None,
            "final_valid_loss": last["eval"].loss if "eval" in last else None,
            "plot": str(run.plots / "loss.png")}


def _checkpoint_step(run: RunDir) -> int:
    from trmlx.loop import Checkpoints

    return Checkpoints(run).latest()[1].step
