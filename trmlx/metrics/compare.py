"""Paired bootstrap resampling (Koehn 2004) for the difference between two systems on one test set.

Each resample draws example indices with replacement (numpy default_rng(seed)) and scores both systems on the
same draw. Corpus metrics (BLEU, chrF, chrF++) are recomputed per resample from summed per-sentence sacrebleu
statistics, which is exact and fast; EM, F1 and ROUGE are means of per-example scores.

p-value (two-sided percentile bootstrap): with d the observed difference b − a, p = min(1, 2 · fraction of
resamples whose difference is zero or has the opposite sign of d); p = 1 when d = 0. A system compared with
itself therefore gives diff 0 and p 1. With R resamples the smallest non-zero p is 2/R; p = 0 means < 2/R.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trmlx.metrics.generation import (
    ROUGE_TYPES,
    References,
    check_pair,
    em_example_scores,
    f1_example_scores,
    rouge_example_scores,
    sacrebleu_stats,
)

CORPUS_METRICS = ("bleu", "chrf", "chrf++")
BOOTSTRAP_METRICS = CORPUS_METRICS + ("em", "f1") + ROUGE_TYPES + ("rouge",)
_CELLS_PER_CHUNK = 4_000_000  # resamples × examples held in memory at once


def _index_counts(rng: Any, n: int, n_resamples: int):
    """Yield (chunk_size × n) matrices counting how often each example is drawn in each resample."""
    import numpy as np

    chunk = max(1, min(n_resamples, _CELLS_PER_CHUNK // n))
    done = 0
    while done < n_resamples:
        c = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(c, n))
        flat = (idx + np.arange(c)[:, None] * n).ravel()
        yield np.bincount(flat, minlength=c * n).reshape(c, n).astype(np.float64)
        done += c


def _per_example(metric: str, preds: Sequence[str], refs: References, lang: str) -> list[float]:
    """Per-example scores ×100 for the averaged metrics (em, f1, a ROUGE variant)."""
    if metric == "em":
        return em_example_scores(preds, refs, lang)
    if metric == "f1":
        return f1_example_scores(preds, refs, lang)
    return rouge_example_scores(preds, refs, lang)[metric]


def paired_bootstrap(
    metric_name: str,
    preds_a: Sequence[str],
    preds_b: Sequence[str],
    refs: References,
    n_resamples: int = 1000,
    seed: int = 0,
    *,
    lang: str = "tr",
    tokenize: str = "13a",
    lowercase: bool = False,
) -> dict[str, Any]:
    """Compare system b against system a on one metric; returns a, b, diff (b − a), mean_diff, ci_low, ci_high,
    p_value, plus metric, n_resamples and seed.

    metric_name: bleu, chrf, chrf++, em, f1, rouge1, rouge2, rougeL, rougeLsum ("rouge" means rougeL).
    The 95% interval is the 2.5th–97.5th percentile of the resampled differences. Deterministic for a seed.
    """
    import numpy as np

    if metric_name not in BOOTSTRAP_METRICS:
        expected = ", ".join(BOOTSTRAP_METRICS)
        raise ValueError(f"unknown metric {metric_name!r} for bootstrap; expected one of: {expected}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    ref_lists = check_pair(preds_a, refs)
    check_pair(preds_b, ref_lists)
    n = len(ref_lists)
    rng = np.random.default_rng(seed)
    metric = "rougeL" if metric_name == "rouge" else metric_name

    diffs = np.empty(n_resamples)
    if metric in CORPUS_METRICS:
        m_a, stats_a, _ = sacrebleu_stats(metric, preds_a, ref_lists, tokenize, lowercase)
        m_b, stats_b, _ = sacrebleu_stats(metric, preds_b, ref_lists, tokenize, lowercase)
        a = float(m_a._aggregate_and_compute(stats_a.tolist()).score)
        b = float(m_b._aggregate_and_compute(stats_b.tolist()).score)
        pos = 0
        for counts in _index_counts(rng, n, n_resamples):
            agg_a, agg_b = counts @ stats_a, counts @ stats_b
            for row_a, row_b in zip(agg_a, agg_b):
                diffs[pos] = m_b._compute_score_from_stats(row_b).score - m_a._compute_score_from_stats(row_a).score
                pos += 1
    else:
        list_a = _per_example(metric, preds_a, ref_lists, lang)
        list_b = _per_example(metric, preds_b, ref_lists, lang)
        a, b = sum(list_a) / n, sum(list_b) / n  # same arithmetic as compute(), so `a` matches it exactly
        delta = np.asarray(list_b) - np.asarray(list_a)
        pos = 0
        for counts in _index_counts(rng, n, n_resamples):
            diffs[pos : pos + len(counts)] = counts @ delta / n
            pos += len(counts)

    diff = b - a
    if diff == 0:
        p_value = 1.0
    else:
        against = np.count_nonzero(diffs * np.sign(diff) <= 0) / n_resamples
        p_value = min(1.0, 2.0 * against)
    ci_low, ci_high = np.percentile(diffs, [2.5, 97.5])
    return {
        "metric": metric,
        "a": a,
        "b": b,
        "diff": diff,
        "mean_diff": float(diffs.mean()),
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "p_value": float(p_value),
        "n_resamples": n_resamples,
        "seed": seed,
    }
