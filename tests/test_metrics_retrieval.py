"""Retrieval metrics: hand-computed cases and equality with sentence-transformers' InformationRetrievalEvaluator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trmlx.metrics import (
    accuracy_at_k,
    compute_retrieval,
    map_at_k,
    mrr_at_k,
    ndcg_at_k,
    precision_at_k,
    rank_by_similarity,
    recall_at_k,
)

RANKED = [["d1", "d2", "d3", "d4", "d5"], ["d1", "d2"], ["a", "b"]]
RELEVANT = [{"d2", "d4", "d9"}, set(), {"a"}]  # the query without relevant docs is skipped, as in the evaluator
IDCG3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)


def test_hand_computed_at_1():
    got = compute_retrieval(
        ["accuracy@1", "precision@1", "recall@1", "mrr@1", "ndcg@1", "map@1"], RANKED, RELEVANT
    )
    assert got == {"accuracy@1": 0.5, "precision@1": 0.5, "recall@1": 0.5, "mrr@1": 0.5, "ndcg@1": 0.5, "map@1": 0.5}


def test_hand_computed_at_3():
    assert accuracy_at_k(RANKED, RELEVANT, 3) == 1.0
    assert precision_at_k(RANKED, RELEVANT, 3) == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert recall_at_k(RANKED, RELEVANT, 3) == pytest.approx((1 / 3 + 1) / 2)
    assert mrr_at_k(RANKED, RELEVANT, 3) == pytest.approx((1 / 2 + 1) / 2)
    assert ndcg_at_k(RANKED, RELEVANT, 3) == pytest.approx(((1 / math.log2(3)) / IDCG3 + 1) / 2)
    assert map_at_k(RANKED, RELEVANT, 3) == pytest.approx(((1 / 2) / 3 + 1) / 2)


def test_hand_computed_at_5():
    assert precision_at_k(RANKED, RELEVANT, 5) == pytest.approx((2 / 5 + 1 / 5) / 2)  # divides by k, not by 2
    assert recall_at_k(RANKED, RELEVANT, 5) == pytest.approx((2 / 3 + 1) / 2)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    assert ndcg_at_k(RANKED, RELEVANT, 5) == pytest.approx((dcg / IDCG3 + 1) / 2)
    assert map_at_k(RANKED, RELEVANT, 5) == pytest.approx(((1 / 2 + 2 / 4) / 3 + 1) / 2)  # / min(k, |rel|)


def test_bad_inputs():
    with pytest.raises(ValueError, match="not a retrieval metric"):
        compute_retrieval(["mrr"], RANKED, RELEVANT)
    with pytest.raises(ValueError, match="3 rankings but 2"):
        mrr_at_k(RANKED, RELEVANT[:2], 10)
    with pytest.raises(ValueError, match="no query has a relevant"):
        mrr_at_k([["a"]], [set()], 10)
    with pytest.raises(ValueError, match="more than once"):
        mrr_at_k([["a", "a"]], [{"a"}], 10)


def test_rank_by_similarity_breaks_ties_by_corpus_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0]])
    ids = ["a", "b", "c", "d", "e"]
    assert rank_by_similarity(scores, ids, 3) == [["b", "d", "a"], ["a", "b", "c"]]
    assert rank_by_similarity(scores, ids) == [["b", "d", "a", "c", "e"], ["a", "b", "c", "d", "e"]]
    assert rank_by_similarity(scores, ids, 50)[0] == ["b", "d", "a", "c", "e"]
    with pytest.raises(ValueError, match="5 columns but there are 4"):
        rank_by_similarity(scores, ids[:4], 3)


class _StubModel:
    """Stands in for a SentenceTransformer: returns precomputed query embeddings, no download."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def encode_query(self, sentences, **kwargs):
        import torch

        return torch.tensor(np.stack([self.table[s] for s in sentences]))


def _cosine(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dn = d / np.linalg.norm(d, axis=1, keepdims=True)
    return qn @ dn.T


def _compare_with_evaluator(q_emb: np.ndarray, d_emb: np.ndarray, relevant: list[set[str]]) -> int:
    """Score with our metrics and with the evaluator on the same embeddings; return how many values matched."""
    pytest.importorskip("torch")
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.util import cos_sim

    try:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.evaluation import InformationRetrievalEvaluator

    doc_ids = [f"d{i:03d}" for i in range(len(d_emb))]  # zero-padded: id order == corpus order for ties
    qids = [f"q{i:03d}" for i in range(len(q_emb))]
    ks = {"accuracy": [1, 3, 5, 10], "precision": [1, 3, 5, 10], "recall": [1, 3, 5, 10], "mrr": [1, 10],
          "ndcg": [3, 10], "map": [10, 100]}  # fmt: skip
    evaluator = InformationRetrievalEvaluator(
        queries={q: q for q in qids},
        corpus={d: d for d in doc_ids},
        relevant_docs=dict(zip(qids, relevant)),
        corpus_chunk_size=7,
        accuracy_at_k=ks["accuracy"],
        precision_recall_at_k=ks["precision"],
        mrr_at_k=ks["mrr"],
        ndcg_at_k=ks["ndcg"],
        map_at_k=ks["map"],
        score_functions={"cos": cos_sim},
        write_csv=False,
    )
    import torch

    model = _StubModel({q: q_emb[i].astype(np.float32) for i, q in enumerate(qids)})
    theirs = evaluator.compute_all_metrics(model, corpus_embeddings=torch.tensor(d_emb.astype(np.float32)))["cos"]

    ranked = rank_by_similarity(_cosine(q_emb, d_emb), doc_ids, k=100)
    names = [f"{m}@{k}" for m, kk in ks.items() for k in kk]
    ours = compute_retrieval(names, ranked, relevant)
    compared = 0
    for m, kk in ks.items():
        for k in kk:
            assert ours[f"{m}@{k}"] == pytest.approx(float(theirs[f"{m}@k"][k]), abs=1e-6), f"{m}@{k}"
            compared += 1
    return compared


def test_equals_sentence_transformers_on_random_embeddings():
    rng = np.random.default_rng(0)
    n_q, n_d = 30, 60
    q_emb, d_emb = rng.normal(size=(n_q, 16)), rng.normal(size=(n_d, 16))
    relevant = [{f"d{j:03d}" for j in rng.choice(n_d, size=rng.integers(1, 6), replace=False)} for _ in range(n_q)]
    relevant[4] = set()  # skipped by both
    assert _compare_with_evaluator(q_emb, d_emb, relevant) == 18


def test_equals_sentence_transformers_with_tied_scores():
    # Documents are scaled basis vectors, so every document on the same axis gets exactly the same cosine.
    rng = np.random.default_rng(1)
    dims = rng.integers(0, 4, size=40)
    d_emb = np.zeros((40, 4))
    d_emb[np.arange(40), dims] = rng.uniform(0.5, 2.0, size=40)
    q_emb = rng.normal(size=(12, 4))
    relevant = [{f"d{j:03d}" for j in rng.choice(40, size=3, replace=False)} for _ in range(12)]
    scores = _cosine(q_emb, d_emb)
    assert all(len(set(row.tolist())) == 4 for row in scores)  # 40 documents, only 4 distinct scores per query
    assert _compare_with_evaluator(q_emb, d_emb, relevant) == 18
