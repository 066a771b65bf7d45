"""Retrieval evaluation of an embedding model, the same on every backend: each held-out question searches the
corpus of all answers (every split's, deduplicated), the rankings are scored with trmlx.metrics (the
InformationRetrievalEvaluator definitions), and a predictions JSONL keeps the top-k answers and per-query scores,
so `eval --compare` can bootstrap any two systems query by query.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from trmlx.data.prepare import PreparedData, Record
from trmlx.errors import UserError
from trmlx.metrics import compute_retrieval, metric_kind, rank_by_similarity
from trmlx.recipe.schema import Recipe

DEFAULT_METRICS = ("accuracy@1", "accuracy@3", "accuracy@5", "accuracy@10", "mrr@10", "ndcg@10", "recall@1",
                   "recall@5", "recall@10", "map@100")


def retrieval_metrics(recipe: Recipe) -> tuple[str, ...]:
    names = tuple(n for n in recipe.eval.metrics if metric_kind(n) == "retrieval")
    return names or DEFAULT_METRICS


def corpus_of(data: PreparedData) -> list[str]:
    """All answers of all splits, each once, in first-seen order: what a question is searched against."""
    return list(dict.fromkeys(r.fields["positive"] for r in data.train + data.valid + data.test))


def queries_of(records: Sequence[Record]) -> list[tuple[str, set[str]]]:
    """(question, its answers) per distinct question; a question listed twice has both answers relevant."""
    grouped: dict[str, set[str]] = {}
    for r in records:
        grouped.setdefault(r.fields["query"], set()).add(r.fields["positive"])
    return list(grouped.items())


def evaluate_retrieval(model: Any, recipe: Recipe, queries: Sequence[tuple[str, set[str]]], corpus: Sequence[str],
                       out_path: Path, metrics: Sequence[str] | None = None, top_k: int | None = None,
                       batch_size: int | None = None) -> dict[str, Any]:
    """Search the corpus for every query; write predictions (top-k answers, first relevant rank, per-query
    metrics) to out_path; return the mean metrics, n and the corpus size."""
    import numpy as np

    from trmlx.embedding.examples import encode
    from trmlx.rundir import atomic_write

    if not queries:
        raise UserError("eval: the split has no questions to evaluate")
    names = tuple(metrics or retrieval_metrics(recipe))
    top_k = top_k or recipe.embedding.top_k
    batch = batch_size or recipe.eval.batch_size
    start = time.perf_counter()
    query_vectors = encode(model, [q for q, _ in queries], recipe, "query", batch)
    corpus_vectors = encode(model, corpus, recipe, "passage", batch)
    seconds = time.perf_counter() - start
    scores = query_vectors @ corpus_vectors.T
    ids = [str(i) for i in range(len(corpus))]
    depth = max([top_k] + [int(n.split("@")[1]) for n in names])
    ranked = rank_by_similarity(scores, ids, depth)
    index = {text: str(i) for i, text in enumerate(corpus)}
    missing = [a for _, answers in queries for a in answers if a not in index]
    if missing:
        raise UserError(f"eval: answer {missing[0][:60]!r} is not in the corpus")
    relevant = [{index[a] for a in answers} for _, answers in queries]
    result = compute_retrieval(names, ranked, relevant)
    rows = []
    for (query, answers), ranking, rel, row_scores in zip(queries, ranked, relevant, scores):
        hit = next((rank + 1 for rank, doc in enumerate(ranking) if doc in rel), None)
        rows.append({"query": query, "relevant": sorted(answers), "hit_rank": hit,
                     "metrics": compute_retrieval(names, [ranking], [rel]),
                     "top": [{"rank": r + 1, "score": round(float(row_scores[int(d)]), 6), "text": corpus[int(d)],
                              "relevant": d in rel} for r, d in enumerate(ranking[:top_k])]})
    atomic_write(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"metrics": result, "n": len(rows), "corpus_size": len(corpus), "encoding_seconds": round(seconds, 3),
            "dimension": int(np.asarray(corpus_vectors).shape[1])}


def paired_bootstrap_means(a: Sequence[float], b: Sequence[float], n_resamples: int = 1000,
                           seed: int = 0) -> dict[str, Any]:
    """b − a for per-query scores, with trmlx.metrics.paired_bootstrap's resampling, interval and p-value."""
    import numpy as np

    from trmlx.metrics.compare import _index_counts

    if len(a) != len(b) or not a:
        raise ValueError(f"paired bootstrap needs two equal, non-empty score lists ({len(a)} vs {len(b)})")
    n = len(a)
    mean_a, mean_b = sum(a) / n, sum(b) / n
    delta = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    diffs = np.empty(n_resamples)
    pos = 0
    for counts in _index_counts(np.random.default_rng(seed), n, n_resamples):
        diffs[pos:pos + len(counts)] = counts @ delta / n
        pos += len(counts)
    diff = mean_b - mean_a
    p_value = 1.0 if diff == 0 else min(1.0, 2.0 * np.count_nonzero(diffs * np.sign(diff) <= 0) / n_resamples)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"a": mean_a, "b": mean_b, "diff": diff, "ci_low": float(low), "ci_high": float(high),
            "p_value": float(p_value), "n_resamples": n_resamples, "seed": seed}


def compare_retrieval(systems: dict[str, list[dict[str, Any]]], metrics: Sequence[str], n_resamples: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """Every system's mean per metric; every system after the first with its paired bootstrap difference."""
    names = list(systems)
    reference = systems[names[0]]
    for name in names[1:]:
        if [r["query"] for r in systems[name]] != [r["query"] for r in reference]:
            raise UserError(f"--compare: {name} was evaluated on other questions than {names[0]}; evaluate both on "
                            "the same split with the same --max-samples")
    rows = []
    for metric in metrics:
        base = [r["metrics"][metric] for r in reference]
        for name in names:
            result = paired_bootstrap_means(base, [r["metrics"][metric] for r in systems[name]], n_resamples, seed)
            row = {"task": "all", "metric": metric, "system": name, "score": result["b"], "n": len(base)}
            if name != names[0]:
                row.update(diff=result["diff"], ci_low=result["ci_low"], ci_high=result["ci_high"],
                           p_value=result["p_value"])
            rows.append(row)
    return {"systems": names, "reference": names[0], "n_resamples": n_resamples, "seed": seed, "rows": rows}
