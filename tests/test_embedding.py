"""Embedding fine-tuning, the backend-agnostic parts: duplicate-free batches, hard-negative mining (skip + margin),
negatives from the formats users have, the MNRL arithmetic, retrieval evaluation and its bootstrap, CLI errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from trmlx.data import prepare_data
from trmlx.embedding.batches import UniqueBatchCursor, unique_text_batches
from trmlx.embedding.examples import EmbeddingExample, mine_negatives, training_examples, with_random_negatives
from trmlx.embedding.eval import compare_retrieval, evaluate_retrieval, paired_bootstrap_means
from trmlx.errors import UserError
from trmlx.loop import Position
from trmlx.metrics import compute_retrieval, rank_by_similarity
from trmlx.recipe import load_recipe

PAIRS = [("Türkiye'nin başkenti neresidir?", "Türkiye'nin başkenti Ankara'dır."),
         ("Suyun kaynama noktası kaçtır?", "Deniz seviyesinde su 100 derecede kaynar."),
         ("En uzun nehir hangisidir?", "Dünyanın en uzun nehri Nil'dir."),
         ("Fotosentez nedir?", "Bitkilerin ışıkla besin üretmesine fotosentez denir."),
         ("Everest kaç metredir?", "Everest 8849 metre yüksekliktedir."),
         ("Kahvenin anavatanı neresidir?", "Kahvenin anavatanı Etiyopya'dır.")]


def recipe_for(write, data: str, extra: str = "", model: str = "m"):
    return load_recipe(write("r.toml", f'task = "embedding"\n[model]\npath = "{model}"\n[data]\n{data}\n{extra}'))


class FakeModel:
    """encode() from a fixed table: what the core sees of a backend model."""

    def __init__(self, table: dict[str, list[float]]):
        self.table, self.calls = table, []

    def encode(self, texts, max_length, batch_size=32):
        self.calls.append(list(texts))
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def test_batches_never_hold_the_same_text_twice():
    ex = [EmbeddingExample("q1", "p1"), EmbeddingExample("q2", "p1"), EmbeddingExample("q3", "p3"),
          EmbeddingExample("q4", "p4", ("p3",))]
    # q2 shares q1's answer and q4's negative is q3's answer: each waits for the next batch.
    assert unique_text_batches(ex, 2, seed=0, shuffle=False) == [[0, 2], [1, 3]]
    assert unique_text_batches(ex, 4, seed=0, shuffle=False) == [[0, 2], [1, 3]]
    rng = np.random.default_rng(0)
    many = [EmbeddingExample(f"q{i}", f"p{rng.integers(12)}", tuple(f"p{j}" for j in rng.integers(12, size=2)))
            for i in range(40)]
    for seed in range(5):
        batches = unique_text_batches(many, 4, seed)
        assert sorted(i for b in batches for i in b) == list(range(40))  # every example once per epoch
        for batch in batches:
            texts = [t for i in batch for t in many[i].texts()]
            assert len(texts) == len(set(texts)) and 1 <= len(batch) <= 4
    assert unique_text_batches(many, 4, 3) == unique_text_batches(many, 4, 3) != unique_text_batches(many, 4, 4)
    # The cursor walks epoch after epoch; a restored position continues the same sequence.
    straight = UniqueBatchCursor(many, 4, 7, Position())
    sequence = [straight.next() for _ in range(30)]
    resumed = UniqueBatchCursor(many, 4, 7, Position(epoch=straight.position.epoch, cursor=straight.position.cursor))
    assert [resumed.next() for _ in range(5)] == [straight.next() for _ in range(5)]
    assert sequence[:len(unique_text_batches(many, 4, 7))] == unique_text_batches(many, 4, 7)


def test_mining_skips_top_ranks_and_keeps_a_margin():
    #          own  near-dup  hard  hard  easy  tie   tie
    scores = [[0.80, 0.79, 0.75, 0.70, 0.30, 0.60, 0.60]]
    mine = lambda **kw: mine_negatives(scores, [0], [{0}], **{"count": 3, "skip": 0, "margin": 0.95,  # noqa: E731
                                                               "depth": 50, **kw})[0]
    assert mine() == [2, 3, 5]  # 1 scores above 0.95 × 0.80 = 0.76: a likely paraphrase of the answer
    assert mine(margin=1.0) == [1, 2, 3]
    assert mine(skip=2) == [3, 5, 6]  # ranks 1-2 of the other answers (1 and 2) passed over; ties by index
    assert mine(skip=2, depth=4) == [3, 5]  # only the 4 best other answers are candidates
    assert mine(count=1) == [2]
    # Every answer of the query (it may have several) is excluded, never mined.
    assert mine_negatives(scores, [0], [{0, 2}], 3, 0, 0.95, 50) == [[3, 5, 6]]


def test_negatives_from_the_formats_users_have(write):
    write("negs.csv", "question,positive,negative1,negative2,negative3\n"
                      "Soru 1?,Doğru 1.,Yanlış 1,,Doğru 1.\nSoru 2?,Doğru 2.,Yanlış 2,Yanlış 3,Yanlış 4\n")
    write("flag.jsonl", [{"query": "Soru?", "pos": "Doğru.", "neg": ["Y1", "", "Y2"]}])
    recipe = recipe_for(write, 'train = "negs.csv"', "[embedding]\nnum_negatives = 2\n")
    data = prepare_data(recipe)
    assert data.report.empty_negatives == 1  # the empty negative2 cell, dropped and counted
    examples, source, counts = training_examples(data.train, recipe, model=None)
    assert source == "explicit"  # auto: the data has negatives
    assert [e.negatives for e in examples] == [("Yanlış 1",), ("Yanlış 2", "Yanlış 3")]  # cut to num_negatives
    assert counts == Counter({"negative equal to the positive, dropped": 1})
    recipe = recipe_for(write, 'train = "flag.jsonl"')
    data = prepare_data(recipe)
    assert data.report.empty_negatives == 1
    assert training_examples(data.train, recipe, None)[0] == [EmbeddingExample("Soru?", "Doğru.", ("Y1", "Y2"))]
    none = recipe_for(write, 'train = "flag.jsonl"', '[embedding]\nnegatives = "none"\n')
    assert training_examples(data.train, none, None)[0] == [EmbeddingExample("Soru?", "Doğru.")]
    write("pairs.csv", "question,answer\nA?,a.\n")
    explicit = recipe_for(write, 'train = "pairs.csv"', '[embedding]\nnegatives = "explicit"\n')
    with pytest.raises(UserError, match="the training data has no negatives"):
        training_examples(prepare_data(explicit).train, explicit, None)


def test_mined_and_random_negatives(write):
    rows = [{"question": q, "answer": a} for q, a in PAIRS] + [{"question": PAIRS[0][0], "answer": "Başkent Ankara."}]
    rows[1]["negatives"] = ["Su buharlaşır."]  # a row with its own negative keeps it; the others are mined
    write("qa.jsonl", rows)
    recipe = recipe_for(write, 'train = "qa.jsonl"', "[embedding]\nnum_negatives = 2\nmine_skip = 1\n")
    data = prepare_data(recipe)
    answers = [a for _, a in PAIRS] + ["Başkent Ankara."]
    # Query i is closest to its answer, then to answers i+1, i+2, ... (decreasing); the 7th answer is query 0's.
    eye = np.eye(8)
    table = {q: eye[i] for i, (q, _) in enumerate(PAIRS)}
    for j, a in enumerate(answers[:6]):
        table[a] = 3 * eye[j] + sum((1 - 0.1 * ((j - i) % 6)) * eye[i] for i in range(6) if i != j)
    table[answers[6]] = 3 * eye[0] + 0.5 * eye[1] + eye[7]
    model = FakeModel(table)
    examples, source, counts = training_examples(data.train, recipe, model)
    assert source == "explicit+mined" and len(model.calls) == 2  # one pass for the queries, one for the answers
    assert PAIRS[1][0] not in model.calls[0] and examples[1].negatives == ("Su buharlaşır.",)
    scores = np.array([table[q] / np.linalg.norm(table[q]) for q, _ in PAIRS]) @ np.array(
        [table[a] / np.linalg.norm(table[a]) for a in answers]).T
    pairs = PAIRS + [(PAIRS[0][0], "Başkent Ankara.")]
    for e in examples[:1] + examples[2:]:
        i = [q for q, _ in PAIRS].index(e.query)
        own = {answers.index(a) for q, a in pairs if q == e.query}
        expected = mine_negatives(scores[i:i + 1], [answers.index(e.positive)], [own], 2, 1, 0.95, 50)[0]
        assert e.negatives == tuple(answers[j] for j in expected) and len(e.negatives) == 2
        assert not set(e.negatives) & {answers[j] for j in own}  # never an answer of the same question
    assert counts["mined negatives"] == 12
    randomised = with_random_negatives(examples, 3, seed=0)
    assert randomised == with_random_negatives(examples, 3, seed=0) != with_random_negatives(examples, 3, seed=1)
    for e in randomised:
        assert len(e.negatives) == 3 and e.positive not in e.negatives
        assert not (e.query == PAIRS[0][0] and {"Başkent Ankara.", PAIRS[0][1]} & set(e.negatives))


def test_mnrl_equals_hand_computation_and_sentence_transformers():
    torch = pytest.importorskip("torch")
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    rng = np.random.default_rng(0)
    q, pos, neg = rng.normal(size=(3, 8)), rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    docs = np.concatenate([pos, neg])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    s = 20.0 * unit(q) @ unit(docs).T
    hand = float(np.mean(np.log(np.exp(s).sum(1)) - np.diag(s)))
    loss = st_losses.MultipleNegativesRankingLoss(model=None, scale=20.0)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    theirs = loss.compute_loss_from_embeddings([t(q), t(pos), t(neg)], None).item()  # (anchor, pos, neg) columns
    flat = loss.compute_loss_from_embeddings([t(q), t(docs)], None).item()  # how the cuda backend passes them
    assert theirs == pytest.approx(hand, abs=1e-12) and flat == pytest.approx(hand, abs=1e-12)
    mx = pytest.importorskip("mlx.core", reason="the MLX loss needs mlx")
    from trmlx.backends.mlx.embed import mnrl_sum

    ours = mnrl_sum(mx.array(q.astype(np.float32)), mx.array(docs.astype(np.float32)), 20.0).item() / 3
    assert ours == pytest.approx(hand, abs=1e-5)


def test_retrieval_eval_equals_core_metrics_and_writes_predictions(write, tmp_path):
    rows = [{"question": q, "answer": a} for q, a in PAIRS]
    write("train.jsonl", rows[:4])
    write("test.jsonl", rows[4:] + [{"question": PAIRS[4][0], "answer": "Everest çok yüksektir."}])
    recipe = recipe_for(write, 'train = "train.jsonl"\ntest = "test.jsonl"')
    from trmlx.embedding.eval import corpus_of, queries_of

    data = prepare_data(recipe)
    corpus = corpus_of(data)
    assert corpus == [a for _, a in PAIRS] + ["Everest çok yüksektir."]
    queries = queries_of(data.test)
    assert queries == [(PAIRS[4][0], {PAIRS[4][1], "Everest çok yüksektir."}), (PAIRS[5][0], {PAIRS[5][1]})]
    rng = np.random.default_rng(1)
    table = {t: rng.normal(size=5) for t in corpus + [q for q, _ in queries]}
    result = evaluate_retrieval(FakeModel(table), recipe, queries, corpus, tmp_path / "p.jsonl", top_k=3)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    scores = unit(np.array([table[q] for q, _ in queries])) @ unit(np.array([table[t] for t in corpus])).T
    ids = [str(i) for i in range(len(corpus))]
    ranked = rank_by_similarity(scores, ids)
    relevant = [{str(corpus.index(a)) for a in answers} for _, answers in queries]
    names = ["accuracy@1", "accuracy@3", "accuracy@5", "accuracy@10", "mrr@10", "ndcg@10", "recall@1", "recall@5",
             "recall@10", "map@100"]
    assert result["metrics"] == compute_retrieval(names, ranked, relevant)
    assert (result["n"], result["corpus_size"]) == (2, 7)
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    for p, ranking, rel, row in zip(predictions, ranked, relevant, scores):
        assert [t["text"] for t in p["top"]] == [corpus[int(d)] for d in ranking[:3]]
        assert [t["score"] for t in p["top"]] == [round(float(row[int(d)]), 6) for d in ranking[:3]]
        assert p["hit_rank"] == next(r + 1 for r, d in enumerate(ranking) if d in rel)
        assert p["metrics"] == compute_retrieval(names, [ranking], [rel])


def test_paired_bootstrap_over_queries():
    a = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.25]
    b = [1.0, 1.0, 0.5, 1.0, 1.0, 0.0, 1.0, 1.0]
    same = paired_bootstrap_means(a, a)
    assert (same["diff"], same["p_value"], same["ci_low"], same["ci_high"]) == (0.0, 1.0, 0.0, 0.0)
    result = paired_bootstrap_means(a, b, n_resamples=500, seed=3)
    rng = np.random.default_rng(3)  # the same draws, written out: resample query indices with replacement
    diffs = [np.mean(np.array(b)[idx] - np.array(a)[idx]) for idx in rng.integers(0, 8, size=(500, 8))]
    assert result["diff"] == pytest.approx(np.mean(b) - np.mean(a))
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    assert result["p_value"] == pytest.approx(min(1.0, 2 * np.mean(np.array(diffs) <= 0)))
    rows = [{"query": str(i), "metrics": {"mrr@10": x}} for i, x in enumerate(a)]
    better = [{"query": str(i), "metrics": {"mrr@10": x}} for i, x in enumerate(b)]
    table = compare_retrieval({"base": rows, "run": better}, ["mrr@10"], n_resamples=500, seed=3)["rows"]
    assert table[0] == {"task": "all", "metric": "mrr@10", "system": "base", "score": np.mean(a), "n": 8}
    assert table[1]["score"] == np.mean(b) and table[1]["ci_low"] == result["ci_low"]
    with pytest.raises(UserError, match="other questions"):
        compare_retrieval({"base": rows, "run": better[1:]}, ["mrr@10"])


def test_recipe_checks(write):
    causal = 'task = "causal"\n[model]\npath = "m"\n[data]\ntrain = "t.jsonl"\n[embedding]\nscale = 30.0\n'
    with pytest.raises(UserError) as err:
        load_recipe(write("c.toml", causal))
    assert err.value.problems == [f"{write('c.toml', causal)}: embedding.scale: applies only to task = \"embedding\""]
    with pytest.raises(UserError) as err:
        recipe_for(write, 'train = "t.jsonl"', "[embedding]\nmatryoshka_dims = [64, 64]\n")
    assert err.value.problems[0].endswith("embedding.matryoshka_dims: dimensions must be positive and distinct, "
                                          "got [64, 64]")
    from trmlx.recipe.checks import model_path

    missing = recipe_for(write, 'train = "t.jsonl"', model="package:trmlx_no_such_model_package")
    with pytest.raises(UserError, match=r"package 'trmlx_no_such_model_package' is not installed \(pip install "
                                        r"trmlx-no-such-model-package\)"):
        model_path(missing)


def test_cli_errors_are_one_line_with_exit_code_2(cli, write, tmp_path):
    recipe = write("r.toml", f'task = "embedding"\n[model]\npath = "m"\n[data]\ntrain = "{tmp_path}/t.jsonl"\n')
    write("t.jsonl", [{"question": "a?", "answer": "b."}])
    write("c.csv", "title,body\nx,y\n")
    cases = [
        (("search", str(recipe), "--corpus", str(tmp_path / "nope.jsonl"), "soru"),
         f"error: --corpus {tmp_path / 'nope.jsonl'}: file not found"),
        (("search", str(recipe), "--corpus", str(tmp_path / "c.csv"), "soru"),
         f"error: --corpus {tmp_path / 'c.csv'}: no text column (text, answer, positive, pos, passage, document, "
         "content); columns present: title, body; choose one with --column"),
        (("search", str(tmp_path / "nowhere"), "--corpus", str(tmp_path / "c.csv"), "soru"),
         f"error: {tmp_path / 'nowhere'}: no such run directory or recipe file"),
        (("eval", str(recipe), "--adapter", str(tmp_path)),
         "error: --adapter: an embedding run keeps its whole model in RUN_DIR/model; give the run directory"),
        (("eval", str(recipe), "--compare"), "error: --compare: give at least two run directories, or one with --base"),
    ]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.toml").write_text(recipe.read_text())
    cases.append((("eval", str(tmp_path / "run")),
                  f"error: {tmp_path / 'run' / 'model'}: no modules.json (has training finished?); evaluate the "
                  "base model with the recipe file"))
    try:
        import faiss  # noqa: F401
    except ImportError:
        cases.append((("search", str(recipe), "--corpus", str(tmp_path / "t.jsonl"), "--engine", "faiss", "soru"),
                      "error: --engine faiss: faiss is not installed (pip install faiss-cpu, or faiss-gpu-cu12)"))
    for args, message in cases:
        result = cli(*args)
        assert (result.exit_code, result.stderr.strip()) == (2, message), args
