"""Turkish-correct evaluation metrics and the metric registry used by recipes and `trmlx score`.

Names as users write them: bleu, chrf, chrf++, rouge, em, f1 ("text"), perplexity ("lm"), and the retrieval
family accuracy@k, precision@k, recall@k, mrr@k, ndcg@k, map@k with a concrete positive k such as `ndcg@10`.
Text metrics are on the 0–100 scale, retrieval metrics on 0–1 (as sentence-transformers reports them).
`compute` returns only floats; `compute_with_signature` also returns one reproducibility signature per score.
Heavy libraries (sacrebleu, rouge-score, numpy) are imported only when a metric is computed; never torch/mlx.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from trmlx.metrics.compare import paired_bootstrap
from trmlx.metrics.generation import (
    References,
    bleu,
    chrf,
    exact_match,
    rouge,
    rouge_signature,
    sacrebleu_score,
    squad_signature,
    token_f1,
)
from trmlx.metrics.lm import perplexity
from trmlx.metrics.retrieval import (
    RETRIEVAL_METRICS,
    accuracy_at_k,
    map_at_k,
    mrr_at_k,
    ndcg_at_k,
    precision_at_k,
    rank_by_similarity,
    recall_at_k,
    retrieval_metric,
)
from trmlx.metrics.text import check_lang, normalize_answer, tokenize_tr, turkish_lower

TEXT_METRICS = ("bleu", "chrf", "chrf++", "rouge", "em", "f1")
LM_METRICS = ("perplexity",)
_RETRIEVAL_RE = re.compile(r"^(" + "|".join(RETRIEVAL_METRICS) + r")@([1-9][0-9]*)$")

__all__ = [
    "accuracy_at_k",
    "bleu",
    "chrf",
    "compute",
    "compute_retrieval",
    "compute_with_signature",
    "exact_match",
    "map_at_k",
    "metric_kind",
    "metric_names",
    "mrr_at_k",
    "ndcg_at_k",
    "normalize_answer",
    "paired_bootstrap",
    "per_task",
    "perplexity",
    "precision_at_k",
    "rank_by_similarity",
    "recall_at_k",
    "rouge",
    "token_f1",
    "tokenize_tr",
    "turkish_lower",
]


def metric_names() -> list[str]:
    """All metric names as users write them; the `@k` entries are templates (write e.g. `accuracy@3`)."""
    return [*TEXT_METRICS, *LM_METRICS, *(f"{m}@k" for m in RETRIEVAL_METRICS)]


def metric_kind(name: str) -> str | None:
    """Kind of a metric name: "text", "lm", "retrieval" (needs a positive k, e.g. `mrr@10`), or None if unknown."""
    if name in TEXT_METRICS:
        return "text"
    if name in LM_METRICS:
        return "lm"
    if isinstance(name, str) and _RETRIEVAL_RE.match(name):
        return "retrieval"
    return None


def compute_with_signature(
    name: str,
    predictions: Sequence[str],
    references: References,
    *,
    lang: str = "tr",
    tokenize: str = "13a",
    lowercase: bool = False,
) -> tuple[dict[str, float], dict[str, str]]:
    """Compute a text metric; returns (scores, signatures), both keyed by score name.

    Keys: bleu → "bleu"; chrf → "chrf"; chrf++ → "chrf++"; rouge → "rouge1", "rouge2", "rougeL", "rougeLsum";
    em → "em"; f1 → "f1". `references` holds one string or a list of gold strings per example.
    `lang` ("tr"/"en") drives ROUGE/EM/F1 normalisation; `tokenize` (13a/intl/char) is BLEU's tokenizer;
    `lowercase` applies Turkish lowercasing before BLEU/chrF (ROUGE/EM/F1 are always case-insensitive).
    """
    kind = metric_kind(name)
    if kind != "text":
        if kind is None:
            raise ValueError(f"unknown metric {name!r}; available: {', '.join(metric_names())}")
        hint = "use trmlx.metrics.perplexity" if kind == "lm" else "use trmlx.metrics.compute_retrieval"
        raise ValueError(f"{name!r} is a {kind} metric, not computed from predictions and references ({hint})")
    check_lang(lang)
    if name in ("bleu", "chrf", "chrf++"):
        score, sig = sacrebleu_score(name, predictions, references, tokenize, lowercase)
        return {name: score}, {name: sig}
    if name == "rouge":
        scores = rouge(predictions, references, lang)
        sig = rouge_signature(lang)
        return scores, {k: sig for k in scores}
    value = exact_match(predictions, references, lang) if name == "em" else token_f1(predictions, references, lang)
    return {name: value}, {name: squad_signature(lang)}


def compute(
    name: str,
    predictions: Sequence[str],
    references: References,
    *,
    lang: str = "tr",
    tokenize: str = "13a",
    lowercase: bool = False,
) -> dict[str, float]:
    """Compute a text metric and return its named float scores (see `compute_with_signature` for the keys)."""
    return compute_with_signature(name, predictions, references, lang=lang, tokenize=tokenize, lowercase=lowercase)[0]


def compute_retrieval(
    names: Sequence[str], ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]]
) -> dict[str, float]:
    """Compute retrieval metrics such as ["accuracy@1", "ndcg@10", "map@100"]; keys are the names given."""
    out: dict[str, float] = {}
    for name in names:
        match = _RETRIEVAL_RE.match(name) if isinstance(name, str) else None
        if match is None:
            raise ValueError(
                f"{name!r} is not a retrieval metric; expected <metric>@<k> with metric one of "
                f"{', '.join(RETRIEVAL_METRICS)} and k a positive integer"
            )
        out[name] = retrieval_metric(match.group(1), ranked, relevant, int(match.group(2)))
    return out


def per_task(
    metric_names: Sequence[str],
    rows: Sequence[dict[str, Any]],
    *,
    lang: str = "tr",
    tokenize: str = "13a",
    lowercase: bool = False,
) -> dict[str, dict[str, Any]]:
    """Score each task separately and macro-average: {"per_task": {task: {score: v}}, "macro": {score: mean}}.

    rows: dicts with task, prediction, reference (string or list of strings) and optional lang (overrides
    `lang`; all rows of one task must agree). The macro mean of a score is over the tasks that have it.
    """
    for name in metric_names:
        if metric_kind(name) != "text":
            raise ValueError(f"per_task supports text metrics ({', '.join(TEXT_METRICS)}), not {name!r}")
    groups: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        for key in ("task", "prediction", "reference"):
            if key not in row:
                raise ValueError(f"row {i} has no {key!r} field")
        task = str(row["task"])
        row_lang = row.get("lang") or lang
        group = groups.setdefault(task, {"lang": row_lang, "preds": [], "refs": []})
        if group["lang"] != row_lang:
            raise ValueError(f"task {task!r} mixes languages {group['lang']!r} and {row_lang!r}")
        group["preds"].append(row["prediction"])
        group["refs"].append(row["reference"])
    results: dict[str, dict[str, float]] = {}
    for task, group in groups.items():
        scores: dict[str, float] = {}
        for name in metric_names:
            scores.update(
                compute(name, group["preds"], group["refs"], lang=group["lang"], tokenize=tokenize, lowercase=lowercase)
            )
        results[task] = scores
    keys: list[str] = []
    for scores in results.values():
        keys.extend(k for k in scores if k not in keys)
    macro = {}
    for key in keys:
        values = [s[key] for s in results.values() if key in s]
        macro[key] = sum(values) / len(values)
    return {"per_task": results, "macro": macro}
