"""Evaluate a fine-tuned model on a split, the same way on every backend: prompts formatted and tokenised as in
training, batched generation through the Backend protocol, decoding, stop strings, metrics and the predictions
file. Also the text side of streaming (`StreamDecoder`), shared by `trmlx generate`.

The backend only turns token ids into token ids; nothing here imports mlx or torch.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from trmlx.backend import Backend, GenerationSettings, LoadedModel
from trmlx.data.examples import encode_prompt, format_example, tokenize
from trmlx.data.prepare import Record
from trmlx.errors import UserError
from trmlx.metrics import compute_with_signature, metric_kind, per_task, perplexity
from trmlx.recipe.schema import Recipe
from trmlx.rundir import atomic_write

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {"causal": ("bleu", "chrf"), "seq2seq": ("bleu", "chrf")}


def generation_settings(recipe: Recipe, **overrides: Any) -> GenerationSettings:
    """Decoding settings from the recipe's eval section; keyword overrides (None = keep) win."""
    ev = recipe.eval
    settings = GenerationSettings(max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, top_p=ev.top_p,
                                  top_k=ev.top_k, repetition_penalty=ev.repetition_penalty)
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string (the whole text when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class StreamDecoder:
    """Turns a token stream into printable text pieces: whole characters only (a Turkish letter may span two
    byte-level tokens), and nothing that could still turn out to be the start of a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.printed = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the newly printable text ('' while a character or stop string is incomplete)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = cut_at_stop(text, self.stop)
        if cut != text:
            self.stopped = True
            return self._emit(cut)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character decodes to U+FFFD for now
            return ""
        held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return self._emit(text[: len(text) - held])

    def flush(self) -> str:
        """The text still held back when the stream ends without a stop string."""
        if self.stopped:
            return ""
        return self._emit(cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stop))

    def _emit(self, text: str) -> str:
        piece = text[self.printed :]
        self.printed = max(self.printed, len(text))
        return piece


def encode_prompts(records: Sequence[Record], recipe: Recipe, tokenizer: Any) -> tuple[list[str], list[list[int]],
                                                                                         list[str | list[str]]]:
    """Prompt texts, their token ids (exactly as in training) and references (a list where a row has several)."""
    prompts, ids, references = [], [], []
    for record in records:
        prompt, _ = format_example(record, recipe, tokenizer)
        prompts.append(prompt)
        ids.append(encode_prompt(prompt, tokenizer))
        references.append(record.reference())  # all gold answers when the row has several
    return prompts, ids, references


def generate_batched(backend: Backend, loaded: LoadedModel, prompt_ids: Sequence[Sequence[int]],
                     settings: GenerationSettings, batch_size: int,
                     progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """New token ids per prompt, in the input order; longest prompts first, so neighbours in a batch are padded
    little and an out-of-memory batch shows up at once rather than at the end."""
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for index, tokens in zip(batch, backend.generate(loaded, [prompt_ids[i] for i in batch], settings)):
            outputs[index] = list(tokens)
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return outputs


def task_metrics(recipe: Recipe, task: str) -> tuple[str, ...]:
    """Text metrics of a task: its own list, else eval.metrics, else the task kind's defaults (perplexity comes
    from the loss, not from predictions)."""
    config = next((t for t in recipe.data.tasks if t.name == task), None)
    names = (config.metrics if config and config.metrics else None) or recipe.eval.metrics
    names = tuple(n for n in names if metric_kind(n) == "text")
    return names or DEFAULT_METRICS.get(recipe.task, ("bleu", "chrf"))


def score_predictions(recipe: Recipe, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Scores and signatures; with tasks also a per-task table whose macro means are the headline metrics."""
    opts = {"lang": recipe.eval.lang, "tokenize": recipe.eval.bleu_tokenize}
    preds = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    tasks = sorted({r["task"] for r in rows})
    metrics: dict[str, float] = {}
    signatures: dict[str, str] = {}
    single = tasks == [""]
    names = tuple(dict.fromkeys(n for t in tasks for n in task_metrics(recipe, t)))
    for name in names:
        # Signatures describe the scoring settings, not the data: with tasks, one row is enough to obtain them.
        scores, sigs = compute_with_signature(name, preds if single else preds[:1], refs if single else refs[:1],
                                              **opts)
        signatures.update(sigs)
        if single:
            metrics.update(scores)
    if single:
        return {"metrics": metrics, "signatures": signatures, "per_task": None}
    by_metrics: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_metrics[task_metrics(recipe, row["task"])].append({**row, "task": row["task"] or "(none)"})
    table: dict[str, dict[str, float]] = {}
    for group_names, group_rows in by_metrics.items():
        table.update(per_task(group_names, group_rows, **opts)["per_task"])
    keys = list(dict.fromkeys(k for scores in table.values() for k in scores))
    macro = {k: sum(s[k] for s in table.values() if k in s) / sum(k in s for s in table.values()) for k in keys}
    return {"metrics": macro, "signatures": signatures, "per_task": dict(sorted(table.items()))}


def first_per_task(records: Sequence[Record], limit: int) -> list[Record]:
    """The first `limit` records of every task (0 = all): a cap must not leave a multitask split with one task."""
    if not limit:
        return list(records)
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for record in records:
        if taken[record.task] < limit:
            taken[record.task] += 1
            chosen.append(record)
    return chosen


def evaluate_split(backend: Backend, loaded: LoadedModel, recipe: Recipe, records: Sequence[Record],
                   out_path: Path, max_samples: int, settings: GenerationSettings | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Generate for the first max_samples records (0 = all), write predictions JSONL to out_path, score them and
    add the split's loss/perplexity; returns metrics, signatures, per-task table, n and generation speed."""
    if recipe.task == "embedding":
        raise UserError("eval: embedding recipes are scored with retrieval metrics, not by generating text")
    records = first_per_task(records, max_samples)
    if not records:
        raise UserError("eval: the split has no examples to evaluate")
    settings = settings or generation_settings(recipe)
    tokenizer = loaded.tokenizer
    prompts, prompt_ids, references = encode_prompts(records, recipe, tokenizer)
    start = time.perf_counter()
    outputs = generate_batched(backend, loaded, prompt_ids, settings, recipe.eval.batch_size, progress)
    seconds = time.perf_counter() - start
    rows = []
    for record, prompt, reference, tokens in zip(records, prompts, references, outputs):
        text = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), settings.stop).strip()
        rows.append({"prompt": prompt, "prediction": text, "reference": reference, "task": record.task,
                     "origin": record.origin})
    atomic_write(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    result = score_predictions(recipe, rows)
    examples, _ = tokenize(records, recipe, tokenizer, require_fit=False)  # the loss is extra; predictions stand
    if examples:
        loss = backend.evaluate(loaded, examples, recipe.eval.batch_size)
        if loss["tokens"]:
            lm = perplexity([(loss["loss"] * loss["tokens"], int(loss["tokens"]))])
            result["metrics"].update(loss=lm["nll"], perplexity=lm["perplexity"])
    tokens = sum(len(t) for t in outputs)
    result["n"] = len(rows)
    result["generation"] = {"tokens": tokens, "seconds": round(seconds, 4),
                            "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None}
    return result
