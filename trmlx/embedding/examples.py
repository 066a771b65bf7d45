"""Embedding training examples: question–answer records become (query, positive, negatives) with hard negatives
(the data's own, mined with the base model, or random other answers), saved with the run as trained; and the one
way texts are embedded (prefix, limit, L2 norm)."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from trmlx.data.prepare import Record
from trmlx.errors import UserError
from trmlx.recipe.schema import Recipe

MODEL_DIR = "model"  # RUN/model: a sentence-transformers folder (embedding runs have no adapter/)
NEGATIVES_FILE = "negatives.jsonl"  # RUN/negatives.jsonl: the training examples as trained, negatives included


@dataclass(frozen=True)
class EmbeddingExample:
    query: str
    positive: str
    negatives: tuple[str, ...] = ()

    def texts(self) -> set[str]:
        return {self.query, self.positive, *self.negatives}


def encode(model: Any, texts: Sequence[str], recipe: Recipe, kind: str, batch_size: int = 32) -> Any:
    """L2-normalised float32 embeddings of queries (kind="query") or passages, with the recipe's prefix and limit."""
    import numpy as np

    emb = recipe.embedding
    prefix = emb.query_prefix if kind == "query" else emb.passage_prefix
    limit = recipe.embedding_lengths()[0 if kind == "query" else 1]
    vectors = np.asarray(model.encode([prefix + t for t in texts], limit, batch_size), dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def negatives_source(recipe: Recipe, records: Sequence[Record]) -> str:
    """explicit | mined | random | none, or for `auto`: explicit when every row has negatives, mined when none
    has, explicit+mined (the data's where a row has them, mined for the others) in between."""
    source = recipe.embedding.negatives
    has_explicit = sum(bool(r.fields.get("negatives")) for r in records)
    if source == "auto":
        return "mined" if not has_explicit else "explicit" if has_explicit == len(records) else "explicit+mined"
    if source == "explicit" and not has_explicit:
        raise UserError("embedding.negatives = \"explicit\": the training data has no negatives (a 'negatives' / "
                        "'neg' list or negative1..N columns); use \"mined\", \"random\" or \"none\"")
    return source


def examples_from_records(records: Sequence[Record], recipe: Recipe, explicit: bool,
                          counts: Counter | None = None) -> list[EmbeddingExample]:
    """(query, positive, negatives): explicit negatives are kept (at most num_negatives, no repeats) unless one
    equals the example's positive, which would teach the model to push its own answer away (counted)."""
    out = []
    for record in records:
        f = record.fields
        negatives: list[str] = []
        for text in (f.get("negatives") or []) if explicit else []:
            if text == f["positive"]:
                if counts is not None:
                    counts["negative equal to the positive, dropped"] += 1
            elif text not in negatives and len(negatives) < recipe.embedding.num_negatives:
                negatives.append(text)
        out.append(EmbeddingExample(f["query"], f["positive"], tuple(negatives)))
    return out


def answers_by_query(examples: Sequence[EmbeddingExample]) -> tuple[list[str], dict[str, set[str]]]:
    """Distinct answers in first-seen order, and every query's set of answers (a query may repeat)."""
    answers = list(dict.fromkeys(e.positive for e in examples))
    positives: dict[str, set[str]] = {}
    for e in examples:
        positives.setdefault(e.query, set()).add(e.positive)
    return answers, positives


def mine_negatives(scores: Any, own: Sequence[int], positives: Sequence[set[int]], count: int, skip: int,
                   margin: float, depth: int) -> list[list[int]]:
    """Hard negatives per query from an (n_queries × n_answers) similarity matrix.

    The query's answers are never candidates. The other answers are ranked by score (ties: lower index first);
    the first `skip` are passed over (near the top sit unlabelled positives), only the top `depth` are
    considered, and a candidate must score at most `margin` × the score of the query's own answer `own[i]`.
    The first `count` that pass are returned, best first."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    out = []
    for i, row in enumerate(s):
        k = min(len(row), depth + len(positives[i]))
        top = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
        top = top[np.lexsort((top, -row[top]))]  # best first, ties by index
        ranked = [j for j in top.tolist() if j not in positives[i]][:depth]
        limit = margin * row[own[i]]
        out.append([j for j in ranked[skip:] if row[j] <= limit][:count])
    return out


def with_mined_negatives(model: Any, examples: Sequence[EmbeddingExample], recipe: Recipe,
                         counts: Counter, chunk: int = 1024) -> list[EmbeddingExample]:
    """Mine with the model as loaded (the base) for every example that has no negatives yet: its query against
    all distinct training answers, scored in chunks of queries so a large set never holds the full matrix."""
    emb = recipe.embedding
    answers, positives = answers_by_query(examples)
    index = {a: i for i, a in enumerate(answers)}
    queries = list(dict.fromkeys(e.query for e in examples if not e.negatives))
    if not queries:
        return list(examples)
    row_of = {q: i for i, q in enumerate(queries)}
    query_vectors = encode(model, queries, recipe, "query")
    answer_vectors = encode(model, answers, recipe, "passage")
    mined_by_example: list[list[int]] = [[] for _ in examples]
    order = sorted((n for n, e in enumerate(examples) if not e.negatives), key=lambda n: row_of[examples[n].query])
    for start in range(0, len(queries), chunk):
        scores = query_vectors[start:start + chunk] @ answer_vectors.T
        members = [n for n in order if start <= row_of[examples[n].query] < start + chunk]
        rows = scores[[row_of[examples[n].query] - start for n in members]]
        found = mine_negatives(rows, [index[examples[n].positive] for n in members],
                               [{index[a] for a in positives[examples[n].query]} for n in members],
                               emb.num_negatives, emb.mine_skip, emb.mine_margin, emb.mine_depth)
        for n, mined in zip(members, found):
            mined_by_example[n] = mined
    out = []
    for e, mined in zip(examples, mined_by_example):
        if e.negatives:  # the data's own
            out.append(e)
            continue
        counts["mined negatives"] += len(mined)
        if len(mined) < emb.num_negatives:
            counts["queries with fewer mined negatives than num_negatives"] += 1
        out.append(EmbeddingExample(e.query, e.positive, tuple(answers[j] for j in mined)))
    return out


def with_random_negatives(examples: Sequence[EmbeddingExample], count: int, seed: int) -> list[EmbeddingExample]:
    """`count` other answers per example, drawn with a seeded RNG; never an answer of the same query."""
    answers, positives = answers_by_query(examples)
    rng = random.Random(seed)
    out = []
    for e in examples:
        own = positives[e.query]
        drawn = rng.sample(range(len(answers)), min(len(answers), count + len(own)))
        picked = [answers[j] for j in drawn if answers[j] not in own][:count]
        out.append(EmbeddingExample(e.query, e.positive, tuple(picked)))
    return out


def training_examples(records: Sequence[Record], recipe: Recipe, model: Any) -> tuple[list[EmbeddingExample],
                                                                                     str, Counter]:
    """Training examples with their negatives from the recipe's source; (examples, source, counts)."""
    counts: Counter = Counter()
    source = negatives_source(recipe, records)
    examples = examples_from_records(records, recipe, source.startswith("explicit"), counts)
    if source.endswith("mined"):
        examples = with_mined_negatives(model, examples, recipe, counts)
    elif source == "random":
        examples = with_random_negatives(examples, recipe.embedding.num_negatives, recipe.train.seed)
    return examples, source, counts


def write_examples(path: Path, examples: Sequence[EmbeddingExample]) -> None:
    from trmlx.rundir import atomic_write

    atomic_write(path, "".join(json.dumps({"query": e.query, "positive": e.positive, "negatives": list(e.negatives)},
                                          ensure_ascii=False) + "\n" for e in examples))


def read_examples(path: Path) -> list[EmbeddingExample]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [EmbeddingExample(r["query"], r["positive"], tuple(r["negatives"])) for r in rows]
