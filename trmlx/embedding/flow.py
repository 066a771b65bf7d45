"""`trmlx train` for task = "embedding", backend-agnostic. A backend's embedding half (trmlx.backend.EmbeddingBackend)
only loads, encodes, trains and saves: data, negatives, batch order, the LR curve, reports and the run directory are
decided here, once for both backends."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from trmlx.backend import get_embedding_backend
from trmlx.embedding.batches import steps_for
from trmlx.embedding.examples import (MODEL_DIR, NEGATIVES_FILE, examples_from_records, negatives_source,
                                      read_examples, training_examples, write_examples)
from trmlx.errors import UserError
from trmlx.report import StepReport


def train_embedding(setup: Any, backend_name: str, on_report: Callable[[StepReport, int], None] | None = None,
                    on_start: Callable[[dict], None] | None = None) -> dict:
    """`trmlx train` for task = "embedding": the same run directory as causal runs, with RUN/model (a
    sentence-transformers folder) instead of RUN/adapter and RUN/negatives.jsonl (what was trained on)."""
    from trmlx.data import prepare_data
    from trmlx.distributed import world_size
    from trmlx.loop import Checkpoints
    from trmlx.recipe import recipe_to_toml
    from trmlx.report import MetricsLogger, plot_losses
    from trmlx.rundir import create_run_dir, environment_record

    recipe, run = setup.recipe, setup.run
    if world_size() > 1:
        raise UserError("train: data-parallel embedding training is not supported; run one process (in-batch "
                        "negatives would be split across GPUs)")
    module = get_embedding_backend(backend_name)
    data = prepare_data(recipe)
    if not data.train:
        raise UserError("data.train: no training pairs left after checks")
    model = module.load(recipe, train=True)
    saved = run.path / NEGATIVES_FILE
    counts: Counter = Counter()
    if setup.resume and saved.is_file():  # the negatives the run started with, not a fresh mining pass
        train, source = read_examples(saved), "saved"
    else:
        train, source, counts = training_examples(data.train, recipe, model)
    # Validation keeps the data's own negatives only where training did: decided from the recipe and the data,
    # so a resumed run (whose training negatives are "saved") validates on the same examples.
    valid = examples_from_records(data.valid, recipe, explicit=negatives_source(recipe, data.train) not in
                                  ("none", "mined", "random"))
    steps = steps_for(train, recipe)
    resumed = Checkpoints(run).latest()[1] if setup.resume else None
    if resumed and resumed.step >= steps and not resumed.pending:  # a final validation still owed: deliver it
        raise UserError(f"--resume {run.path}: the run already finished all {steps} steps; evaluate it with "
                        f"trmlx eval {run.path}")
    device = module.device_name()
    env = environment_record(backend=backend_name, device={"name": device, "dtype": model.dtype})
    create_run_dir(run.path, recipe_to_toml(recipe), env, resume=setup.resume)
    if not setup.resume:
        write_examples(saved, train)
    logger = MetricsLogger(run.metrics)
    if resumed:
        logger.truncate_after(resumed.step)
    if on_start:
        on_start({"run": str(run.path), "steps": steps, "train_examples": len(train), "valid_examples": len(valid),
                  "truncated": 0, "dropped_too_long": 0, "device": device, "negatives": source,
                  "negatives_per_query": sum(len(e.negatives) for e in train) / len(train),
                  "negative_counts": dict(counts), "data_warnings": data.report.warnings()})
    last: dict[str, StepReport] = {}
    reports = module.train_loop(model, recipe, train, valid, run.path, setup.resume)
    report: StepReport | None = None
    try:
        for report in reports:
            logger.log(report)
            last[report.kind] = report
            if on_report:
                on_report(report, steps)
    except KeyboardInterrupt:
        if reports.gi_frame is None:  # the backend itself was interrupted and has checkpointed
            raise
        # Ctrl-C landed here, not in the backend: log the record in hand if it missed the log, then hand the
        # Ctrl-C in at the yield, where the backend checkpoints it as delivered and raises TrainingInterrupted.
        if report is not None:
            logger.ensure(report)
        reports.throw(KeyboardInterrupt())
        raise
    out = run.path / MODEL_DIR
    module.save(model, recipe, out)
    plot_losses(run.metrics, run.plots / "loss.png", title=f"{recipe.name} ({backend_name})")
    return {"run": str(run.path), "steps": steps, "model": str(out), "negatives": source,
            "final_train_loss": last["train"].loss if "train" in last else None,
            "final_valid_loss": last["eval"].loss if "eval" in last else None, "plot": str(run.plots / "loss.png")}
