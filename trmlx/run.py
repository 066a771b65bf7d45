"""`trmlx train` as a function: recipe → data → examples → backend loop → metrics log, adapter, plot.

Everything here is backend-agnostic; the backend is imported by name only when the run starts.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from trmlx import continued
from trmlx.backend import get_backend
from trmlx.checkpoints import Checkpoints, Position
from trmlx.data import prepare_data
from trmlx.data.examples import tokenize
from trmlx.distributed import is_main, world_size
from trmlx.errors import TrainingInterrupted, UserError
from trmlx.integrity import adapter_problem, disk_error, disk_fault, ensure_writable, replace_folder
from trmlx.plan.tasks import resolve_batch
from trmlx.recipe import Recipe, load_recipe, recipe_to_toml
from trmlx.recipe.checks import check_combinations
from trmlx.report import MetricsLogger, StepReport, plot_losses, read_log
from trmlx.rundir import (RunDir, check_output, create_run_dir, default_run_path, environment_record, mark_failed,
                          replaceable_run)
from trmlx.schedule import total_steps


@dataclass
class TrainSetup:
    recipe: Recipe
    run: RunDir
    resume: bool
    start: Path | None = None  # the PEFT adapter folder a new run's weights start from (peft.init_adapter)


def resolve_run(recipe_path: str | None, backend: str, overrides: Sequence[str], output: str | None,
                resume: str | None, adapter: str | None = None) -> TrainSetup:
    """A new run from a recipe (starting from `adapter`, or peft.init_adapter, when given: trmlx.continued), or
    the saved resolved recipe of the run being resumed."""
    if resume and adapter:
        raise UserError("--adapter starts a new run from an adapter's weights; --resume continues a run from its "
                        "checkpoint (weights and optimizer): give one of them")
    if resume:
        run = RunDir(Path(resume))
        if not run.recipe.is_file():
            raise UserError(f"--resume {resume}: not a run directory (no recipe.toml)")
        if overrides:
            raise UserError("--set cannot change a run being resumed; its saved recipe.toml is used as it is")
        return TrainSetup(load_recipe(run.recipe, backend=backend), run, True)
    if not recipe_path:
        raise UserError("train: give a RECIPE, or --resume RUN_DIR")
    if adapter:  # the command line wins over the recipe; relative to where the command runs
        overrides = (*overrides, f"peft.init_adapter={json.dumps(str(Path(adapter).resolve()))}")
    recipe = load_recipe(recipe_path, overrides, backend)
    start = continued.resolve(recipe, "--adapter" if adapter else continued.KEY)
    if start is not None:
        recipe = start.recipe  # the adapter's rank, alpha, targets and layers: checked and saved as the run's
        if problems := check_combinations(recipe, backend):
            raise UserError([f"{key}: {msg} (with the settings of {start.source})" for key, msg in problems])
        if is_main():
            print(start.note(), file=sys.stderr)
    recipe = resolve_batch(recipe, backend)  # batch_size = "auto" / memory_budget -> integers, saved with the run
    return TrainSetup(recipe, RunDir(Path(output) if output else default_run_path(recipe.name)), False,
                      start.folder if start else None)


def train(setup: TrainSetup, backend_name: str, on_report: Callable[[StepReport, int], None] | None = None,
          on_start: Callable[[dict], None] | None = None) -> dict:
    """Run training to the end (or to Ctrl-C, which the backend checkpoints); returns the run summary. A run that
    fails is marked so (RUN/failed.json), so `train` with the same --output may start it again."""
    run = setup.run
    replaceable = not setup.resume and replaceable_run(run)
    started = [False]  # set once the training loop runs: a resumed run that fails from then on is a failed run
    try:
        if setup.recipe.task == "embedding":  # contrastive training of an encoder: its own flow, same run dir
            from trmlx.embedding.flow import train_embedding

            return train_embedding(setup, backend_name, on_report, on_start)
        return _train(setup, backend_name, on_report, on_start, started)
    except (KeyboardInterrupt, TrainingInterrupted):
        raise
    except Exception as err:
        if is_main() and run.recipe.is_file() and (replaceable or started[0]):
            mark_failed(run, str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise


def _train(setup: TrainSetup, backend_name: str, on_report: Callable[[StepReport, int], None] | None,
           on_start: Callable[[dict], None] | None, started: list[bool]) -> dict:
    recipe, run = setup.recipe, setup.run
    # Everything that can refuse the run is checked before the slow model load.
    resumed = _resume_point(run, backend_name) if setup.resume else None
    if not setup.resume:
        check_output(run)
    if is_main():
        ensure_writable(run.path, "checking that the run directory can be written")
    backend = get_backend(backend_name)
    data = prepare_data(recipe)
    # A resume restores every adapter weight from its checkpoint: the start folder is not read again.
    loaded = backend.load(recipe, start=setup.start) if setup.start else backend.load(recipe)
    train_set, train_stats = tokenize(data.train, recipe, loaded.tokenizer)
    valid_set, _ = tokenize(data.valid, recipe, loaded.tokenizer, split="valid")
    steps = total_steps(recipe.train, math.ceil(len(train_set) / recipe.train.batch_size / world_size()))
    main = is_main()  # in a data-parallel launch only rank 0 writes files
    if resumed and resumed.step >= steps and not resumed.pending:
        damage = adapter_problem(run.adapter)
        if damage is None:
            raise UserError(f"--resume {run.path}: the run already finished all {steps} steps; evaluate it with "
                            f"trmlx eval {run.path}")
        if main:  # killed while writing its adapter: write it again from the final checkpoint
            print(f"note: --resume {run.path}: the run finished but {run.adapter} is incomplete ({damage}); "
                  "writing it from the last checkpoint", file=sys.stderr)
    device = backend.memory().device
    if main:
        env = environment_record(backend=backend_name, device={"name": device})
        create_run_dir(run.path, recipe_to_toml(recipe), env, resume=setup.resume)
    logger = MetricsLogger(run.metrics, enabled=main)
    if resumed:
        with _disk_guard(run, "trimming the metrics log to the checkpoint", "", run.metrics):
            logger.truncate_after(resumed.step)
    if on_start:
        on_start({"run": str(run.path), "steps": steps, "train_examples": len(train_set),
                  "valid_examples": len(valid_set), "truncated": train_stats["truncated"],
                  "dropped_too_long": train_stats["dropped_too_long"], "device": device})
    last: dict[str, StepReport] = {}
    reports = backend.train(loaded, recipe, train_set, valid_set, run.path, setup.resume)
    started[0] = True
    report: StepReport | None = None
    try:
        for report in reports:
            with _disk_guard(run, f"logging step {report.step}", "the records before it are intact; free space, "
                             f"then trmlx train --resume {run.path} continues from the last checkpoint", run.metrics):
                logger.log(report)
            last[report.kind] = report
            if on_report:
                on_report(report, steps)
    except KeyboardInterrupt:
        if reports.gi_frame is None:  # the backend itself was interrupted before it could checkpoint
            raise
        # Ctrl-C landed here, not in the backend: the record in hand may have missed the log by one line, so log
        # it, then hand the Ctrl-C in at the yield point, where the backend checkpoints and raises
        # TrainingInterrupted (the checkpoint counts that record as delivered).
        if report is not None:
            logger.ensure(report)
        reports.throw(KeyboardInterrupt())
        raise
    except BaseException:
        reports.close()
        raise
    if main:
        with _disk_guard(run, "writing the adapter", "the checkpoints are intact; free space, then "
                         f"trmlx train --resume {run.path} writes it", run.adapter):
            replace_folder(run.adapter, lambda folder: backend.save_adapter(loaded, folder))
        with _disk_guard(run, "writing the loss plot", "the adapter and the metrics log are complete"):
            plot_losses(run.metrics, run.plots / "loss.png", title=f"{recipe.name} ({backend_name})")
    final = _final_losses(run, last) if main else {k: r.loss for k, r in last.items()}
    return {"run": str(run.path), "steps": steps, "adapter": str(run.adapter),
            "final_train_loss": final.get("train"), "final_valid_loss": final.get("eval"),
            "plot": str(run.plots / "loss.png")}


def _final_losses(run: RunDir, last: dict[str, StepReport]) -> dict[str, float]:
    """The last train and validation losses of the run, from the log when this invocation logged none (a resume
    that only wrote the adapter)."""
    final = {kind: report.loss for kind, report in last.items()}
    for record in read_log(run.metrics) if len(final) < 2 and run.metrics.is_file() else ():
        if record.get("kind") in ("train", "eval") and record.get("kind") not in last:
            final[record["kind"]] = record["loss"]
    return final


def _resume_point(run: RunDir, backend_name: str) -> Position:
    """The checkpoint a resume continues from; damaged newer ones are skipped and named on stderr."""
    _folder, position, notes = Checkpoints(run, backend=backend_name).find()
    if notes and is_main():
        print(f"warning: --resume {run.path}: {'; '.join(notes)}", file=sys.stderr)
    return position


@contextmanager
def _disk_guard(run: RunDir, doing: str, kept: str = "", path: Path | None = None) -> Iterator[None]:
    """A full or read-only disk is the user's to fix: one line saying what was kept and how to go on."""
    try:
        yield
    except OSError as err:
        if not disk_fault(err):
            raise
        raise disk_error(err, doing, kept or f"free space, then trmlx train --resume {run.path}",
                         path or err.filename) from None
