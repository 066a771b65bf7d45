"""Retrieval metrics with exactly the definitions of sentence-transformers' InformationRetrievalEvaluator.

Binary relevance. Values are on the 0–1 scale, averaged over queries that have at least one relevant document
(the evaluator drops the others). precision@k divides by k even when fewer than k documents are ranked;
MAP@k divides by min(k, number of relevant documents); NDCG@k uses DCG with 1/log2(rank + 1) discounts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable

RETRIEVAL_METRICS = ("accuracy", "precision", "recall", "mrr", "ndcg", "map")


def _queries(ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]]) -> list[tuple[Sequence[str], set[str]]]:
    """Validate inputs and keep the (ranking, relevant set) pairs of queries with relevant documents."""
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings but {len(relevant)} relevant sets")
    kept = []
    for i, (docs, rel) in enumerate(zip(ranked, relevant)):
        if len(set(docs)) != len(docs):
            raise ValueError(f"query {i}: the ranking lists a document more than once")
        if rel:
            kept.append((docs, set(rel)))
    if not kept:
        raise ValueError("no query has a relevant document")
    return kept


def _check_k(k: int) -> int:
    """Return `k` if it is a positive integer, else raise ValueError."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return k


def _dcg_at_k(relevances: Sequence[int], k: int) -> float:
    """DCG as in InformationRetrievalEvaluator.compute_dcg_at_k: sum of rel_i / log2(i + 2) over the top k."""
    return sum(relevances[i] / math.log2(i + 2) for i in range(min(len(relevances), k)))


def _accuracy(docs: Sequence[str], rel: set[str], k: int) -> float:
    return float(any(d in rel for d in docs[:k]))


def _precision(docs: Sequence[str], rel: set[str], k: int) -> float:
    return sum(d in rel for d in docs[:k]) / k


def _recall(docs: Sequence[str], rel: set[str], k: int) -> float:
    return sum(d in rel for d in docs[:k]) / len(rel)


def _mrr(docs: Sequence[str], rel: set[str], k: int) -> float:
    for rank, d in enumerate(docs[:k]):
        if d in rel:
            return 1.0 / (rank + 1)
    return 0.0


def _ndcg(docs: Sequence[str], rel: set[str], k: int) -> float:
    predicted = [1 if d in rel else 0 for d in docs[:k]]
    return _dcg_at_k(predicted, k) / _dcg_at_k([1] * len(rel), k)


def _map(docs: Sequence[str], rel: set[str], k: int) -> float:
    num_correct = 0
    sum_precisions = 0.0
    for rank, d in enumerate(docs[:k]):
        if d in rel:
            num_correct += 1
            sum_precisions += num_correct / (rank + 1)
    return sum_precisions / min(k, len(rel))


_PER_QUERY: dict[str, Callable[[Sequence[str], set[str], int], float]] = {
    "accuracy": _accuracy,
    "precision": _precision,
    "recall": _recall,
    "mrr": _mrr,
    "ndcg": _ndcg,
    "map": _map,
}


def retrieval_metric(metric: str, ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]], k: int) -> float:
    """Mean of one metric ("accuracy", "precision", "recall", "mrr", "ndcg", "map") at cut-off k."""
    if metric not in _PER_QUERY:
        raise ValueError(f"unknown retrieval metric {metric!r}; expected one of: {', '.join(RETRIEVAL_METRICS)}")
    _check_k(k)
    queries = _queries(ranked, relevant)
    fn = _PER_QUERY[metric]
    return sum(fn(docs, rel, k) for docs, rel in queries) / len(queries)


def accuracy_at_k(ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]], k: int) -> float:
    """Hit rate: fraction of queries with at least one relevant document in the top k."""
    return retrieval_metric("accuracy", ranked, relevant, k)


def precision_at_k(ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]], k: int) -> float:
    """Mean of (relevant documents in the top k) / k."""
    return retrieval_metric("precision", ranked, relevant, k)


def recall_at_k(ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]], k: int) -> float:
    """Mean of (relevant documents in the top k) / (number of relevant documents)."""
    return retrieval_metric("recall", ranked, relevant, k)


def mrr_at_k(ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]], k: int) -> float:
    """Mean reciprocal rank of the first relevant document within the top k (0 when none)."""
    return retrieval_metric("mrr", ranked, relevant, k)


def ndcg_at_k(ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]], k: int) -> float:
    """Mean NDCG@k with binary relevance, ideal DCG from min(k, number of relevant) ones."""
    return retrieval_metric("ndcg", ranked, relevant, k)


def map_at_k(ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]], k: int) -> float:
    """Mean average precision@k, each query normalised by min(k, number of relevant documents)."""
    return retrieval_metric("map", ranked, relevant, k)


def rank_by_similarity(scores: Any, doc_ids: Sequence[str], k: int | None = None) -> list[list[str]]:
    """Top-k document ids per query from an (n_queries × n_docs) score matrix, best first.

    Deterministic: higher score first, ties broken by lower corpus index (stable sort), so results do not
    depend on the order in which a backend happens to return equal scores.
    """
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be a 2-D (n_queries × n_docs) array, got shape {s.shape}")
    if s.shape[1] != len(doc_ids):
        raise ValueError(f"scores have {s.shape[1]} columns but there are {len(doc_ids)} doc ids")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    top = s.shape[1] if k is None else min(_check_k(k), s.shape[1])
    order = np.argsort(-s, axis=1, kind="stable")[:, :top]
    return [[doc_ids[j] for j in row] for row in order.tolist()]
