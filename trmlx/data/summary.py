"""The data summary `trmlx check` prints: rows per split and task, what was dropped, length percentiles."""

from __future__ import annotations

from typing import Any

import numpy as np

from trmlx.data.prepare import PreparedData, Record, input_text, target_of
from trmlx.recipe.schema import Recipe

TOKEN_SAMPLE = 5000  # rows per split tokenised for token-length statistics; keeps `check` fast on big sets


def percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    p50, p90, p99 = np.percentile(values, [50, 90, 99], method="nearest")
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(max(values))}


def load_local_tokenizer(model_path: str) -> tuple[Any, str]:
    """The model's tokenizer if it is on this machine (model folder or hub cache), else (None, why not)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None, "transformers is not installed"
    try:  # local_files_only: a check must never wait on the network
        return AutoTokenizer.from_pretrained(model_path, local_files_only=True), ""
    except Exception as err:  # noqa: BLE001 - any failure means "no tokenizer here"; the reason is shown
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return None, f"tokenizer not available locally ({first[:120]})"


def summarize(recipe: Recipe, data: PreparedData, tokenizer: Any = None) -> dict[str, Any]:
    """Counts, warnings, mixture and length percentiles (characters always, tokens when a tokenizer is given)."""
    from trmlx.data.examples import tokenize

    report = data.report
    summary: dict[str, Any] = {
        "recipe": recipe.name, "task": recipe.task, "model": recipe.model.path,
        "rows": {split: dict(sorted(report.rows[split].items())) for split in report.rows},
        "warnings": report.warnings(), "mixture": report.mixture, "lengths": {}, "too_long": {},
        "dataset": report.dataset, "multi_reference": dict(report.multi_reference),
    }
    for split in ("train", "valid", "test"):
        records = data.split(split)
        if not records:
            continue
        examples = []
        if tokenizer is not None and recipe.task != "embedding":
            sample = records[:TOKEN_SAMPLE]
            examples, stats = tokenize(sample, recipe, tokenizer, split)
            summary["too_long"][split] = {"rows_checked": len(sample), "truncated": stats["truncated"],
                                          "dropped": stats["dropped_too_long"], "policy": recipe.data.too_long,
                                          "max_length": recipe.data.max_length}
        summary["lengths"][split] = _lengths(records, examples if tokenizer is not None else None)
        if split == "train" and examples and recipe.task == "causal":
            from trmlx.data.packing import batch_layout

            size = recipe.train.batch_size  # "auto" is decided when training starts: show the effective batch
            size = size if isinstance(size, int) else recipe.train.effective_batch
            summary["batches"] = {**batch_layout(examples, size, recipe.data.max_length),
                                  "packing": recipe.data.packing, "batch_size": size}
        tasks = sorted({r.task for r in records})
        if len(tasks) > 1:  # multitask: each task's own lengths, they differ a lot (news vs. QA)
            summary.setdefault("task_lengths", {})[split] = {
                t: _lengths([r for r in records if r.task == t],
                            [e for e in examples if e.task == t] if tokenizer is not None else None)
                for t in tasks}
    return summary


def _lengths(records: list[Record], examples: list | None) -> dict[str, dict[str, int]]:
    lengths = {"input_chars": percentiles([len(input_text(r)) for r in records]),
               "target_chars": percentiles([len(target_of(r)) for r in records])}
    if examples is not None:
        lengths["tokens"] = percentiles([e.length for e in examples])
    return lengths
